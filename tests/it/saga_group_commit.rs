//! Group commit, per handler: several events of orders, payments, fulfillment or the
//! storefront (with the sandbox write-back) in one transaction give what each event alone
//! would have: the last unit sold once without deadlock, duplicates authorized once, a
//! failing event judged alone while its neighbours commit, and each handler's decisions kept
//! as they would be one event at a time. The
//! runtime's mechanics (panics, hangs, aborted transactions, a busy queue, groups that never
//! share an order) are in `runtime_group_commit.rs`.

use std::time::Duration;

use crate::support::saga::*;
use crate::support::{self, applied, groups_at_once, refs};
use chrono::Utc;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::runtime::group::execute_group;
use orderfleet::runtime::{self, Executed};
use orderfleet_testkit::examples::envelope;
use serde_json::json;

/// The `OrderAccepted` events of `orders` placed with `token`, one line of `sku` each.
async fn accepted_orders(
    fleet: &orderfleet_testkit::inproc::Fleet,
    ids: &[String],
    sku: &str,
    token: &str,
) -> Vec<Envelope> {
    let lines = vec![vec![(sku, 1, 999)]; ids.len()];
    accepted_orders_of(fleet, ids, &lines, token).await
}

/// The `OrderAccepted` events of `orders`, the i-th placed with `lines[i]`.
async fn accepted_orders_of(
    fleet: &orderfleet_testkit::inproc::Fleet,
    ids: &[String],
    lines: &[Vec<(&str, i64, i64)>],
    token: &str,
) -> Vec<Envelope> {
    for (id, lines) in ids.iter().zip(lines) {
        fleet.publish_event(&order(id, lines, token)).await.unwrap();
    }
    for placed in fleet.take(ids.len()).await.unwrap() {
        fleet.deliver(&placed).await;
    }
    let accepted = fleet.take(ids.len()).await.unwrap();
    assert_eq!(accepted.len(), ids.len());
    assert!(accepted.iter().all(|e| e.detail_type == "OrderAccepted"));
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_groups_at_once_for_the_last_units_of_two_skus_sell_each_once_without_deadlock() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "LAST-A", 999, 5).await;
    stock_sku(&fleet, "LAST-B", 999, 5).await;
    let ids: Vec<String> = (0..20).map(|i| format!("grp-{i:02}")).collect();
    // One line each, alternating the SKUs, and in groups that start with A and groups that
    // start with B: groups that locked stock event by event would each hold one row the other
    // waits for, and deadlock.
    let lines: Vec<Vec<(&str, i64, i64)>> = (0..20)
        .map(|i| {
            let sku = if (i / 5 + i % 5) % 2 == 0 {
                "LAST-A"
            } else {
                "LAST-B"
            };
            vec![(sku, 1, 999)]
        })
        .collect();
    let accepted = accepted_orders_of(&fleet, &ids, &lines, "tok_visa").await;

    // Four groups of five, each one transaction, all contending at once.
    let inventory = fleet.handler(HandlerName::Inventory).unwrap();
    groups_at_once(inventory, &pool, &accepted, 5).await;
    assert_eq!(stock(&pool, "LAST-A").await, (5, 5));
    assert_eq!(stock(&pool, "LAST-B").await, (5, 5));
    assert_eq!(emitted(&pool, "InventoryReserved", None).await.len(), 10);
    assert_eq!(emitted(&pool, "InventoryRejected", None).await.len(), 10);

    // The rest of the saga, grouped wherever events meet.
    for event in accepted {
        fleet
            .deliver_with_retries(HandlerName::Payments, &event)
            .await;
    }
    fleet.run_until_quiet_concurrently(4, 16).await.unwrap();
    assert_no_dead_letters(&fleet);
    let completed = support::scalar(
        &pool,
        "SELECT count(*) FROM orders WHERE status = 'completed'",
    );
    assert_eq!(completed.await, 10);
    let cancelled = support::scalar(
        &pool,
        "SELECT count(*) FROM orders WHERE status = 'cancelled'",
    );
    assert_eq!(cancelled.await, 10);
    assert_eq!(stock(&pool, "LAST-A").await, (0, 0));
    assert_eq!(stock(&pool, "LAST-B").await, (0, 0));
    assert_reservations_match_stock(&pool).await;
    assert_movements_match_stock(&pool).await;
    assert_ledger_balances(&pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_groups_placing_orders_of_the_same_new_customers_in_opposite_order_do_not_deadlock() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "CUS-SKU", 999, 100).await;
    // The first group places for x1 to x10, the second for x10 down to x1. None of them
    // exists yet: upserting them event by event, the groups would meet in the middle, each
    // waiting for the other's insert.
    let customers: Vec<String> = (1..=10)
        .map(|n| format!("cus-x{n}"))
        .chain((1..=10).rev().map(|n| format!("cus-x{n}")))
        .collect();
    for (i, customer) in customers.iter().enumerate() {
        let mut placed = order(&format!("cx-{i:02}"), &[("CUS-SKU", 1, 999)], "tok_visa");
        placed.customer.id = customer.clone();
        fleet.publish_event(&placed).await.unwrap();
    }
    let placed = fleet.take(20).await.unwrap();
    let orders = fleet.handler(HandlerName::Orders).unwrap();
    groups_at_once(orders, &pool, &placed, 10).await;
    let customers = support::scalar(&pool, "SELECT count(*) FROM customers");
    assert_eq!(customers.await, 10);
    let accepted = support::scalar(
        &pool,
        "SELECT count(*) FROM orders WHERE status = 'accepted'",
    );
    assert_eq!(accepted.await, 20);
}

