//! The order saga end to end, in process: placed, accepted, reserved and authorized, ready,
//! shipped, captured, delivered, completed.

use crate::support::saga::*;

#[tokio::test]
async fn a_placed_order_is_shipped_captured_and_completed() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1250, 10).await;
    stock_sku(&fleet, "CUP-1", 800, 4).await;

    fleet
        .publish_event(&order(
            "ord-1",
            &[("TEA-1", 2, 1250), ("CUP-1", 1, 800)],
            "tok_visa",
        ))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    let row = order_row(&pool, "ord-1").await;
    assert_eq!(row.status, "completed");
    assert_eq!(
        (
            row.reservation.as_str(),
            row.payment.as_str(),
            row.delivery.as_str()
        ),
        ("committed", "captured", "delivered")
    );
    assert_eq!(row.total_minor, Some(2 * 1250 + 800));
    assert!(row.tracking_number.unwrap().starts_with("SBX"));

    let history = history(&pool, "ord-1").await;
    for expected in [
        "OrderAccepted",
        "InventoryReserved",
        "PaymentAuthorized",
        "OrderReadyToShip",
        "OrderShipped",
        "OrderDelivered",
        "InventoryCommitted",
        "PaymentCaptured",
        "OrderCompleted",
    ] {
        assert_eq!(
            history.iter().filter(|t| *t == expected).count(),
            1,
            "{expected} once in {history:?}"
        );
    }

    // Stock left the warehouse; nothing stays reserved.
    assert_eq!(stock(&pool, "TEA-1").await, (8, 0));
    assert_eq!(stock(&pool, "CUP-1").await, (3, 0));
    assert_reservations_match_stock(&pool).await;
    assert_movements_match_stock(&pool).await;

    // Captured exactly the total, once; the ledger balances.
    assert_eq!(payment(&pool, "ord-1").await, ("captured".into(), 3300, 0));
    assert_ledger_balances(&pool).await;
    let ledger = ledger(&pool).await;
    assert_eq!(ledger.get("payments_clearing:EUR"), Some(&3300));
    assert_eq!(ledger.get("sales_revenue:EUR"), Some(&-3300));
    assert_eq!(net_money(&pool, "ord-1").await, 3300);

    let completed = emitted(&pool, "OrderCompleted", Some("ord-1")).await;
    assert_eq!(completed[0]["total"]["amount_minor"], 3300);
    assert_eq!(completed[0]["total"]["currency"], "EUR");
    assert_eq!(completed[0]["version"], 1);
    assert!(completed[0]["event_id"].is_string());
}

#[tokio::test]
async fn accepted_orders_carry_what_downstream_consumers_need() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1250, 10).await;
    fleet
        .publish_event(&order("ord-2", &[("TEA-1", 3, 1250)], "tok_visa"))
        .await
        .unwrap();
    fleet.step().await.unwrap();

    let accepted = emitted(&pool, "OrderAccepted", Some("ord-2")).await;
    let a = &accepted[0];
    assert_eq!(a["customer"]["email"], "ada@example.com");
    assert_eq!(a["customer"]["name"], "Ada Lovelace");
    assert!(
        a.get("payment_token").is_none(),
        "the token stays with payments"
    );
    assert_eq!(
        a["total"],
        serde_json::json!({"amount_minor": 3750, "currency": "EUR"})
    );
    assert_eq!(a["lines"][0]["sku"], "TEA-1");
    assert_eq!(a["shipping_address"]["country"], "GB");
    assert_eq!(status(&pool, "ord-2").await, "accepted");
}
