//! The typed payloads of every detail-type in [`crate::domain::catalogue`]: what `detail` holds.
//!
//! Every payload carries [`Meta`]: a schema `version` (1 today) and an `event_id`. The outbox
//! stamps `event_id` into every event the fleet emits (see [`crate::store::outbox::insert`]), so
//! handlers build payloads with `event_id: None`; storefront events carry their own, which makes
//! a storefront retry of the same event count once (see
//! [`crate::domain::envelope::Envelope::event_key`]). A storefront event the catalogue marks
//! [`crate::domain::catalogue::EventSpec::requires_event_id`] (it changes stock or money) is a permanent
//! failure without one: [`decode`] says so before the handler has any effect, so the rolled-back
//! transaction leaves no inbox row and a corrected copy is applied normally.
//!
//! Money is integer minor units with a [`Currency`] code ([`crate::domain::money`], re-exported
//! here because payloads carry it); times are UTC. Decoding is [`decode`]: a detail that does not match its struct is poison, a
//! version this build does not know is permanent.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::domain::envelope::Envelope;
pub use crate::domain::money::{Currency, InvalidCurrency, Money};
use crate::domain::outcome::HandlerError;

/// The schema version of a payload that has never changed.
pub const VERSION: u32 = 1;

/// One detail-type's payload.
pub trait Event: Serialize + DeserializeOwned {
    /// The EventBridge `detail-type`, as listed in the catalogue.
    const DETAIL_TYPE: &'static str;
    /// The version this build emits.
    const VERSION: u32 = VERSION;
    /// The oldest version this build still applies: during a deploy, producers of the previous
    /// version are still running.
    const OLDEST_VERSION: u32 = VERSION;
    /// The payload's [`Meta`].
    fn meta(&self) -> &Meta;
}

/// Fields every payload has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Schema version of the payload.
    #[serde(default = "version_1")]
    pub version: u32,
    /// Identity of the logical event. Stamped by the outbox for the fleet's events; set by the
    /// storefront for its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

fn version_1() -> u32 {
    VERSION
}

impl Default for Meta {
    fn default() -> Self {
        Meta {
            version: VERSION,
            event_id: None,
        }
    }
}

impl Meta {
    /// The metadata of a storefront event with its own id.
    pub fn with_id(event_id: impl Into<String>) -> Self {
        Meta {
            version: VERSION,
            event_id: Some(event_id.into()),
        }
    }
}

/// The versions of `detail_type` this build applies, oldest and newest.
pub fn versions(detail_type: &str) -> (u32, u32) {
    match detail_type {
        OrderPlaced::DETAIL_TYPE => (OrderPlaced::OLDEST_VERSION, OrderPlaced::VERSION),
        OrderAccepted::DETAIL_TYPE => (OrderAccepted::OLDEST_VERSION, OrderAccepted::VERSION),
        PaymentRefunded::DETAIL_TYPE => (PaymentRefunded::OLDEST_VERSION, PaymentRefunded::VERSION),
        _ => (VERSION, VERSION),
    }
}

/// A version outside [`versions`] is permanent: a newer producer (redrive after an upgrade),
/// or one too old to be understood.
fn check_version(event: &Envelope, version: u32) -> Result<(), HandlerError> {
    let (oldest, newest) = versions(&event.detail_type);
    if !(oldest..=newest).contains(&version) {
        let known = if oldest == newest {
            format!("version {newest}")
        } else {
            format!("versions {oldest} to {newest}")
        };
        return Err(HandlerError::permanent(format!(
            "{} detail has version {version}; this build understands {known}",
            event.detail_type
        )));
    }
    Ok(())
}

/// The order id of an order event, read through the same checks as [`decode`] without
/// decoding the rest: for a handler that only needs to know which order moved. A detail
/// without an order id is poison.
pub fn decode_order_id(event: &Envelope) -> Result<String, HandlerError> {
    #[derive(Deserialize)]
    struct OrderRef {
        order_id: String,
        #[serde(flatten)]
        meta: Meta,
    }
    let r = OrderRef::deserialize(&event.detail).map_err(|e| {
        HandlerError::poison(format!("{} detail has no order_id: {e}", event.detail_type))
    })?;
    check_version(event, r.meta.version)?;
    Ok(r.order_id)
}