#[tokio::test]
async fn duplicates_inside_a_group_and_across_groups_authorize_once() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "DUP-G", 999, 10).await;
    let ids = vec!["dup-g-1".to_string(), "dup-g-2".to_string()];
    let accepted = accepted_orders(&fleet, &ids, "DUP-G", "tok_visa").await;
    let (first, second) = (&accepted[0], &accepted[1]);
    let payments = fleet.handler(HandlerName::Payments).unwrap();

    assert!(applied(
        &runtime::execute(&*payments, &pool, first, 1).await
    ));
    // The first order again (already processed), and the second one twice in the same group.
    let group = vec![(first, 2), (second, 1), (second, 1), (first, 3)];
    let outcome = execute_group(&*payments, &pool, &group).await;
    assert_eq!(outcome.transactions, 1);
    let answers: Vec<_> = outcome.results.iter().map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        answers,
        vec![
            Some(&Executed::Duplicate),
            Some(&Executed::Applied { emitted: 1 }),
            Some(&Executed::Duplicate),
            Some(&Executed::Duplicate),
        ]
    );
    // One provider call per order, one authorization each.
    let calls = support::scalar(
        &pool,
        "SELECT sum(attempts)::bigint FROM sandbox_provider_calls WHERE operation = 'authorize'",
    );
    assert_eq!(calls.await, 2);
    assert_eq!(emitted(&pool, "PaymentAuthorized", None).await.len(), 2);
    for id in &ids {
        assert_eq!(payment(&pool, id).await.0, "authorized");
    }
}

#[tokio::test]
async fn a_permanent_failure_in_a_group_is_judged_alone_and_its_neighbours_commit() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    let inventory = fleet.handler(HandlerName::Inventory).unwrap();
    let events = vec![
        envelope(
            "StockReceived",
            &json!({"sku": "PF-1", "quantity": 3, "event_id": "sr-PF-1"}),
        ),
        envelope(
            "StockReceived",
            &json!({"sku": "PF-BAD", "quantity": -1, "event_id": "sr-PF-BAD"}),
        ),
        envelope(
            "StockReceived",
            &json!({"sku": "PF-2", "quantity": 4, "event_id": "sr-PF-2"}),
        ),
    ];
    let outcome = execute_group(&*inventory, &pool, &refs(&events, 1)).await;
    // The failed group, the two good events grouped again, the bad one alone.
    assert_eq!(outcome.transactions, 3);
    assert!(applied(&outcome.results[0]));
    assert!(applied(&outcome.results[2]));
    match &outcome.results[1] {
        Err(HandlerError::Permanent { reason }) => {
            assert!(reason.contains("non-positive quantity"), "{reason}")
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert_eq!(stock(&pool, "PF-1").await.0, 3);
    assert_eq!(stock(&pool, "PF-2").await.0, 4);
    let recorded = support::scalar(
        &pool,
        "SELECT count(*) FROM processed_messages WHERE handler = 'inventory'",
    );
    assert_eq!(recorded.await, 2, "the failed event must stay unprocessed");
    let movements = support::scalar(&pool, "SELECT count(*) FROM stock_movements");
    assert_eq!(movements.await, 2);
}

#[tokio::test]
async fn a_transient_failure_in_a_group_is_retried_later_without_a_second_provider_call() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "FLK-G", 999, 10).await;
    let flaky = accepted_orders(&fleet, &["flk-g-1".to_string()], "FLK-G", "tok_flaky_1").await;
    let good = accepted_orders(&fleet, &["flk-g-2".to_string()], "FLK-G", "tok_visa").await;
    let events = vec![flaky[0].clone(), good[0].clone()];
    let payments = fleet.handler(HandlerName::Payments).unwrap();

    let outcome = execute_group(&*payments, &pool, &refs(&events, 1)).await;
    assert!(
        matches!(outcome.results[0], Err(HandlerError::Retry { .. })),
        "{:?}",
        outcome.results[0]
    );
    assert!(applied(&outcome.results[1]));
    // One provider call per order, counted by token (each order here has its own).
    let calls = |token: &str| {
        format!(
            "SELECT coalesce(sum(attempts), 0)::bigint FROM sandbox_provider_calls
              WHERE operation = 'authorize' AND payment_token = '{token}'"
        )
    };
    assert_eq!(support::scalar(&pool, &calls("tok_visa")).await, 1);
    assert_eq!(
        support::scalar(&pool, &calls("tok_flaky_1")).await,
        1,
        "the failed event was run again"
    );

    // Received again, alone: the provider now approves it.
    let again = runtime::execute(&*payments, &pool, &events[0], 2).await;
    assert!(applied(&again), "{again:?}");
    assert_eq!(payment(&pool, "flk-g-1").await.0, "authorized");
}

