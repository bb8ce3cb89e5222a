//! The examples decode through the version check and round-trip, for every catalogued type.

use orderfleet::domain::catalogue;
use orderfleet::domain::events::*;
use orderfleet_testkit::examples::{envelope, example};

#[test]
fn storefront_events_that_change_stock_or_money_need_their_event_id() {
    let mut stock = example("StockReceived").unwrap();
    stock.as_object_mut().unwrap().remove("event_id");
    let err = decode::<StockReceived>(&envelope("StockReceived", &stock)).unwrap_err();
    assert_eq!(err.kind(), "permanent");
    assert!(err.to_string().contains("no event_id"), "{err}");
    let mut cancel = example("OrderCancellationRequested").unwrap();
    cancel.as_object_mut().unwrap().remove("event_id");
    decode::<OrderCancellationRequested>(&envelope("OrderCancellationRequested", &cancel)).unwrap();
}

#[test]
fn every_catalogued_event_has_an_example_that_round_trips() {
    macro_rules! round_trip {
        ($($ty:ty),*) => {{
            let mut checked = Vec::new();
            $(
                let json = example(<$ty>::DETAIL_TYPE).expect(<$ty>::DETAIL_TYPE);
                let env = envelope(<$ty>::DETAIL_TYPE, &json);
                let typed: $ty = decode(&env).expect(<$ty>::DETAIL_TYPE);
                assert_eq!(serde_json::to_value(&typed).unwrap(), json);
                assert_eq!(json["version"], <$ty>::VERSION);
                checked.push(<$ty>::DETAIL_TYPE);
            )*
            checked
        }};
    }
    let checked = round_trip!(
        OrderPlaced,
        OrderCancellationRequested,
        StockReceived,
        ProductUpserted,
        OrderAccepted,
        OrderRejected,
        OrderReadyToShip,
        OrderCancelled,
        OrderCompleted,
        ShipmentCancelRequested,
        InventoryReserved,
        InventoryRejected,
        InventoryReleased,
        InventoryCommitted,
        PaymentAuthorized,
        PaymentFailed,
        PaymentCaptured,
        PaymentVoided,
        PaymentRefunded,
        OrderShipped,
        OrderDelivered,
        DeliveryFailed,
        MarketingOptOut,
        RefundRequested,
        OperatorCancellationRequested,
        ShipmentCancelled
    );
    for spec in catalogue::EVENTS {
        assert!(
            checked.contains(&spec.detail_type),
            "{} has no typed payload",
            spec.detail_type
        );
    }
    assert_eq!(checked.len(), catalogue::EVENTS.len());
}

#[test]
fn a_detail_that_does_not_match_is_poison_and_an_unknown_version_is_permanent() {
    let env = envelope("StockReceived", &serde_json::json!({"sku": "x"}));
    assert_eq!(decode::<StockReceived>(&env).unwrap_err().kind(), "poison");
    let env = envelope(
        "StockReceived",
        &serde_json::json!({"sku": "x", "quantity": 1, "version": 2}),
    );
    assert_eq!(
        decode::<StockReceived>(&env).unwrap_err().kind(),
        "permanent"
    );
    let env = envelope(
        "StockReceived",
        &serde_json::json!({"sku": "x", "quantity": 1, "event_id": "sf-1"}),
    );
    assert_eq!(decode::<StockReceived>(&env).unwrap().meta.version, 1);
}