/// Decodes `event.detail` as `T`. A detail that does not match is poison (no retry can fix
/// it); a version outside [`Event::OLDEST_VERSION`] to [`Event::VERSION`] is permanent (a
/// newer producer: redrive after an upgrade).
pub fn decode<T: Event>(event: &Envelope) -> Result<T, HandlerError> {
    // Deserialised from the borrowed detail: no copy of the JSON tree.
    let payload = T::deserialize(&event.detail).map_err(|e| {
        HandlerError::poison(format!(
            "{} detail does not match its schema: {e}",
            event.detail_type
        ))
    })?;
    check_version(event, payload.meta().version)?;
    let has_id = payload
        .meta()
        .event_id
        .as_deref()
        .is_some_and(|id| !id.trim().is_empty());
    if !has_id
        && crate::domain::catalogue::spec(T::DETAIL_TYPE).is_some_and(|s| s.requires_event_id)
    {
        // Checked before any effect, so the rolled-back transaction leaves no inbox row either.
        return Err(HandlerError::permanent(format!(
            "{} detail has no event_id: it changes stock or money, so it must carry the \
             producer's own event_id, which makes a retry of the same event a duplicate (without \
             it every retry gets a new EventBridge id and is applied again). Publish it again \
             with an event_id",
            event.detail_type
        )));
    }
    Ok(payload)
}

// ---------------------------------------------------------------------------------------------
// Shared parts
// ---------------------------------------------------------------------------------------------

/// The customer as the storefront knows them. `email` is optional on the wire so that a
/// missing email becomes an `OrderRejected` reason rather than a poison message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default)]
    pub name: String,
}

/// A validated customer: the email is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub id: String,
    pub email: String,
    pub name: String,
}

/// Where the parcel goes. `country` is an ISO 3166-1 alpha-2 code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub name: String,
    pub line1: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

/// A line of an order as placed: quantities are signed on the wire so that a negative one is
/// reported as a rejection reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedLine {
    pub sku: String,
    pub quantity: i64,
    pub unit_price: Money,
}

/// A line of an accepted order: positive quantity, one currency across the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: i64,
    pub unit_price: Money,
}

/// Where an order lives on the shop's commerce platform: what the storefront handler needs to
/// tell the platform what happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformOrder {
    pub platform: crate::domain::platform::Platform,
    /// The platform's id of the order (Shopify: its GraphQL `gid://shopify/Order/...`;
    /// commercetools: the order's id).
    pub id: String,
    /// The shop on the platform (Shopify: the `*.myshopify.com` domain; commercetools: the
    /// project key).
    #[serde(default)]
    pub shop: String,
}

/// Money an order carries besides its lines, each in the order's currency. The total is the
/// lines' subtotal less `discount`, plus `shipping`, plus `tax` unless `tax_included` (the
/// lines' prices already hold it, as in shops that show prices with tax).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discount: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipping: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tax: Option<Money>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tax_included: bool,
}

impl Charges {
    pub fn is_empty(&self) -> bool {
        self.discount.is_none() && self.shipping.is_none() && self.tax.is_none()
    }

    /// Each amount in minor units, zero when absent: (discount, shipping, tax).
    pub fn minor(&self) -> (i64, i64, i64) {
        let m = |x: &Option<Money>| x.map_or(0, |m| m.amount_minor);
        (m(&self.discount), m(&self.shipping), m(&self.tax))
    }
}

/// A SKU and a number of units (reservations, shipments, releases).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuQuantity {
    pub sku: String,
    pub quantity: i64,
}

impl From<&OrderLine> for SkuQuantity {
    fn from(l: &OrderLine) -> Self {
        SkuQuantity {
            sku: l.sku.clone(),
            quantity: l.quantity,
        }
    }
}

/// Why an order was rejected at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionCode {
    NoLines,
    InvalidQuantity,
    InvalidPrice,
    MixedCurrencies,
    InvalidCurrency,
    UnknownSku,
    MissingCustomer,
    MissingEmail,
    InvalidEmail,
    MissingPaymentToken,
    TotalOverflow,
}