fn cancelled(order_id: &str, sku: &str, total_minor: i64) -> Envelope {
    use orderfleet::domain::events::{CancelReason, Meta, OrderCancelled, SkuQuantity};
    envelope(
        "OrderCancelled",
        &OrderCancelled {
            meta: Meta::default(),
            order_id: order_id.into(),
            reason: CancelReason::Requested,
            lines: vec![SkuQuantity {
                sku: sku.into(),
                quantity: 1,
            }],
            total: eur(total_minor),
        },
    )
}

/// A payment row's keys and provider references: (authorize_key, authorization_id, void_key,
/// capture_id, refund_id).
async fn payment_refs(pool: &deadpool_postgres::Pool, order_id: &str) -> [Option<String>; 5] {
    let c = pool.get().await.unwrap();
    let r = c
        .query_one(
            "SELECT authorize_key, authorization_id, void_key, capture_id, refund_id
               FROM payments WHERE order_id = $1",
            &[&order_id],
        )
        .await
        .unwrap();
    [r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)]
}

#[tokio::test]
async fn payments_created_and_settled_inside_one_group_are_written_as_they_ended() {
    use orderfleet::domain::events::{DeliveryFailed, Meta, OrderShipped, SkuQuantity};
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "PAY-G", 999, 10).await;
    let ids = vec!["pay-g-1".to_string(), "pay-g-2".to_string()];
    let accepted = accepted_orders(&fleet, &ids, "PAY-G", "tok_visa").await;
    let payments = fleet.handler(HandlerName::Payments).unwrap();

    // Order 1 is authorized; order 2 is authorized and cancelled in the same transaction;
    // order 3 is cancelled before it was ever accepted (the cancellation overtook it).
    let events = vec![
        accepted[0].clone(),
        accepted[1].clone(),
        cancelled("pay-g-2", "PAY-G", 999),
        cancelled("pay-g-3", "PAY-G", 999),
    ];
    let outcome = execute_group(&*payments, &pool, &refs(&events, 1)).await;
    assert_eq!(outcome.transactions, 1, "{:?}", outcome.results);
    assert!(outcome.results.iter().all(applied), "{:?}", outcome.results);
    assert_eq!(payment(&pool, "pay-g-1").await.0, "authorized");
    assert_eq!(payment(&pool, "pay-g-2").await.0, "voided");
    assert_eq!(payment(&pool, "pay-g-3").await.0, "voided");
    let [auth_key, auth_id, void_key, _, _] = payment_refs(&pool, "pay-g-2").await;
    assert_eq!(auth_key.as_deref(), Some("auth:pay-g-2"));
    assert!(
        auth_id.is_some(),
        "the voided hold keeps its authorization id"
    );
    assert_eq!(void_key.as_deref(), Some("void:pay-g-2"));
    assert_eq!(
        provider_call(&pool, "void:pay-g-2").await.map(|c| c.0),
        Some(1)
    );
    assert_eq!(
        provider_call(&pool, "void:pay-g-3").await,
        None,
        "nothing to void"
    );
    assert_eq!(emitted(&pool, "PaymentAuthorized", None).await.len(), 2);
    assert_eq!(emitted(&pool, "PaymentVoided", None).await.len(), 2);

    // Order 1 ships and comes back in one transaction: captured, then refunded.
    let lines = vec![SkuQuantity {
        sku: "PAY-G".into(),
        quantity: 1,
    }];
    let events = vec![
        envelope(
            "OrderShipped",
            &OrderShipped {
                meta: Meta::default(),
                order_id: "pay-g-1".into(),
                carrier: "sandbox".into(),
                tracking_number: "T-PAY-G-1".into(),
                lines: lines.clone(),
                shipped_at: Utc::now(),
            },
        ),
        envelope(
            "DeliveryFailed",
            &DeliveryFailed {
                meta: Meta::default(),
                order_id: "pay-g-1".into(),
                tracking_number: "T-PAY-G-1".into(),
                reason: "refused".into(),
                lines,
            },
        ),
    ];
    let outcome = execute_group(&*payments, &pool, &refs(&events, 1)).await;
    assert_eq!(outcome.transactions, 1, "{:?}", outcome.results);
    assert!(outcome.results.iter().all(applied), "{:?}", outcome.results);
    assert_eq!(
        payment(&pool, "pay-g-1").await,
        ("refunded".into(), 999, 999)
    );
    let [_, _, _, capture_id, refund_id] = payment_refs(&pool, "pay-g-1").await;
    assert!(capture_id.is_some() && refund_id.is_some());
    assert_eq!(net_money(&pool, "pay-g-1").await, 0);
    assert_ledger_balances(&pool).await;
}

