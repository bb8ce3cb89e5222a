//! Every compensation path of the order saga ends in a terminal state with money and stock
//! settled.

use crate::support::saga::*;

#[tokio::test]
async fn stock_short_voids_the_authorization_and_cancels() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 1).await;

    fleet
        .publish_event(&order("ord-short", &[("TEA-1", 2, 1000)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    let row = order_row(&pool, "ord-short").await;
    assert_eq!(row.status, "cancelled");
    assert_eq!(row.reservation, "released");
    assert_eq!(row.payment, "voided");
    // The hold was placed, then voided at the provider; no money moved.
    assert!(provider_call(&pool, "auth:ord-short").await.is_some());
    assert!(provider_call(&pool, "void:ord-short").await.is_some());
    assert_eq!(payment(&pool, "ord-short").await, ("voided".into(), 0, 0));
    assert_eq!(net_money(&pool, "ord-short").await, 0);
    assert_eq!(stock(&pool, "TEA-1").await, (1, 0));
    let rejected = emitted(&pool, "InventoryRejected", Some("ord-short")).await;
    assert_eq!(rejected[0]["shortages"][0]["requested"], 2);
    assert_eq!(rejected[0]["shortages"][0]["available"], 1);
    let cancelled = emitted(&pool, "OrderCancelled", Some("ord-short")).await;
    assert_eq!(cancelled[0]["reason"], "out_of_stock");
    assert!(emitted(&pool, "OrderReadyToShip", Some("ord-short"))
        .await
        .is_empty());
}

#[tokio::test]
async fn a_declined_payment_releases_the_stock_and_cancels() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;

    for (id, token, code) in [
        ("ord-declined", "tok_decline", "card_declined"),
        ("ord-broke", "tok_insufficient_funds", "insufficient_funds"),
    ] {
        fleet
            .publish_event(&order(id, &[("TEA-1", 2, 1000)], token))
            .await
            .unwrap();
        fleet.run_until_quiet().await.unwrap();

        let row = order_row(&pool, id).await;
        assert_eq!(row.status, "cancelled", "{id}");
        assert_eq!(row.reservation, "released", "{id}");
        assert_eq!(row.payment, "voided", "{id}");
        let failed = emitted(&pool, "PaymentFailed", Some(id)).await;
        assert_eq!(failed[0]["code"], code);
        assert_eq!(failed[0]["stage"], "authorize");
        let cancelled = emitted(&pool, "OrderCancelled", Some(id)).await;
        assert_eq!(cancelled[0]["reason"], "payment_failed");
        // Nothing to void at the provider: the authorization never held.
        assert!(provider_call(&pool, &format!("void:{id}")).await.is_none());
    }
    assert_no_dead_letters(&fleet);
    assert_eq!(stock(&pool, "TEA-1").await, (5, 0));
    assert_reservations_match_stock(&pool).await;
    assert_movements_match_stock(&pool).await;
    assert!(ledger(&pool).await.is_empty());
}

#[tokio::test]
async fn a_cancellation_before_the_order_is_ready_voids_and_releases() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;

    // Both in the outbox before anything runs: orders accepts, then the cancellation arrives
    // while the reservation and authorization are still in flight.
    fleet
        .publish_event(&order("ord-c", &[("TEA-1", 2, 1000)], "tok_visa"))
        .await
        .unwrap();
    fleet.publish_event(&cancellation("ord-c")).await.unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    let row = order_row(&pool, "ord-c").await;
    assert_eq!(row.status, "cancelled");
    assert_eq!(
        (row.reservation.as_str(), row.payment.as_str()),
        ("released", "voided")
    );
    assert!(provider_call(&pool, "void:ord-c").await.is_some());
    assert_eq!(stock(&pool, "TEA-1").await, (5, 0));
    assert!(emitted(&pool, "OrderShipped", Some("ord-c"))
        .await
        .is_empty());
    assert_eq!(net_money(&pool, "ord-c").await, 0);
}

#[tokio::test]
async fn a_cancellation_while_ready_to_ship_stops_the_parcel_then_voids_and_releases() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    fleet
        .publish_event(&order("ord-r", &[("TEA-1", 1, 1000)], "tok_visa"))
        .await
        .unwrap();

    // Deliver events oldest first until OrderReadyToShip comes up; hold it back from
    // fulfillment.
    let ready = fleet.deliver_until("OrderReadyToShip").await.unwrap();
    assert_eq!(status(&pool, "ord-r").await, "ready_to_ship");

    fleet.publish_event(&cancellation("ord-r")).await.unwrap();
    fleet.run_until_quiet().await.unwrap();
    // The held OrderReadyToShip arrives late: fulfillment already stopped the parcel.
    fleet.deliver(&ready).await;
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    let history = history(&pool, "ord-r").await;
    assert!(
        history.contains(&"ShipmentCancelRequested".to_string()),
        "{history:?}"
    );
    assert!(
        history.contains(&"ShipmentCancelled".to_string()),
        "{history:?}"
    );
    assert!(
        !history.contains(&"OrderShipped".to_string()),
        "{history:?}"
    );
    let row = order_row(&pool, "ord-r").await;
    assert_eq!(row.status, "cancelled");
    assert_eq!(
        (row.reservation.as_str(), row.payment.as_str()),
        ("released", "voided")
    );
    assert_eq!(stock(&pool, "TEA-1").await, (5, 0));
    assert_eq!(net_money(&pool, "ord-r").await, 0);
}