impl RejectionCode {
    /// The code as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectionCode::NoLines => "no_lines",
            RejectionCode::InvalidQuantity => "invalid_quantity",
            RejectionCode::InvalidPrice => "invalid_price",
            RejectionCode::MixedCurrencies => "mixed_currencies",
            RejectionCode::InvalidCurrency => "invalid_currency",
            RejectionCode::UnknownSku => "unknown_sku",
            RejectionCode::MissingCustomer => "missing_customer",
            RejectionCode::MissingEmail => "missing_email",
            RejectionCode::InvalidEmail => "invalid_email",
            RejectionCode::MissingPaymentToken => "missing_payment_token",
            RejectionCode::TotalOverflow => "total_overflow",
        }
    }
}

/// One reason an order was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionReason {
    pub code: RejectionCode,
    pub message: String,
}

/// One SKU that was short when reserving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortage {
    pub sku: String,
    pub requested: i64,
    pub available: i64,
}

/// Why an order is being cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The customer or the store asked (`OrderCancellationRequested`).
    Requested,
    /// Stock was short (`InventoryRejected`).
    OutOfStock,
    /// The provider declined the authorization (`PaymentFailed`).
    PaymentFailed,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::Requested => "requested",
            CancelReason::OutOfStock => "out_of_stock",
            CancelReason::PaymentFailed => "payment_failed",
        }
    }
}

/// Why stock was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The order was cancelled before shipment: the reservation (if any) is given back.
    Cancelled,
    /// The parcel came back: the units are sellable again.
    Returned,
}

/// Which provider operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStage {
    Authorize,
    Capture,
}

macro_rules! event {
    ($ty:ident, $name:literal) => {
        impl Event for $ty {
            const DETAIL_TYPE: &'static str = $name;
            fn meta(&self) -> &Meta {
                &self.meta
            }
        }
    };
    ($ty:ident, $name:literal, versions $oldest:literal to $newest:literal) => {
        impl Event for $ty {
            const DETAIL_TYPE: &'static str = $name;
            const VERSION: u32 = $newest;
            const OLDEST_VERSION: u32 = $oldest;
            fn meta(&self) -> &Meta {
                &self.meta
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// From the storefront
// ---------------------------------------------------------------------------------------------

/// A customer placed an order. Validated by orders at the edge: an invalid one becomes an
/// [`OrderRejected`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub customer: Customer,
    pub lines: Vec<PlacedLine>,
    pub shipping_address: Address,
    #[serde(default)]
    pub payment_token: String,
    pub placed_at: DateTime<Utc>,
    /// Version 2: the platform's order number for humans (`#1001`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_number: Option<String>,
    /// Version 2: the order on the shop's platform, for writing back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformOrder>,
    /// Version 2: discount, shipping and tax besides the lines.
    #[serde(default, skip_serializing_if = "Charges::is_empty")]
    pub charges: Charges,
}
event!(OrderPlaced, "OrderPlaced", versions 1 to 2);

/// The customer or the store asks to cancel an order. Honoured until shipment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancellationRequested {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    #[serde(default)]
    pub reason: String,
}
event!(OrderCancellationRequested, "OrderCancellationRequested");

/// The warehouse received `quantity` units of `sku`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReceived {
    #[serde(flatten)]
    pub meta: Meta,
    pub sku: String,
    pub quantity: i64,
}
event!(StockReceived, "StockReceived");

/// A catalogue product was created or changed. The storefront owns the document's shape;
/// fields beyond these are kept as they are in `products.doc`. `name` and `price` are
/// optional so that a draft product (no price yet) is still catalogued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductUpserted {
    #[serde(flatten)]
    pub meta: Meta,
    pub sku: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Money>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Event for ProductUpserted {
    const DETAIL_TYPE: &'static str = "ProductUpserted";
    fn meta(&self) -> &Meta {
        &self.meta
    }
}

// ---------------------------------------------------------------------------------------------
// From orders
// ---------------------------------------------------------------------------------------------

/// The order passed validation: inventory reserves, payments authorizes.
///
/// Version 2 carries no payment token: orders hands the storefront's token to payments
/// through the `payment_methods` table, in the transaction that emits this event, so the
/// token never travels on the bus, into other workers' queues or the lake. Version 1 carried
/// it in `payment_token`; payments still applies both during a deploy. Version 3 adds the
/// order's [`Charges`], its platform order number and its place on the platform; a version 2
/// event has none, and its total is its lines' subtotal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderAccepted {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub customer: Contact,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    /// Version 1 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_token: Option<String>,
    pub shipping_address: Address,
    pub placed_at: DateTime<Utc>,
    /// Version 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_number: Option<String>,
    /// Version 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformOrder>,
    /// Version 3.
    #[serde(default, skip_serializing_if = "Charges::is_empty")]
    pub charges: Charges,
}
event!(OrderAccepted, "OrderAccepted", versions 1 to 3);

