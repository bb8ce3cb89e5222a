//! A representative payload of every detail-type, for schema checks, docs and tests.

use chrono::{DateTime, Utc};
use orderfleet::domain::catalogue;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::events::*;

/// An envelope as an EventBridge rule would deliver `detail`: a fresh id, the time now, and
/// the source of the detail-type's producer in the catalogue (`test` for a type it lacks).
pub fn envelope(detail_type: &str, detail: &impl serde::Serialize) -> Envelope {
    Envelope {
        version: "0".into(),
        id: uuid::Uuid::new_v4().to_string(),
        source: catalogue::spec(detail_type).map_or_else(|| "test".into(), |s| s.source()),
        detail_type: detail_type.into(),
        time: Utc::now(),
        account: String::new(),
        region: String::new(),
        resources: Vec::new(),
        detail: serde_json::to_value(detail).expect("a test detail serialises"),
    }
}

/// A representative payload of every detail-type, as JSON: for schema checks, docs and tests.
/// `None` for a detail-type without a payload here.
pub fn example(detail_type: &str) -> Option<serde_json::Value> {
    use serde_json::to_value;
    // Cannot fail: these literals are valid codes.
    let eur = Currency::new("EUR").expect("EUR is a valid code");
    let money = Money::new(2599, eur);
    let at: DateTime<Utc> = DateTime::from_timestamp(1_767_225_600, 0).unwrap_or_default();
    let meta = Meta::default;
    let order_id = || "ord-1".to_string();
    let lines = || {
        vec![SkuQuantity {
            sku: "SKU-1".into(),
            quantity: 1,
        }]
    };
    let contact = Contact {
        id: "cus-1".into(),
        email: "ada@example.com".into(),
        name: "Ada".into(),
    };
    let address = Address {
        name: "Ada".into(),
        line1: "1 Main St".into(),
        line2: None,
        city: "Springfield".into(),
        postal_code: "12345".into(),
        country: "US".into(),
    };
    let v = match detail_type {
        "OrderPlaced" => to_value(OrderPlaced {
            meta: Meta {
                version: OrderPlaced::VERSION,
                ..Meta::with_id("sf-1")
            },
            order_id: order_id(),
            customer: Customer {
                id: contact.id.clone(),
                email: Some(contact.email.clone()),
                name: contact.name.clone(),
            },
            lines: vec![PlacedLine {
                sku: "SKU-1".into(),
                quantity: 1,
                unit_price: money,
            }],
            shipping_address: address,
            payment_token: "tok_visa".into(),
            placed_at: at,
            order_number: Some("#1042".into()),
            platform: Some(PlatformOrder {
                platform: orderfleet::domain::platform::Platform::Shopify,
                id: "gid://shopify/Order/820982911946154508".into(),
                shop: "tea-and-cups.myshopify.com".into(),
            }),
            charges: Charges {
                shipping: Some(money),
                ..Default::default()
            },
        }),
        "OrderCancellationRequested" => to_value(OrderCancellationRequested {
            meta: Meta::with_id("sf-2"),
            order_id: order_id(),
            reason: "changed my mind".into(),
        }),
        "StockReceived" => to_value(StockReceived {
            meta: Meta::with_id("sf-3"),
            sku: "SKU-1".into(),
            quantity: 10,
        }),
        "ProductUpserted" => to_value(ProductUpserted {
            meta: Meta::with_id("sf-4"),
            sku: "SKU-1".into(),
            name: "Teapot".into(),
            price: Some(money),
            extra: Default::default(),
        }),
        "OrderAccepted" => to_value(OrderAccepted {
            meta: Meta {
                version: OrderAccepted::VERSION,
                ..meta()
            },
            order_id: order_id(),
            customer: contact,
            lines: vec![OrderLine {
                sku: "SKU-1".into(),
                quantity: 1,
                unit_price: money,
            }],
            total: money,
            payment_token: None,
            shipping_address: address,
            placed_at: at,
            order_number: None,
            platform: None,
            charges: Default::default(),
        }),
        "OrderRejected" => to_value(OrderRejected {
            meta: meta(),
            order_id: order_id(),
            customer: Customer {
                id: "cus-1".into(),
                email: None,
                name: "Ada".into(),
            },
            reasons: vec![RejectionReason {
                code: RejectionCode::MissingEmail,
                message: "the customer has no email".into(),
            }],
        }),
        "OrderReadyToShip" => to_value(OrderReadyToShip {
            meta: meta(),
            order_id: order_id(),
            customer: contact,
            lines: lines(),
            shipping_address: address,
        }),
        "OrderCancelled" => to_value(OrderCancelled {
            meta: meta(),
            order_id: order_id(),
            reason: CancelReason::Requested,
            lines: lines(),
            total: money,
        }),
        "OrderCompleted" => to_value(OrderCompleted {
            meta: meta(),
            order_id: order_id(),
            customer_id: "cus-1".into(),
            lines: lines(),
            total: money,
        }),
        "ShipmentCancelRequested" => to_value(ShipmentCancelRequested {
            meta: meta(),
            order_id: order_id(),
        }),
        "InventoryReserved" => to_value(InventoryReserved {
            meta: meta(),
            order_id: order_id(),
            lines: lines(),
        }),
        "InventoryRejected" => to_value(InventoryRejected {
            meta: meta(),
            order_id: order_id(),
            shortages: vec![Shortage {
                sku: "SKU-1".into(),
                requested: 2,
                available: 1,
            }],
        }),
        "InventoryReleased" => to_value(InventoryReleased {
            meta: meta(),
            order_id: order_id(),
            reason: ReleaseReason::Cancelled,
            lines: lines(),
        }),
        "InventoryCommitted" => to_value(InventoryCommitted {
            meta: meta(),
            order_id: order_id(),
            lines: lines(),
        }),
        "PaymentAuthorized" => to_value(PaymentAuthorized {
            meta: meta(),
            order_id: order_id(),
            authorization_id: "auth_1".into(),
            amount: money,
        }),
        "PaymentFailed" => to_value(PaymentFailed {
            meta: meta(),
            order_id: order_id(),
            stage: PaymentStage::Authorize,
            code: "card_declined".into(),
            message: "the card was declined".into(),
        }),
        "PaymentCaptured" => to_value(PaymentCaptured {
            meta: meta(),
            order_id: order_id(),
            capture_id: "cap_1".into(),
            amount: money,
        }),
        "PaymentVoided" => to_value(PaymentVoided {
            meta: meta(),
            order_id: order_id(),
            authorization_id: Some("auth_1".into()),
        }),
        "PaymentRefunded" => to_value(PaymentRefunded {
            meta: Meta {
                version: PaymentRefunded::VERSION,
                ..meta()
            },
            order_id: order_id(),
            refund_id: "ref_1".into(),
            amount: money,
            action_id: Some(7),
            refunded_total: Some(money),
            remaining: Some(Money::new(0, eur)),
        }),
        "RefundRequested" => to_value(RefundRequested {
            meta: Meta::with_id("7f0c1e52-6a51-4c3e-9d7e-0c9a1f3b2a10"),
            order_id: order_id(),
            action_id: 7,
            amount: money,
            reason: "parcel arrived damaged".into(),
            operator: "alice".into(),
            requested_at: at,
        }),
        "OperatorCancellationRequested" => to_value(OperatorCancellationRequested {
            meta: Meta::with_id("0b6a3f1e-2d4c-4e8a-9b1f-5c7d9e0a1b2c"),
            order_id: order_id(),
            action_id: 8,
            reason: "customer called to cancel".into(),
            operator: "alice".into(),
            requested_at: at,
        }),
        "OrderShipped" => to_value(OrderShipped {
            meta: meta(),
            order_id: order_id(),
            carrier: "sandbox".into(),
            tracking_number: "SBX0123456789AB".into(),
            lines: lines(),
            shipped_at: at,
        }),
        "OrderDelivered" => to_value(OrderDelivered {
            meta: meta(),
            order_id: order_id(),
            tracking_number: "SBX0123456789AB".into(),
            delivered_at: at,
        }),
        "DeliveryFailed" => to_value(DeliveryFailed {
            meta: meta(),
            order_id: order_id(),
            tracking_number: "SBX0123456789AB".into(),
            reason: "address not found".into(),
            lines: lines(),
        }),
        "ShipmentCancelled" => to_value(ShipmentCancelled {
            meta: meta(),
            order_id: order_id(),
        }),
        "MarketingOptOut" => to_value(MarketingOptOut {
            meta: Meta::with_id("sf-5"),
            customer: OptOutSubject {
                id: Some("cus-1".into()),
                email: None,
            },
            channel: OptOutChannel::Link,
        }),
        _ => return None,
    };
    v.ok()
}
