//! What a careless or unlucky producer can send, and what the fleet makes of it: ids reused
//! across detail-types, retries without an id, quantities past any sane bound, currencies that
//! are not ISO 4217.

use crate::support;
use crate::support::saga::*;
use orderfleet::domain::events::{Currency, Meta, Money, StockReceived};
use orderfleet::domain::outcome::FailureKind;

#[tokio::test]
async fn a_cancellation_reusing_the_order_placed_id_still_cancels_the_order() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "REUSE-1", 1000, 10).await;
    // The storefront uses the order id as the event id of every event about the order.
    let mut placed = order("ord-reuse", &[("REUSE-1", 1, 1000)], "tok_visa");
    placed.meta = Meta::with_id("ord-reuse");
    fleet.publish_event(&placed).await.unwrap();
    // Orders takes the order in; the rest of the saga waits, so it is still cancellable.
    let taken = fleet.take(1).await.unwrap();
    assert_eq!(taken[0].detail_type, "OrderPlaced");
    fleet.deliver(&taken[0]).await;
    assert_eq!(status(&pool, "ord-reuse").await, "accepted");
    let mut cancel = cancellation("ord-reuse");
    cancel.meta = Meta::with_id("ord-reuse");
    fleet.publish_event(&cancel).await.unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    let row = order_row(&pool, "ord-reuse").await;
    assert!(
        matches!(row.status.as_str(), "cancelled" | "completed"),
        "the cancellation was dropped as a duplicate: {row:?}"
    );
    assert_eq!(row.status, "cancelled", "{row:?}");
    assert_eq!(stock(&pool, "REUSE-1").await, (10, 0));
}

#[tokio::test]
async fn a_stock_receipt_without_event_id_is_dead_lettered_and_stock_is_unchanged() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "NOID-1", 1000, 5).await;
    // A retry after a lost PutEvents response: the bus gives each a new id.
    let receipt = StockReceived {
        meta: Meta::default(),
        sku: "NOID-1".into(),
        quantity: 7,
    };
    fleet.publish_event(&receipt).await.unwrap();
    fleet.publish_event(&receipt).await.unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_eq!(stock(&pool, "NOID-1").await, (5, 0));
    let dead: Vec<_> = fleet
        .dead_letters()
        .into_iter()
        .filter(|d| d.handler.map(|h| h.as_str()) == Some("inventory"))
        .collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for d in &dead {
        assert_eq!(d.kind, FailureKind::Permanent, "{d:?}");
        assert!(d.reason.contains("event_id"), "{}", d.reason);
    }
}

#[tokio::test]
async fn an_order_whose_quantities_overflow_or_pass_the_bound_is_rejected_with_no_authorization() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "HUGE-1", 0, 10).await;
    let huge = i64::MAX / 2 + 1;
    let cases = [
        // Free lines, so the total fits: only the units per SKU overflow.
        order(
            "ord-sum-overflow",
            &[("HUGE-1", huge, 0), ("HUGE-1", huge, 0)],
            "tok_visa",
        ),
        order(
            "ord-past-bound",
            &[("HUGE-1", 1_000_000_000, 0)],
            "tok_visa",
        ),
        order(
            "ord-lines-past-bound",
            &[("HUGE-1", 900_000, 0), ("HUGE-1", 900_000, 0)],
            "tok_visa",
        ),
    ];
    for placed in &cases {
        fleet.publish_event(placed).await.unwrap();
    }
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    for placed in &cases {
        let id = placed.order_id.as_str();
        assert_eq!(status(&pool, id).await, "rejected", "{id}");
        let rejected = emitted(&pool, "OrderRejected", Some(id)).await;
        assert_eq!(rejected.len(), 1, "{id}");
        let codes: Vec<&str> = rejected[0]["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["code"].as_str().unwrap())
            .collect();
        assert!(codes.contains(&"invalid_quantity"), "{id}: {codes:?}");
        assert!(
            provider_call(&pool, &format!("auth:{id}")).await.is_none(),
            "{id}: an authorization was taken"
        );
    }
    assert_eq!(stock(&pool, "HUGE-1").await, (10, 0));
}

#[tokio::test]
async fn an_order_in_a_currency_outside_iso_4217_is_rejected() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "CUR-1", 1000, 10).await;
    let mut placed = order("ord-xyz", &[("CUR-1", 1, 1000)], "tok_visa");
    placed.lines[0].unit_price = Money::new(1000, Currency::new("XYZ").unwrap());
    fleet.publish_event(&placed).await.unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-xyz").await, "rejected");
    let rejected = emitted(&pool, "OrderRejected", Some("ord-xyz")).await;
    let codes: Vec<&str> = rejected[0]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["invalid_currency"]);
    assert!(provider_call(&pool, "auth:ord-xyz").await.is_none());
    assert_eq!(stock(&pool, "CUR-1").await, (10, 0));
}

/// A database migrated up to (and including) `version`, as the previous release left it.
async fn db_at(version: i32) -> deadpool_postgres::Pool {
    let (pool, _) = support::fresh_db().await;
    // fresh_db migrated everything: start over in a schema of our own at `version`.
    let c = pool.get().await.unwrap();
    c.batch_execute(
        "DROP SCHEMA public CASCADE; CREATE SCHEMA public;
         CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                                         applied_at timestamptz NOT NULL DEFAULT now());",
    )
    .await
    .unwrap();
    for &(v, name, sql) in orderfleet::store::db::MIGRATIONS
        .iter()
        .filter(|m| m.0 <= version)
    {
        c.batch_execute(sql).await.unwrap();
        c.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&v, &name],
        )
        .await
        .unwrap();
    }
    drop(c);
    pool
}

#[tokio::test]
async fn an_event_applied_before_the_inbox_migration_is_still_a_duplicate_after_it() {
    let pool = db_at(9).await;
    let c = pool.get().await.unwrap();
    // What the previous release recorded when it applied an OrderPlaced.
    c.execute(
        "INSERT INTO processed_messages (handler, event_key, detail_type)
         VALUES ('orders', 'ord-9', 'OrderPlaced')",
        &[],
    )
    .await
    .unwrap();
    drop(c);
    let applied = orderfleet::store::db::migrate(&pool).await.unwrap();
    assert_eq!(
        applied.first(),
        Some(&10),
        "0010 applied first: {applied:?}"
    );

    let claim = |detail_type: &'static str| {
        let pool = pool.clone();
        async move {
            let c = pool.get().await.unwrap();
            c.batch_execute("BEGIN").await.unwrap();
            let claimed =
                orderfleet::store::inbox::claim(&c, "orders", "ord-9", detail_type, Some("ord-9"))
                    .await
                    .unwrap();
            c.batch_execute("COMMIT").await.unwrap();
            claimed
        }
    };
    assert!(
        !claim("OrderPlaced").await,
        "the redelivered OrderPlaced was applied again"
    );
    assert!(
        claim("OrderCancellationRequested").await,
        "another detail-type under the same id is another event"
    );
    assert!(!claim("OrderCancellationRequested").await);
    // The retention index still serves the pruner.
    let c = pool.get().await.unwrap();
    let brin: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'processed_messages_processed_at'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(brin, 1);
}
