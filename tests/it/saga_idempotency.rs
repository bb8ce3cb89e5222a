//! At-least-once delivery: duplicated storefront events, redelivered and republished fleet
//! events, and outcomes in any order change nothing beyond the first application.

use crate::support::saga::*;
use orderfleet::domain::events::Meta;
use orderfleet::domain::names::HandlerName;
use orderfleet::runtime::Executed;

#[tokio::test]
async fn a_duplicated_order_placed_gives_one_order_one_authorization_and_one_capture() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 10).await;

    let placed = order("ord-dup", &[("TEA-1", 1, 1000)], "tok_visa");
    // The same event twice (same event_id), and a storefront retry under a new event_id.
    fleet.publish_event(&placed).await.unwrap();
    fleet.publish_event(&placed).await.unwrap();
    let mut retried = placed.clone();
    retried.meta = Meta::with_id("placed-ord-dup-retry");
    fleet.publish_event(&retried).await.unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(fleet.stats().duplicates, 1);
    let c = pool.get().await.unwrap();
    let orders: i64 = c
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orders, 1);
    assert_eq!(
        emitted(&pool, "OrderAccepted", Some("ord-dup")).await.len(),
        1
    );
    assert_eq!(
        emitted(&pool, "PaymentAuthorized", Some("ord-dup"))
            .await
            .len(),
        1
    );
    assert_eq!(
        emitted(&pool, "PaymentCaptured", Some("ord-dup"))
            .await
            .len(),
        1
    );
    assert_eq!(provider_call(&pool, "auth:ord-dup").await.unwrap().0, 1);
    assert_eq!(provider_call(&pool, "capture:ord-dup").await.unwrap().0, 1);
    assert_eq!(status(&pool, "ord-dup").await, "completed");
    assert_eq!(stock(&pool, "TEA-1").await, (9, 0));
    assert_eq!(net_money(&pool, "ord-dup").await, 1000);
}

#[tokio::test]
async fn reordered_and_redelivered_outcomes_give_one_authorization_and_one_capture() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 10).await;
    fleet
        .publish_event(&order("ord-mix", &[("TEA-1", 2, 1000)], "tok_visa"))
        .await
        .unwrap();
    let placed = fleet.take(1).await.unwrap().remove(0);
    fleet.deliver(&placed).await;

    // OrderAccepted reaches payments before inventory, twice each.
    let accepted = fleet.take(1).await.unwrap().remove(0);
    for handler in [HandlerName::Payments, HandlerName::Inventory] {
        fleet.deliver_to(handler, &accepted, 1).await.unwrap();
        assert_eq!(
            fleet.deliver_to(handler, &accepted, 2).await.unwrap(),
            Executed::Duplicate
        );
    }
    // Their outcomes reach orders in reverse order, each redelivered, and one republished by
    // the relay under a new EventBridge id (same event_id in the detail).
    let mut outcomes = fleet.take(10).await.unwrap();
    assert_eq!(outcomes.len(), 2);
    outcomes.reverse();
    for event in &outcomes {
        fleet
            .deliver_to(HandlerName::Orders, event, 1)
            .await
            .unwrap();
        assert_eq!(
            fleet
                .deliver_to(HandlerName::Orders, event, 2)
                .await
                .unwrap(),
            Executed::Duplicate
        );
    }
    let mut republished = outcomes[0].clone();
    republished.id = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        fleet
            .deliver_to(HandlerName::Orders, &republished, 1)
            .await
            .unwrap(),
        Executed::Duplicate
    );
    assert_eq!(status(&pool, "ord-mix").await, "ready_to_ship");
    assert_eq!(
        emitted(&pool, "OrderReadyToShip", Some("ord-mix"))
            .await
            .len(),
        1
    );

    // Fulfillment gets OrderReadyToShip twice; its outcomes go out duplicated.
    let ready = fleet.take(1).await.unwrap().remove(0);
    fleet.deliver(&ready).await;
    fleet.deliver(&ready).await;
    let shipped = fleet.take(10).await.unwrap();
    for event in shipped.iter().rev() {
        fleet.deliver(event).await;
        fleet.deliver(event).await;
    }
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-mix").await, "completed");
    assert_eq!(provider_call(&pool, "auth:ord-mix").await.unwrap().0, 1);
    assert_eq!(provider_call(&pool, "capture:ord-mix").await.unwrap().0, 1);
    assert_eq!(
        emitted(&pool, "OrderShipped", Some("ord-mix")).await.len(),
        1
    );
    assert_eq!(
        emitted(&pool, "PaymentCaptured", Some("ord-mix"))
            .await
            .len(),
        1
    );
    assert_eq!(
        payment(&pool, "ord-mix").await,
        ("captured".into(), 2000, 0)
    );
    assert_eq!(stock(&pool, "TEA-1").await, (8, 0));
    assert_ledger_balances(&pool).await;
    assert_eq!(net_money(&pool, "ord-mix").await, 2000);
}

#[tokio::test]
async fn a_stale_authorization_after_the_void_does_not_revive_a_cancelled_order() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 1).await;
    fleet
        .publish_event(&order("ord-stale", &[("TEA-1", 5, 1000)], "tok_visa"))
        .await
        .unwrap();
    // Hold every PaymentAuthorized back and deliver it last.
    let mut held = Vec::new();
    while let Some(event) = fleet.take(1).await.unwrap().pop() {
        if event.detail_type == "PaymentAuthorized" {
            held.push(event);
        } else {
            fleet.deliver(&event).await;
        }
    }
    assert_eq!(held.len(), 1);
    fleet.deliver(&held[0]).await;
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    let row = order_row(&pool, "ord-stale").await;
    assert_eq!(row.status, "cancelled");
    assert_eq!(row.payment, "voided");
}