#[tokio::test]
async fn a_cancellation_after_shipment_is_too_late() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    fleet
        .publish_event(&order("ord-late", &[("TEA-1", 1, 1000)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    fleet
        .publish_event(&cancellation("ord-late"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-late").await, "completed");
    assert_eq!(
        payment(&pool, "ord-late").await,
        ("captured".into(), 1000, 0)
    );
    assert_eq!(stock(&pool, "TEA-1").await, (4, 0));
}

#[tokio::test]
async fn a_cancellation_that_overtakes_its_order_cancels_it_on_arrival() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    fleet
        .publish_event(&cancellation("ord-early"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    fleet
        .publish_event(&order("ord-early", &[("TEA-1", 1, 1000)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-early").await, "cancelled");
    assert!(emitted(&pool, "OrderAccepted", Some("ord-early"))
        .await
        .is_empty());
    // Never accepted: no hold was ever placed.
    assert!(provider_call(&pool, "auth:ord-early").await.is_none());
    assert_eq!(stock(&pool, "TEA-1").await, (5, 0));
}

#[tokio::test]
async fn a_failed_delivery_after_capture_refunds_and_restocks() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    let mut placed = order("ord-ret", &[("TEA-1", 2, 1000)], "tok_visa");
    placed.shipping_address.postal_code =
        orderfleet::providers::carrier::UNDELIVERABLE_POSTAL_CODE.into();
    fleet.publish_event(&placed).await.unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    let row = order_row(&pool, "ord-ret").await;
    assert_eq!(row.status, "returned");
    assert_eq!(
        (
            row.reservation.as_str(),
            row.payment.as_str(),
            row.delivery.as_str()
        ),
        ("released", "refunded", "failed")
    );
    // Captured at shipment, then refunded in full.
    assert_eq!(
        payment(&pool, "ord-ret").await,
        ("refunded".into(), 2000, 2000)
    );
    assert!(provider_call(&pool, "capture:ord-ret").await.is_some());
    assert!(provider_call(&pool, "refund:ord-ret").await.is_some());
    assert_ledger_balances(&pool).await;
    let ledger = ledger(&pool).await;
    assert_eq!(ledger.get("payments_clearing:EUR"), Some(&0));
    assert_eq!(ledger.get("sales_revenue:EUR"), Some(&-2000));
    assert_eq!(ledger.get("refunds:EUR"), Some(&2000));
    assert_eq!(net_money(&pool, "ord-ret").await, 0);
    // The units left and came back.
    assert_eq!(stock(&pool, "TEA-1").await, (5, 0));
    let released = emitted(&pool, "InventoryReleased", Some("ord-ret")).await;
    assert_eq!(released[0]["reason"], "returned");
}

#[tokio::test]
async fn a_return_that_overtakes_its_shipment_voids_the_hold_instead_of_capturing() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    let mut placed = order("ord-fast", &[("TEA-1", 2, 1000)], "tok_visa");
    placed.shipping_address.postal_code =
        orderfleet::providers::carrier::UNDELIVERABLE_POSTAL_CODE.into();
    fleet.publish_event(&placed).await.unwrap();

    // Run until fulfillment has emitted OrderShipped and DeliveryFailed, then deliver them in
    // reverse order.
    loop {
        let waiting = fleet.take(1).await.unwrap();
        let event = waiting.first().expect("the saga stalled").clone();
        if event.detail_type == "OrderShipped" {
            let failed = fleet.take(1).await.unwrap().remove(0);
            assert_eq!(failed.detail_type, "DeliveryFailed");
            fleet.deliver(&failed).await;
            fleet.deliver(&event).await;
            break;
        }
        fleet.deliver(&event).await;
    }
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    let row = order_row(&pool, "ord-fast").await;
    assert_eq!(row.status, "returned");
    assert_eq!(payment(&pool, "ord-fast").await, ("voided".into(), 0, 0));
    assert!(provider_call(&pool, "capture:ord-fast").await.is_none());
    assert!(ledger(&pool).await.is_empty());
    assert_eq!(stock(&pool, "TEA-1").await, (5, 0));
    assert_reservations_match_stock(&pool).await;
    assert_movements_match_stock(&pool).await;
}

#[tokio::test]
async fn a_declined_capture_is_recorded_on_the_shipped_order() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    fleet
        .publish_event(&order(
            "ord-nocap",
            &[("TEA-1", 1, 1000)],
            orderfleet::providers::payment::tokens::CAPTURE_DECLINE,
        ))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    let row = order_row(&pool, "ord-nocap").await;
    // The parcel left and the money did not come: the order stays shipped, visibly so.
    assert_eq!(row.status, "shipped");
    assert_eq!(row.payment, "capture_failed");
    let failed = emitted(&pool, "PaymentFailed", Some("ord-nocap")).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["stage"], "capture");
    assert_eq!(
        payment(&pool, "ord-nocap").await,
        ("authorized".into(), 0, 0)
    );
    assert!(ledger(&pool).await.is_empty());

    // The report puts it in front of a person, without calling it a broken invariant.
    let report = orderfleet::operator::report::build(&mut pool.get().await.unwrap())
        .await
        .unwrap();
    assert!(report.holds(), "{:?}", report.violations);
    let attention = &report.needs_attention["capture_declined_after_shipment"];
    assert_eq!(attention.orders, 1);
    assert_eq!(attention.examples.len(), 1);
    assert!(
        attention.examples[0].starts_with("order ord-nocap (shipped): 1000 "),
        "{attention:?}"
    );
    let text = orderfleet::cli::report::render(&report);
    assert!(
        text.contains("Needs attention\n  capture_declined_after_shipment: 1 orders"),
        "{text}"
    );
}