/// The order failed validation. Every reason found is listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRejected {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub customer: Customer,
    pub reasons: Vec<RejectionReason>,
}
event!(OrderRejected, "OrderRejected");

/// Stock is reserved and payment authorized: fulfillment ships.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderReadyToShip {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub customer: Contact,
    pub lines: Vec<SkuQuantity>,
    pub shipping_address: Address,
}
event!(OrderReadyToShip, "OrderReadyToShip");

/// The order is cancelled: inventory releases, payments voids (or refunds). Carries the lines
/// and total so that a consumer that never saw the order can still settle it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub reason: CancelReason,
    pub lines: Vec<SkuQuantity>,
    pub total: Money,
}
event!(OrderCancelled, "OrderCancelled");

/// The order shipped, was paid and delivered: a purchase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCompleted {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub customer_id: String,
    pub lines: Vec<SkuQuantity>,
    pub total: Money,
}
event!(OrderCompleted, "OrderCompleted");

/// A cancellation arrived while the order was ready to ship: fulfillment must stop the
/// shipment if it has not left yet. Answered by [`ShipmentCancelled`] or [`OrderShipped`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentCancelRequested {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
}
event!(ShipmentCancelRequested, "ShipmentCancelRequested");

// ---------------------------------------------------------------------------------------------
// From inventory
// ---------------------------------------------------------------------------------------------

/// Every line of the order is reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub lines: Vec<SkuQuantity>,
}
event!(InventoryReserved, "InventoryReserved");

/// Stock was short for at least one line; nothing is reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryRejected {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub shortages: Vec<Shortage>,
}
event!(InventoryRejected, "InventoryRejected");

/// The order's stock is settled back: a reservation released (possibly empty) or returned
/// units restocked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleased {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub reason: ReleaseReason,
    /// Units that went back to sellable stock; empty when nothing had been reserved.
    pub lines: Vec<SkuQuantity>,
}
event!(InventoryReleased, "InventoryReleased");

/// The order shipped: reserved units left the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryCommitted {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub lines: Vec<SkuQuantity>,
}
event!(InventoryCommitted, "InventoryCommitted");

// ---------------------------------------------------------------------------------------------
// From payments
// ---------------------------------------------------------------------------------------------

/// The provider authorized the order total.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub authorization_id: String,
    pub amount: Money,
}
event!(PaymentAuthorized, "PaymentAuthorized");

/// The provider declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFailed {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub stage: PaymentStage,
    /// The provider's decline code, e.g. `card_declined`, `insufficient_funds`.
    pub code: String,
    pub message: String,
}
event!(PaymentFailed, "PaymentFailed");

/// The authorized amount was captured at shipment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub capture_id: String,
    pub amount: Money,
}
event!(PaymentCaptured, "PaymentCaptured");

/// The authorization was voided, or there was nothing to void: no money moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentVoided {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_id: Option<String>,
}
event!(PaymentVoided, "PaymentVoided");

/// A captured payment was refunded: in full for a cancellation or a return; in full or in part
/// for an operator's [`RefundRequested`].
///
/// Version 2 says which operator action it answers and what is left: a refund of an operator
/// (`action_id` set) does not move the order's saga, since the order itself goes on (a
/// goodwill refund of a delivered order). Version 1 events have none of these and were always
/// a full refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub refund_id: String,
    /// What this refund gave back.
    pub amount: Money,
    /// Version 2: the operator action (`operator_actions.id`) this refund answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_id: Option<i64>,
    /// Version 2: everything refunded of the payment so far, this refund included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunded_total: Option<Money>,
    /// Version 2: what is captured and not refunded yet, after this refund.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<Money>,
}
event!(PaymentRefunded, "PaymentRefunded", versions 1 to 2);

