//! The event catalogue: every detail-type on the bus, who produces it and who consumes it.
//!
//! This table is the single source for routing (the EventBridge rules in
//! [`crate::infra::topology`]), for `docs/events.md` and for the JSON Schemas in `schemas/`, which a
//! test checks against it. The typed payloads live in [`crate::domain::events`].

use crate::domain::names::HandlerName::{self, *};

/// The `source` of the storefront's events: those the storefront handler translates from the
/// shop's commerce platform, and those `orderfleet publish` (the simulator) or a storefront of
/// the shop's own puts on the bus directly. It is the storefront handler's own source.
pub const STOREFRONT_SOURCE: &str = "orderfleet.storefront";

/// The `source` of the support desk's events (`orderfleet order refund`, `order cancel`).
/// The CLI writes them to the outbox (migration 0018's `operator_request`), and the relay of
/// [`OPERATOR_RELAY`]'s worker publishes them: the CLI needs no AWS rights to act.
pub const OPERATOR_SOURCE: &str = "orderfleet.operator";

/// The handler whose worker's relay publishes the support desk's events. Orders runs in every
/// fleet, and its IAM role may put [`OPERATOR_SOURCE`] on the bus besides its own.
pub const OPERATOR_RELAY: HandlerName = HandlerName::Orders;

/// Who publishes an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Producer {
    Storefront,
    Handler(HandlerName),
    /// An operator, through `orderfleet` and the outbox.
    Operator,
}

/// One detail-type of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct EventSpec {
    pub detail_type: &'static str,
    pub producer: Producer,
    pub consumers: &'static [HandlerName],
    pub description: &'static str,
    /// Whether the event must carry its own `detail.event_id`. True for the storefront's events
    /// whose effect is counted per event rather than settled by a business key: a producer's
    /// retry after a lost PutEvents response gets a new EventBridge id, so without an
    /// `event_id` of the producer's it would be applied twice. One without it is
    /// dead-lettered ([`crate::domain::events::decode`]). The fleet's own events always carry one (the
    /// outbox stamps it).
    pub requires_event_id: bool,
}

impl EventSpec {
    pub fn source(&self) -> String {
        match self.producer {
            Producer::Storefront => STOREFRONT_SOURCE.to_string(),
            Producer::Handler(h) => h.source(),
            Producer::Operator => OPERATOR_SOURCE.to_string(),
        }
    }
}

/// Whether `handler` emits any event of the catalogue: only such a worker publishes to the bus,
/// and only under its own source (its IAM role is scoped to it).
pub fn produces(handler: HandlerName) -> bool {
    EVENTS.iter().any(|e| match e.producer {
        Producer::Handler(h) => h == handler,
        Producer::Storefront => handler == HandlerName::Storefront,
        Producer::Operator => false,
    })
}

/// The sources whose outbox rows the relay of a worker running `handler` publishes: the
/// handler's own if it emits events, and the support desk's for [`OPERATOR_RELAY`].
pub fn relayed_sources(handler: HandlerName) -> Vec<String> {
    let mut sources = Vec::new();
    if produces(handler) {
        sources.push(handler.source());
    }
    if handler == OPERATOR_RELAY {
        sources.push(OPERATOR_SOURCE.to_string());
    }
    sources
}

/// Looks a detail-type up in the catalogue.
pub fn spec(detail_type: &str) -> Option<&'static EventSpec> {
    EVENTS.iter().find(|e| e.detail_type == detail_type)
}

const fn ev(
    detail_type: &'static str,
    producer: Producer,
    consumers: &'static [HandlerName],
    description: &'static str,
) -> EventSpec {
    EventSpec {
        detail_type,
        producer,
        consumers,
        description,
        requires_event_id: false,
    }
}

/// [`ev`] for an event that must carry its `event_id` (see [`EventSpec::requires_event_id`]).
const fn keyed(
    detail_type: &'static str,
    producer: Producer,
    consumers: &'static [HandlerName],
    description: &'static str,
) -> EventSpec {
    EventSpec {
        requires_event_id: true,
        ..ev(detail_type, producer, consumers, description)
    }
}