#[tokio::test]
async fn a_payment_row_created_meanwhile_by_an_event_run_alone_sends_the_group_to_run_alone() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "PAY-R", 999, 10).await;
    let ids = vec!["pay-r-1".to_string(), "pay-r-2".to_string()];
    let accepted = accepted_orders(&fleet, &ids, "PAY-R", "tok_visa").await;
    let payments = fleet.handler(HandlerName::Payments).unwrap();

    // A rival that does not take the order's advisory lock (events run alone take it now; a
    // worker of an older version did not) has created its row and not committed yet: the
    // group reads no row for it.
    let mut other = pool.get().await.unwrap();
    let other = other.transaction().await.unwrap();
    other
        .execute(
            "INSERT INTO payments (order_id, state, amount_minor, currency, payment_token)
             VALUES ('pay-r-1', 'pending', 999, 'EUR', 'tok_visa')",
            &[],
        )
        .await
        .unwrap();
    let group = {
        let (payments, pool, events) = (payments.clone(), pool.clone(), accepted.clone());
        tokio::spawn(async move { execute_group(&*payments, &pool, &refs(&events, 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    other.commit().await.unwrap();
    let outcome = group.await.unwrap();

    // The group's insert of order 1's row failed; both events then ran alone.
    assert_eq!(outcome.transactions, 3, "{:?}", outcome.results);
    assert!(outcome.results.iter().all(applied), "{:?}", outcome.results);
    // Each order was authorized once: one event, naming the hold its row records (a call
    // repeated with its key gets the hold the provider decided the first time).
    for id in &ids {
        assert_eq!(payment(&pool, id).await.0, "authorized");
        let events = emitted(&pool, "PaymentAuthorized", Some(id)).await;
        assert_eq!(events.len(), 1, "{events:?}");
        let [_, authorization_id, _, _, _] = payment_refs(&pool, id).await;
        assert_eq!(
            events[0]["authorization_id"].as_str(),
            authorization_id.as_deref()
        );
    }
}

#[tokio::test]
async fn shipping_and_stopping_one_order_in_one_group_keep_the_first_decision() {
    use orderfleet::domain::events::{Contact, Meta, OrderReadyToShip, ShipmentCancelRequested};
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    let fulfillment = fleet.handler(HandlerName::Fulfillment).unwrap();
    let ready = |order_id: &str| {
        let placed = order(order_id, &[("SHIP-G", 1, 999)], "tok_visa");
        envelope(
            "OrderReadyToShip",
            &OrderReadyToShip {
                meta: Meta::default(),
                order_id: order_id.into(),
                customer: Contact {
                    id: placed.customer.id,
                    email: placed.customer.email.unwrap(),
                    name: placed.customer.name,
                },
                lines: vec![orderfleet::domain::events::SkuQuantity {
                    sku: "SHIP-G".into(),
                    quantity: 1,
                }],
                shipping_address: placed.shipping_address,
            },
        )
    };
    let stop = |order_id: &str| {
        envelope(
            "ShipmentCancelRequested",
            &ShipmentCancelRequested {
                meta: Meta::default(),
                order_id: order_id.into(),
            },
        )
    };
    // Order 1 ships, then its stop comes too late; order 2 is stopped before it ships.
    let events = vec![
        ready("ship-g-1"),
        stop("ship-g-1"),
        stop("ship-g-2"),
        ready("ship-g-2"),
    ];
    let outcome = execute_group(&*fulfillment, &pool, &refs(&events, 1)).await;
    assert_eq!(outcome.transactions, 1, "{:?}", outcome.results);
    assert!(outcome.results.iter().all(applied), "{:?}", outcome.results);
    assert_eq!(shipment(&pool, "ship-g-1").await, "shipped");
    assert_eq!(shipment(&pool, "ship-g-2").await, "cancelled");
    assert_eq!(history(&pool, "ship-g-1").await[0], "OrderShipped");
    assert!(!history(&pool, "ship-g-1")
        .await
        .contains(&"ShipmentCancelled".to_string()));
    assert_eq!(history(&pool, "ship-g-2").await, vec!["ShipmentCancelled"]);
    // The stop came first in the group: order 2 was never handed to the carrier.
    let handed_over = support::scalar(
        &pool,
        "SELECT count(*) FROM sandbox_carrier_parcels
          WHERE idempotency_key = 'ship-g-2' AND shipped_at IS NOT NULL",
    )
    .await;
    assert_eq!(handed_over, 0);

    // Delivered again, each event is a duplicate; new ones of the same orders change nothing.
    let again = vec![ready("ship-g-2"), stop("ship-g-1")];
    let outcome = execute_group(&*fulfillment, &pool, &refs(&again, 1)).await;
    assert!(outcome.results.iter().all(applied), "{:?}", outcome.results);
    assert_eq!(shipment(&pool, "ship-g-1").await, "shipped");
    assert_eq!(shipment(&pool, "ship-g-2").await, "cancelled");
    assert_eq!(history(&pool, "ship-g-2").await, vec!["ShipmentCancelled"]);
}

/// A shipment row's state.
async fn shipment(pool: &deadpool_postgres::Pool, order_id: &str) -> String {
    let c = pool.get().await.unwrap();
    c.query_one(
        "SELECT state FROM shipments WHERE order_id = $1",
        &[&order_id],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn orders_placed_in_one_group_see_early_cancellations_repeats_and_unknown_skus() {
    use orderfleet::domain::events::Meta;
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "PLACE-G", 999, 10).await;
    let orders = fleet.handler(HandlerName::Orders).unwrap();
    let placed = |id: &str, sku: &str| order(id, &[(sku, 1, 999)], "tok_visa");
    // A cancellation that arrived, and committed, before its order.
    let early = envelope("OrderCancellationRequested", &cancellation("place-g-1"));
    assert!(applied(&runtime::execute(&*orders, &pool, &early, 1).await));
    // The storefront placing order 3 a second time, under a new event id.
    let mut again = placed("place-g-3", "PLACE-G");
    again.meta = Meta::with_id("placed-again-place-g-3");
    let events = vec![
        envelope("OrderPlaced", &placed("place-g-1", "PLACE-G")),
        envelope("OrderCancellationRequested", &cancellation("place-g-2")),
        envelope("OrderPlaced", &placed("place-g-2", "PLACE-G")),
        envelope("OrderPlaced", &placed("place-g-3", "PLACE-G")),
        envelope("OrderPlaced", &again),
        envelope("OrderPlaced", &placed("place-g-4", "NO-SUCH-SKU")),
    ];
    let outcome = execute_group(&*orders, &pool, &refs(&events, 1)).await;
    assert_eq!(outcome.transactions, 1, "{:?}", outcome.results);
    assert!(outcome.results.iter().all(applied), "{:?}", outcome.results);
    for id in ["place-g-1", "place-g-2"] {
        assert_eq!(status(&pool, id).await, "cancelling", "{id}");
        assert_eq!(history(&pool, id).await, vec!["OrderCancelled"], "{id}");
    }
    assert_eq!(status(&pool, "place-g-3").await, "accepted");
    assert_eq!(history(&pool, "place-g-3").await, vec!["OrderAccepted"]);
    assert_eq!(status(&pool, "place-g-4").await, "rejected");
    let rejected = emitted(&pool, "OrderRejected", Some("place-g-4")).await;
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0].to_string().contains("NO-SUCH-SKU"),
        "{}",
        rejected[0]
    );
}

#[tokio::test]
async fn outcomes_handled_in_one_group_emit_what_each_order_needs_downstream() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "OUT-A", 700, 10).await;
    stock_sku(&fleet, "OUT-B", 300, 10).await;
    let ids = vec!["out-g-1".to_string(), "out-g-2".to_string()];
    let lines = vec![
        vec![("OUT-B", 2, 300), ("OUT-A", 1, 700)],
        vec![("OUT-A", 3, 700)],
    ];
    let accepted = accepted_orders_of(&fleet, &ids, &lines, "tok_visa").await;
    for name in [HandlerName::Inventory, HandlerName::Payments] {
        let handler = fleet.handler(name).unwrap();
        let outcome = execute_group(&*handler, &pool, &refs(&accepted, 1)).await;
        assert!(outcome.results.iter().all(applied), "{:?}", outcome.results);
    }
    let outcomes = fleet.take(4).await.unwrap();
    assert_eq!(outcomes.len(), 4);
    let orders = fleet.handler(HandlerName::Orders).unwrap();
    let outcome = execute_group(&*orders, &pool, &refs(&outcomes, 1)).await;
    assert_eq!(outcome.transactions, 1, "{:?}", outcome.results);
    assert!(outcome.results.iter().all(applied), "{:?}", outcome.results);

    for (id, lines) in ids.iter().zip(&lines) {
        assert_eq!(status(&pool, id).await, "ready_to_ship");
        let ready = emitted(&pool, "OrderReadyToShip", Some(id)).await;
        assert_eq!(ready.len(), 1, "{id}: {ready:?}");
        let r = &ready[0];
        assert_eq!(r["customer"]["email"], "ada@example.com");
        assert_eq!(r["customer"]["name"], "Ada Lovelace");
        assert_eq!(r["shipping_address"]["city"], "London");
        let got: Vec<(String, i64)> = r["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["sku"].as_str().unwrap().to_string(),
                    l["quantity"].as_i64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, i64)> = lines.iter().map(|(s, q, _)| (s.to_string(), *q)).collect();
        assert_eq!(got, want, "{id}: the lines, in line order");
    }
}

/// Inventory's group lock finds its stock rows by the primary key in a large catalogue, under
/// a generic plan (what a connection keeps after a few executions) and a custom one, at
/// PostgreSQL's default cost settings. The shape it replaced (`sku = ANY($1) OR sku IN
/// (SELECT ...)`) returns the same rows but reads every stock row and filters it, so each group
/// cost as much as the catalogue is large; the test checks that it tells the two apart.
#[tokio::test]
async fn inventory_locks_a_groups_stock_through_the_index_in_a_large_catalogue() {
    use orderfleet::handlers::inventory::LOCK_GROUP_STOCK;
    const REPLACED: &str = "SELECT sku, on_hand, reserved FROM stock
      WHERE sku = ANY($1) OR sku IN (SELECT sku FROM reservations WHERE order_id = ANY($2))
      ORDER BY sku FOR UPDATE";

    let (pool, _) = support::fresh_db().await;
    let db = pool.get().await.unwrap();
    db.batch_execute(&format!(
        "INSERT INTO stock (sku, on_hand, reserved)
           SELECT 'SKU-' || lpad(g::text, 6, '0'), 10, 0 FROM generate_series(1, 50000) g;
         INSERT INTO reservations (order_id, sku, quantity, state)
           SELECT 'ord-' || lpad(g::text, 5, '0'), 'SKU-' || lpad((g * 7)::text, 6, '0'), 1,
                  'reserved'
             FROM generate_series(1, 5000) g;
         ANALYZE stock; ANALYZE reservations;
         SET random_page_cost = 4; SET seq_page_cost = 1; SET cpu_tuple_cost = 0.01;
         PREPARE lock_group_stock(text[], text[]) AS {LOCK_GROUP_STOCK};
         PREPARE replaced(text[], text[]) AS {REPLACED};"
    ))
    .await
    .unwrap();
    // SKU-000014 is named by an event and reserved by ord-00002: listed once.
    let args = "('{SKU-000003,SKU-000014,SKU-000001}', '{ord-00002,ord-00010}')";
    for mode in ["force_generic_plan", "force_custom_plan"] {
        db.batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        for statement in ["lock_group_stock", "replaced"] {
            let got: Vec<String> = db
                .simple_query(&format!("EXECUTE {statement}{args}"))
                .await
                .unwrap()
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                })
                .collect();
            assert_eq!(
                got,
                ["SKU-000001", "SKU-000003", "SKU-000014", "SKU-000070"],
                "{mode}, {statement}: the named SKUs and the orders' reserved ones, in key order"
            );
        }
        let new = stock_scans_of(&db, &format!("lock_group_stock{args}")).await;
        assert!(by_key(&new), "{mode}: stock not looked up by key: {new:?}");
        let old = stock_scans_of(&db, &format!("replaced{args}")).await;
        assert!(
            !by_key(&old),
            "{mode}: the replaced shape looked up by key: {old:?}"
        );
    }
}