impl PaymentRefunded {
    /// Whether this refund was an operator's (support desk) rather than a cancellation's or a
    /// return's.
    pub fn by_operator(&self) -> bool {
        self.action_id.is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// From fulfillment
// ---------------------------------------------------------------------------------------------

/// The carrier accepted the parcel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderShipped {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub carrier: String,
    pub tracking_number: String,
    pub lines: Vec<SkuQuantity>,
    pub shipped_at: DateTime<Utc>,
}
event!(OrderShipped, "OrderShipped");

/// The carrier delivered the parcel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderDelivered {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub tracking_number: String,
    pub delivered_at: DateTime<Utc>,
}
event!(OrderDelivered, "OrderDelivered");

/// The carrier could not deliver and returned the parcel: payments refunds, inventory restocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryFailed {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    pub tracking_number: String,
    pub reason: String,
    pub lines: Vec<SkuQuantity>,
}
event!(DeliveryFailed, "DeliveryFailed");

/// The shipment was stopped before it left, answering [`ShipmentCancelRequested`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentCancelled {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
}
event!(ShipmentCancelled, "ShipmentCancelled");

/// Who opts out of marketing email: the customer's id (what the unsubscribe link's token
/// names), or for support an address alone, which notifications resolves to the customers
/// that have it. Under `customer`, so the lake keeps the id and only a keyed hash of the
/// address ([`crate::domain::redaction`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptOutSubject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// How a [`MarketingOptOut`] came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptOutChannel {
    /// The unsubscribe link of a marketing email (the shop's page checked its token).
    Link,
    /// Support, with `orderfleet email unsubscribe`.
    Support,
}

impl OptOutChannel {
    /// The name stored in `marketing_opt_outs.channel`.
    pub fn as_str(self) -> &'static str {
        match self {
            OptOutChannel::Link => "link",
            OptOutChannel::Support => "support",
        }
    }
}

/// A customer opted out of marketing email; transactional email still goes out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketingOptOut {
    #[serde(flatten)]
    pub meta: Meta,
    pub customer: OptOutSubject,
    pub channel: OptOutChannel,
}
event!(MarketingOptOut, "MarketingOptOut");

// ---------------------------------------------------------------------------------------------
// From the support desk (`orderfleet order refund` and `order cancel`)
// ---------------------------------------------------------------------------------------------

/// An operator asks to give `amount` of a captured payment back (`orderfleet order refund`).
/// Payments refunds it if that much is captured and not refunded yet, and refuses otherwise:
/// two operators may ask at once, and only what was captured can go back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRequested {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    /// The audited action (`operator_actions.id`).
    pub action_id: i64,
    pub amount: Money,
    pub reason: String,
    /// Who asked, as the operator named themself.
    pub operator: String,
    pub requested_at: DateTime<Utc>,
}
event!(RefundRequested, "RefundRequested");

/// An operator asks to cancel an order (`orderfleet order cancel`). Orders honours it as the
/// storefront's [`OrderCancellationRequested`] until shipment, and records the outcome in the
/// audited action either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorCancellationRequested {
    #[serde(flatten)]
    pub meta: Meta,
    pub order_id: String,
    /// The audited action (`operator_actions.id`).
    pub action_id: i64,
    pub reason: String,
    pub operator: String,
    pub requested_at: DateTime<Utc>,
}
event!(
    OperatorCancellationRequested,
    "OperatorCancellationRequested"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(detail_type: &str, detail: serde_json::Value) -> Envelope {
        Envelope {
            version: "0".into(),
            id: "e-1".into(),
            source: "orderfleet.payments".into(),
            detail_type: detail_type.into(),
            time: Utc::now(),
            account: String::new(),
            region: String::new(),
            resources: Vec::new(),
            detail,
        }
    }

    #[test]
    fn a_version_1_refund_still_decodes_as_a_full_refund_of_no_operator() {
        let v1 = serde_json::json!({"version": 1, "event_id": "x", "order_id": "o-1",
            "refund_id": "ref_1", "amount": {"amount_minor": 2500, "currency": "EUR"}});
        let d: PaymentRefunded = decode(&envelope("PaymentRefunded", v1)).unwrap();
        assert!(!d.by_operator());
        assert_eq!((d.refunded_total, d.remaining), (None, None));
        let v3 = serde_json::json!({"version": 3, "order_id": "o-1", "refund_id": "r",
            "amount": {"amount_minor": 1, "currency": "EUR"}});
        assert!(decode::<PaymentRefunded>(&envelope("PaymentRefunded", v3)).is_err());
    }
}