use Producer::{Handler as By, Operator, Storefront};

/// Every event of the fleet. Analytics archives all of them.
pub const EVENTS: &[EventSpec] = &[
    // From the storefront. StockReceived adds to stock on hand and OrderPlaced starts a
    // reservation and an authorization hold: both change quantities or money, so both must
    // carry an `event_id` (OrderPlaced is also settled by its order id, but the contract does
    // not rest on that). A cancellation only moves an order towards cancelled, which a second
    // copy cannot move further, and a product upsert writes the same document again.
    keyed(
        "OrderPlaced",
        Storefront,
        &[Orders, Analytics],
        "A customer placed an order: customer, lines, shipping address, payment token.",
    ),
    ev(
        "OrderCancellationRequested",
        Storefront,
        &[Orders, Analytics],
        "The customer or the store asks to cancel an order that has not shipped.",
    ),
    keyed(
        "StockReceived",
        Storefront,
        &[Inventory, Analytics],
        "The warehouse received units of a SKU.",
    ),
    ev(
        "ProductUpserted",
        Storefront,
        &[Inventory, Analytics],
        "A catalogue product was created or changed.",
    ),
    // From orders.
    ev(
        "OrderAccepted",
        By(Orders),
        &[Inventory, Payments, Notifications, Analytics],
        "The order passed validation; stock and payment are requested.",
    ),
    ev(
        "OrderRejected",
        By(Orders),
        &[Analytics],
        "The order failed validation; the reasons are listed.",
    ),
    ev(
        "OrderReadyToShip",
        By(Orders),
        &[Fulfillment, Analytics],
        "Stock is reserved and payment authorized: the order can ship.",
    ),
    ev(
        "OrderCancelled",
        By(Orders),
        // Notifications waits for the payment outcome that answers it (PaymentVoided or
        // PaymentRefunded) to say what happened to the money. The storefront tells the
        // platform.
        &[Inventory, Payments, HandlerName::Storefront, Analytics],
        "The order is cancelled; stock and money are to be given back.",
    ),
    ev(
        "OrderCompleted",
        By(Orders),
        // Notifications sends the recommendations email (marketing).
        &[Personalization, Notifications, Analytics],
        "The order shipped, was paid and delivered: a purchase.",
    ),
    ev(
        "ShipmentCancelRequested",
        By(Orders),
        &[Fulfillment, Analytics],
        "A cancellation arrived while the order was ready to ship: stop the parcel if it has not left.",
    ),
    // From inventory.
    ev(
        "InventoryReserved",
        By(Inventory),
        &[Orders, Analytics],
        "Every line of the order is reserved.",
    ),
    ev(
        "InventoryRejected",
        By(Inventory),
        &[Orders, Analytics],
        "Stock was short for at least one line; nothing is reserved.",
    ),
    ev(
        "InventoryReleased",
        By(Inventory),
        &[Orders, Analytics],
        "The order's reservation was released (or there was none to release).",
    ),
    ev(
        "InventoryCommitted",
        By(Inventory),
        &[Orders, Analytics],
        "The order shipped: reserved units left the warehouse.",
    ),
    // From payments.
    ev(
        "PaymentAuthorized",
        By(Payments),
        &[Orders, Analytics],
        "The provider authorized the order total.",
    ),
    ev(
        "PaymentFailed",
        By(Payments),
        &[Orders, Analytics],
        "The provider declined the authorization or the capture.",
    ),
    ev(
        "PaymentCaptured",
        By(Payments),
        &[Orders, Analytics],
        "The authorized amount was captured at shipment.",
    ),
    ev(
        "PaymentVoided",
        By(Payments),
        &[Orders, Notifications, Analytics],
        "The authorization was voided (or there was nothing to void).",
    ),
    ev(
        "PaymentRefunded",
        By(Payments),
        &[Orders, Notifications, HandlerName::Storefront, Analytics],
        "A captured payment was refunded.",
    ),
    // From fulfillment.
    ev(
        "OrderShipped",
        By(Fulfillment),
        &[Orders, Inventory, Payments, Notifications, HandlerName::Storefront, Analytics],
        "The carrier accepted the shipment; carries the tracking number.",
    ),
    ev(
        "OrderDelivered",
        By(Fulfillment),
        &[Orders, Analytics],
        "The carrier delivered the parcel.",
    ),
    ev(
        "DeliveryFailed",
        By(Fulfillment),
        &[Orders, Inventory, Payments, Analytics],
        "The carrier could not deliver and returned the parcel: refund, restock.",
    ),
    ev(
        "ShipmentCancelled",
        By(Fulfillment),
        &[Orders, Analytics],
        "The parcel was stopped before it left, answering ShipmentCancelRequested.",
    ),
    // Marketing consent. The shop's unsubscribe page publishes it after checking the signed
    // token of the link in a marketing email; `orderfleet email unsubscribe` publishes it for
    // support. Recording it twice changes nothing.
    ev(
        "MarketingOptOut",
        Storefront,
        &[Notifications, Analytics],
        "A customer opted out of marketing email (the unsubscribe link, or support): transactional email still goes out.",
    ),
    // From the support desk (`orderfleet order refund`, `order cancel`), through the outbox.
    // Both always carry the event id `operator_request` gives them.
    keyed(
        "RefundRequested",
        Operator,
        &[Payments, Analytics],
        "An operator asks to refund part or all of a captured payment; audited in operator_actions.",
    ),
    keyed(
        "OperatorCancellationRequested",
        Operator,
        &[Orders, Analytics],
        "An operator asks to cancel an order that has not shipped; audited in operator_actions.",
    ),
];