/// Whether every read of `stock` in a plan goes by an index condition and filters nothing.
fn by_key(scans: &[serde_json::Value]) -> bool {
    !scans.is_empty()
        && scans.iter().all(|n| {
            (n["Index Cond"].is_string() || n["Recheck Cond"].is_string()) && n["Filter"].is_null()
        })
}

/// The plan nodes that read `stock` when `execute` (a prepared statement and its arguments)
/// runs.
async fn stock_scans_of(db: &tokio_postgres::Client, execute: &str) -> Vec<serde_json::Value> {
    let plan: serde_json::Value = db
        .query_one(&format!("EXPLAIN (FORMAT JSON) EXECUTE {execute}"), &[])
        .await
        .unwrap()
        .get(0);
    let mut scans = Vec::new();
    stock_scans(&plan[0]["Plan"], &mut scans);
    scans
}

/// The plan nodes that read `stock`, depth first.
fn stock_scans(node: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    if node["Relation Name"] == "stock" {
        let mut scan = node.clone();
        scan.as_object_mut().unwrap().remove("Plans");
        out.push(scan);
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        stock_scans(child, out);
    }
}

/// An `OrderShipped` of `order_id` under event id `event_id`.
fn shipped_event(event_id: &str, order_id: &str) -> Envelope {
    use orderfleet::domain::events::{Meta, OrderShipped, SkuQuantity};
    envelope(
        "OrderShipped",
        &OrderShipped {
            meta: Meta::with_id(event_id),
            order_id: order_id.into(),
            carrier: "sandbox".into(),
            tracking_number: format!("T-{order_id}"),
            lines: vec![SkuQuantity {
                sku: "SKU-1".into(),
                quantity: 1,
            }],
            shipped_at: Utc::now(),
        },
    )
}

