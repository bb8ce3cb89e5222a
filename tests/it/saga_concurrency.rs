//! Many handler instances at once: inventory never oversells and never goes negative, and the
//! saga ends with every order settled.

use std::sync::Arc;

use crate::support;
use crate::support::saga::*;
use orderfleet::domain::names::HandlerName;
use orderfleet::handlers::inventory::Inventory;
use orderfleet::handlers::AnyHandler;
use orderfleet::runtime::{self, Executed};
use orderfleet_testkit::inproc::Fleet;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_orders_for_the_last_five_units_reserve_exactly_five() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "LAST-1", 999, 5).await;

    for i in 0..20 {
        fleet
            .publish_event(&order(
                &format!("ord-{i:02}"),
                &[("LAST-1", 1, 999)],
                "tok_visa",
            ))
            .await
            .unwrap();
    }
    // orders accepts all twenty.
    for placed in fleet.take(20).await.unwrap() {
        fleet.deliver(&placed).await;
    }
    let accepted = fleet.take(20).await.unwrap();
    assert_eq!(accepted.len(), 20);
    assert!(accepted.iter().all(|e| e.detail_type == "OrderAccepted"));

    // Twenty inventory instances reserve at once, each on its own connection.
    let mut tasks = tokio::task::JoinSet::new();
    for event in accepted.clone() {
        let pool = pool.clone();
        tasks.spawn(async move {
            let instance: Arc<dyn AnyHandler> = Arc::new(Inventory);
            runtime::execute(&*instance, &pool, &event, 1).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        assert!(matches!(
            done.unwrap(),
            Ok(Executed::Applied { emitted: 1 })
        ));
    }
    assert_eq!(stock(&pool, "LAST-1").await, (5, 5));
    assert_eq!(emitted(&pool, "InventoryReserved", None).await.len(), 5);
    assert_eq!(emitted(&pool, "InventoryRejected", None).await.len(), 15);

    // Payments authorizes them all, concurrently too, then the rest of the saga runs on four
    // concurrent tasks.
    let mut tasks = tokio::task::JoinSet::new();
    for event in accepted {
        let fleet = fleet.clone();
        tasks.spawn(async move {
            fleet
                .deliver_with_retries(HandlerName::Payments, &event)
                .await
        });
    }
    while let Some(done) = tasks.join_next().await {
        assert!(done.unwrap().outcome.is_ok());
    }
    fleet.run_until_quiet_concurrently(4, 4).await.unwrap();

    assert_no_dead_letters(&fleet);
    // No deadlock, lock timeout or starved pool had to be retried.
    assert_eq!(fleet.stats().retries, 0);
    let c = pool.get().await.unwrap();
    let by_status: Vec<(String, i64)> = c
        .query(
            "SELECT status, count(*) FROM orders GROUP BY status ORDER BY status",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        by_status,
        vec![("cancelled".to_string(), 15), ("completed".to_string(), 5)]
    );
    assert_eq!(stock(&pool, "LAST-1").await, (0, 0));
    assert_reservations_match_stock(&pool).await;
    assert_movements_match_stock(&pool).await;
    assert_ledger_balances(&pool).await;
    assert_eq!(
        ledger(&pool).await.get("sales_revenue:EUR"),
        Some(&(-5 * 999))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_fleet_instances_at_once_settle_every_order_without_overselling() {
    let (pool, url) = support::fresh_db().await;
    let seeder = sandbox_fleet(pool.clone(), &url);
    stock_sku(&seeder, "A", 500, 6).await;
    stock_sku(&seeder, "B", 700, 4).await;

    // 30 orders mixing two SKUs, declines, flaky payments and cancellations.
    let mut cancels = Vec::new();
    for i in 0..30 {
        let id = format!("ord-{i:02}");
        let token = match i % 5 {
            0 => "tok_decline",
            1 => "tok_flaky_1",
            _ => "tok_visa",
        };
        let lines: &[(&str, i64, i64)] = match i % 3 {
            0 => &[("A", 1, 500), ("B", 1, 700)],
            1 => &[("B", 1, 700), ("A", 1, 500)],
            _ => &[("A", 2, 500)],
        };
        seeder
            .publish_event(&order(&id, lines, token))
            .await
            .unwrap();
        if i % 7 == 3 {
            cancels.push(id);
        }
    }
    for id in &cancels {
        seeder.publish_event(&cancellation(id)).await.unwrap();
    }

    // Three independent instances, each with its own handler objects and four tasks.
    let instances: Vec<Fleet> = (0..3).map(|_| sandbox_fleet(pool.clone(), &url)).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for fleet in instances.clone() {
        tasks.spawn(async move { fleet.run_until_quiet_concurrently(4, 2).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    // An instance stops when it finds nothing to do; pick up anything emitted after that.
    instances[0].run_until_quiet().await.unwrap();

    for fleet in &instances {
        assert_no_dead_letters(fleet);
    }
    let c = pool.get().await.unwrap();
    let open: i64 = c
        .query_one(
            "SELECT count(*) FROM orders WHERE status NOT IN ('completed', 'cancelled', 'returned', 'rejected')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0, "every order is terminal");
    let (a, b) = (stock(&pool, "A").await, stock(&pool, "B").await);
    assert_eq!((a.1, b.1), (0, 0), "nothing stays reserved");
    assert!(a.0 >= 0 && b.0 >= 0);
    let sold: Vec<(String, i64)> = c
        .query(
            "SELECT l.sku, sum(l.quantity)::bigint FROM order_lines l JOIN orders o ON o.id = l.order_id
              WHERE o.status = 'completed' GROUP BY l.sku ORDER BY l.sku",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let sold_of = |sku: &str| sold.iter().find(|s| s.0 == sku).map_or(0, |s| s.1);
    assert_eq!(a.0, 6 - sold_of("A"));
    assert_eq!(b.0, 4 - sold_of("B"));
    assert_reservations_match_stock(&pool).await;
    assert_movements_match_stock(&pool).await;
    assert_ledger_balances(&pool).await;
    // Each completed order captured exactly its total; everything else moved nothing.
    let wrong: i64 = c
        .query_one(
            "SELECT count(*) FROM orders o LEFT JOIN payments p ON p.order_id = o.id
              WHERE (o.status = 'completed' AND (p.captured_minor <> o.total_minor OR p.refunded_minor <> 0))
                 OR (o.status IN ('cancelled', 'rejected') AND coalesce(p.captured_minor - p.refunded_minor, 0) <> 0)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0);
    let completed: i64 = c
        .query_one(
            "SELECT count(*) FROM orders WHERE status = 'completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(completed > 0, "some orders complete");
}