/// An event from outside the fleet that a handler consumes: an AWS service's event on the
/// account's default bus, routed by a rule of [`crate::infra::topology::Topology::external_rules`].
/// These are not archived (they carry addresses the lake must not hold) and have no schema of
/// ours; their producer documents them.
#[derive(Debug, Clone, Copy)]
pub struct ExternalSpec {
    pub source: &'static str,
    pub detail_type: &'static str,
    pub consumers: &'static [HandlerName],
    pub description: &'static str,
}

/// Every external event a handler consumes.
pub const EXTERNAL_EVENTS: &[ExternalSpec] = &[
    ExternalSpec {
        source: crate::domain::ses::SOURCE,
        detail_type: crate::domain::ses::BOUNCED,
        consumers: &[Notifications],
        description: "SES could not deliver an email (configuration set event destination): a permanent bounce suppresses the address.",
    },
    ExternalSpec {
        source: crate::domain::ses::SOURCE,
        detail_type: crate::domain::ses::COMPLAINT,
        consumers: &[Notifications],
        description: "A recipient marked an email as spam: the address is suppressed.",
    },
];

/// The external events of `source`.
pub fn external(source: &str) -> impl Iterator<Item = &'static ExternalSpec> + '_ {
    EXTERNAL_EVENTS.iter().filter(move |e| e.source == source)
}

/// Whether a handler may be given an event of `source` and `detail_type`: a catalogued event,
/// an external one, or a commerce platform's (whose detail-types are the platform's own; the
/// storefront handler sorts them out).
pub fn knows(source: &str, detail_type: &str) -> bool {
    spec(detail_type).is_some()
        || external(source).any(|e| e.detail_type == detail_type)
        || crate::domain::platform::Platform::of_source(source).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_storefront_handler_publishes_the_storefront_events() {
        assert_eq!(HandlerName::Storefront.source(), STOREFRONT_SOURCE);
        assert!(produces(HandlerName::Storefront));
    }

    #[test]
    fn every_detail_type_is_listed_once_and_archived() {
        for (i, e) in EVENTS.iter().enumerate() {
            assert!(
                EVENTS[i + 1..]
                    .iter()
                    .all(|o| o.detail_type != e.detail_type),
                "{} listed twice",
                e.detail_type
            );
            assert!(
                e.consumers.contains(&Analytics),
                "{} not archived",
                e.detail_type
            );
        }
    }
}