#[tokio::test]
async fn storefront_events_in_one_group_write_back_once_and_a_refused_one_is_judged_alone() {
    use orderfleet::domain::events::Currency;
    use orderfleet::domain::platform::Platform;
    use orderfleet::handlers::storefront::Storefront;
    use orderfleet::handlers::AnyHandler;
    use orderfleet::providers::platform::{http::JsonClient, shopify::Shopify, Sandbox};
    use std::sync::Arc;

    let (pool, _) = support::fresh_db().await;
    let storefront = |apis: Vec<Arc<dyn orderfleet::providers::platform::PlatformApi>>| {
        Storefront::new(
            apis,
            Currency::new("USD").unwrap(),
            pool.clone(),
            Duration::from_secs(5),
        )
    };
    // Grouped with the sandbox write-back; not with a live API, whose calls would hold up
    // the group.
    let live = Arc::new(Shopify::new(
        JsonClient::new(Duration::from_secs(5)),
        "token".into(),
        None,
    ));
    assert!(!AnyHandler::group_commit(&storefront(vec![live])));
    let sandbox = storefront(vec![Arc::new(Sandbox::new(
        Platform::Shopify,
        pool.clone(),
    ))]);
    assert!(AnyHandler::group_commit(&sandbox));

    // One order from Shopify, one from commercetools (whose API this fleet does not have),
    // and orders of our own.
    pool.get()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO platform_orders (order_id, platform, platform_order_id, shop, order_number)
             VALUES ('shopify-1', 'shopify', 'gid://shopify/Order/1', 'tea.myshopify.com', '#1'),
                    ('shopify-2', 'shopify', 'gid://shopify/Order/2', 'tea.myshopify.com', '#2'),
                    ('ct-1', 'commercetools', 'ct-order-1', 'tea-project', '1')",
        )
        .await
        .unwrap();
    let sandbox_calls = || async {
        let rows = pool
            .get()
            .await
            .unwrap()
            .query(
                "SELECT s.idempotency_key, s.calls, p.state, p.attempts
                   FROM sandbox_platform_calls s
                   JOIN platform_calls p USING (idempotency_key) ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect::<Vec<(String, i32, String, i32)>>()
    };

    let events = vec![
        shipped_event("s-shopify", "shopify-1"),
        shipped_event("s-own-1", "own-1"),
        // The same shipment under another event id: one write-back.
        shipped_event("s-shopify-again", "shopify-1"),
        shipped_event("s-own-2", "own-2"),
        // A redelivery of an event of this group.
        shipped_event("s-own-1", "own-1"),
    ];
    let outcome = execute_group(&sandbox, &pool, &refs(&events, 1)).await;
    assert_eq!(outcome.transactions, 1, "{:?}", outcome.results);
    assert!(
        outcome.results[..4].iter().all(applied),
        "{:?}",
        outcome.results
    );
    assert!(matches!(outcome.results[4], Ok(Executed::Duplicate)));
    assert_eq!(
        sandbox_calls().await,
        vec![("fulfill:shopify-1".into(), 1, "done".into(), 1)]
    );

    // A refused write-back (no commercetools API here) rolls its group back: it is judged
    // alone, and the rest commit together. The Shopify write-back before it in the group was
    // made and recorded as done (committed at once, outside the group's transaction), so the
    // regrouped rest do not make it again.
    let events = vec![
        shipped_event("s-shopify-2", "shopify-2"),
        shipped_event("s-ct", "ct-1"),
        shipped_event("s-own-3", "own-3"),
    ];
    let outcome = execute_group(&sandbox, &pool, &refs(&events, 1)).await;
    let results = &outcome.results;
    assert!(applied(&results[0]) && applied(&results[2]), "{results:?}");
    assert!(
        matches!(&results[1], Err(HandlerError::Permanent { reason })
            if reason.contains("no commercetools API is configured")),
        "{:?}",
        results[1]
    );
    assert_eq!(outcome.transactions, 3, "{results:?}");
    assert_eq!(
        sandbox_calls().await,
        vec![
            ("fulfill:shopify-1".into(), 1, "done".into(), 1),
            ("fulfill:shopify-2".into(), 1, "done".into(), 1),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rival_storefront_groups_writing_back_the_same_orders_in_opposite_order_do_not_stall() {
    use orderfleet::domain::events::Currency;
    use orderfleet::domain::platform::Platform;
    use orderfleet::handlers::storefront::Storefront;
    use orderfleet::providers::platform::Sandbox;
    use std::sync::Arc;

    let (pool, _) = support::fresh_db().await;
    let storefront = Arc::new(Storefront::new(
        vec![Arc::new(Sandbox::new(Platform::Shopify, pool.clone()))],
        Currency::new("USD").unwrap(),
        pool.clone(),
        Duration::from_secs(5),
    ));
    let ids: Vec<String> = (1..=8).map(|i| format!("shopify-{i}")).collect();
    let client = pool.get().await.unwrap();
    for id in &ids {
        client
            .execute(
                "INSERT INTO platform_orders (order_id, platform, platform_order_id, shop)
                 VALUES ($1, 'shopify', 'gid://shopify/Order/' || $1, 'tea.myshopify.com')",
                &[id],
            )
            .await
            .unwrap();
    }
    // Two processes' groups at once, each with every order's shipment (under event ids of
    // its own), in opposite orders. Had a group held a write-back's row until its commit,
    // each would wait for the other on a connection PostgreSQL cannot tie to it, until the
    // handler timeout.
    let mut events: Vec<Envelope> = ids
        .iter()
        .map(|id| shipped_event(&format!("a-{id}"), id))
        .collect();
    events.extend(
        ids.iter()
            .rev()
            .map(|id| shipped_event(&format!("b-{id}"), id)),
    );
    tokio::time::timeout(
        Duration::from_secs(20),
        groups_at_once(storefront, &pool, &events, ids.len()),
    )
    .await
    .expect("the groups stalled");

    // Every order written back and recorded as done; a call the two groups raised for (both
    // recorded it before either had the answer) is asked twice with one key, never more.
    let rows = client
        .query(
            "SELECT s.calls, p.state FROM sandbox_platform_calls s
               JOIN platform_calls p USING (idempotency_key)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), ids.len());
    for row in rows {
        let (calls, state): (i32, String) = (row.get(0), row.get(1));
        assert_eq!(state, "done");
        assert!((1..=2).contains(&calls), "{calls} calls");
    }
}
