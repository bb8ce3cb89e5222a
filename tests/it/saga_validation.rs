//! Orders validates OrderPlaced at the edge: an invalid order becomes an OrderRejected with its
//! reasons, not a crash or a retry loop, and the fleet goes on.

use crate::support;
use crate::support::saga::*;
use orderfleet::domain::events::{Currency, Money, OrderPlaced};
use orderfleet::domain::outcome::FailureKind;

fn with(id: &str, change: impl FnOnce(&mut OrderPlaced)) -> OrderPlaced {
    let mut o = order(id, &[("TEA-1", 1, 1000)], "tok_visa");
    change(&mut o);
    o
}

#[tokio::test]
async fn each_kind_of_invalid_order_is_rejected_with_its_reason() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 10).await;
    stock_sku(&fleet, "CUP-1", 500, 10).await;

    let usd = Currency::new("USD").unwrap();
    let cases: Vec<(OrderPlaced, &str)> = vec![
        (
            with("bad-zero", |o| o.lines[0].quantity = 0),
            "invalid_quantity",
        ),
        (
            with("bad-negative", |o| o.lines[0].quantity = -3),
            "invalid_quantity",
        ),
        (
            with("bad-price", |o| o.lines[0].unit_price.amount_minor = -1),
            "invalid_price",
        ),
        (
            with("bad-mixed", |o| {
                o.lines.push(orderfleet::domain::events::PlacedLine {
                    sku: "CUP-1".into(),
                    quantity: 1,
                    unit_price: Money::new(500, usd),
                })
            }),
            "mixed_currencies",
        ),
        (
            with("bad-sku", |o| o.lines[0].sku = "NOPE-9".into()),
            "unknown_sku",
        ),
        (
            with("bad-no-email", |o| o.customer.email = None),
            "missing_email",
        ),
        (
            with("bad-empty-email", |o| o.customer.email = Some(" ".into())),
            "missing_email",
        ),
        (
            with("bad-email", |o| {
                o.customer.email = Some("ada.example.com".into())
            }),
            "invalid_email",
        ),
        (
            with("bad-customer", |o| o.customer.id = String::new()),
            "missing_customer",
        ),
        (
            with("bad-token", |o| o.payment_token = String::new()),
            "missing_payment_token",
        ),
        (with("bad-lines", |o| o.lines.clear()), "no_lines"),
        (
            with("bad-overflow", |o| {
                o.lines[0].quantity = i64::MAX / 2;
                o.lines[0].unit_price.amount_minor = 10;
            }),
            "total_overflow",
        ),
        (
            // Each line fits, their sum does not.
            with("bad-sum-overflow", |o| {
                o.lines[0].quantity = 1;
                o.lines[0].unit_price.amount_minor = i64::MAX;
                o.lines.push(o.lines[0].clone());
            }),
            "total_overflow",
        ),
    ];
    for (placed, _) in &cases {
        fleet.publish_event(placed).await.unwrap();
    }
    // The fleet goes on: a valid order after them all completes.
    fleet
        .publish_event(&order("good", &[("TEA-1", 1, 1000)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    for (placed, code) in &cases {
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
        assert!(codes.contains(code), "{id}: expected {code} in {codes:?}");
        assert!(
            rejected[0]["reasons"][0]["message"].as_str().unwrap().len() > 5,
            "{id}: a reason has a message"
        );
        assert!(
            emitted(&pool, "OrderAccepted", Some(id)).await.is_empty(),
            "{id}"
        );
        assert!(
            provider_call(&pool, &format!("auth:{id}")).await.is_none(),
            "{id}"
        );
    }
    assert_eq!(status(&pool, "good").await, "completed");
    assert_eq!(stock(&pool, "TEA-1").await, (9, 0));
}

#[tokio::test]
async fn an_order_with_several_problems_lists_every_reason() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 10).await;
    let placed = with("bad-many", |o| {
        o.customer.email = None;
        o.lines[0].quantity = 0;
        o.lines.push(orderfleet::domain::events::PlacedLine {
            sku: "NOPE-1".into(),
            quantity: 1,
            unit_price: Money::new(1, Currency::new("GBP").unwrap()),
        });
    });
    fleet.publish_event(&placed).await.unwrap();
    fleet.run_until_quiet().await.unwrap();

    let rejected = emitted(&pool, "OrderRejected", Some("bad-many")).await;
    let mut codes: Vec<&str> = rejected[0]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "invalid_quantity",
            "missing_email",
            "mixed_currencies",
            "unknown_sku"
        ]
    );
    let c = pool.get().await.unwrap();
    let stored: serde_json::Value = c
        .query_one(
            "SELECT rejection_reasons FROM orders WHERE id = 'bad-many'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, rejected[0]["reasons"]);
}

#[tokio::test]
async fn an_undecodable_order_is_poison_and_the_fleet_goes_on() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 10).await;
    // No order id, and a currency that is not ISO 4217: no order to reject, so poison.
    fleet
        .publish(
            "OrderPlaced",
            &serde_json::json!({"event_id": "junk-1", "lines": "many"}),
        )
        .await
        .unwrap();
    let mut bad_currency =
        serde_json::to_value(order("bad-cur", &[("TEA-1", 1, 1000)], "tok_visa")).unwrap();
    bad_currency["lines"][0]["unit_price"]["currency"] = "euro".into();
    fleet.publish("OrderPlaced", &bad_currency).await.unwrap();
    fleet
        .publish_event(&order("good", &[("TEA-1", 1, 1000)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    let dead = fleet.dead_letters();
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.kind == FailureKind::Poison));
    assert!(dead[1].reason.contains("ISO 4217"), "{}", dead[1].reason);
    assert_eq!(status(&pool, "good").await, "completed");
}

#[tokio::test]
async fn an_outcome_event_of_a_newer_schema_version_is_refused_not_applied() {
    use orderfleet::domain::names::HandlerName;
    use orderfleet::domain::outcome::HandlerError;
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 10).await;
    fleet
        .publish_event(&order("ord-v2", &[("TEA-1", 1, 1000)], "tok_visa"))
        .await
        .unwrap();
    // Deliver until inventory's answer comes up, and hand orders a version-2 copy of it.
    let reserved = fleet.deliver_until("InventoryReserved").await.unwrap();
    let mut newer = reserved.clone();
    newer.id = "eb-v2".into();
    newer.detail["version"] = 2.into();
    newer.detail["event_id"] = "evt-v2".into();
    match fleet.deliver_to(HandlerName::Orders, &newer, 1).await {
        Err(HandlerError::Permanent { reason }) => {
            assert!(reason.contains("version 2"), "{reason}")
        }
        other => panic!("a version-2 event was not refused: {other:?}"),
    }
    let reservation = support::scalar(
        &pool,
        "SELECT count(*) FROM orders WHERE id = 'ord-v2' AND reservation_state = 'reserved'",
    )
    .await;
    assert_eq!(reservation, 0, "the newer event was applied");

    // The version-1 event still goes through, and the order completes.
    fleet.deliver(&reserved).await;
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(status(&pool, "ord-v2").await, "completed");
}
