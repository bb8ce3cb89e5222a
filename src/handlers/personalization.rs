//! personalization: learns "bought together" from purchases, and can forward them to Amazon
//! Personalize.
//!
//! | event | effect | emits |
//! |---|---|---|
//! | `OrderCompleted` | +1 in `co_purchases` for every ordered pair of distinct SKUs in the order; with a tracker, one PutEvents `purchase` per SKU | (none) |
//!
//! An order counts once: `personalization_orders` is keyed by order id, beside the inbox that
//! is keyed by event. [`crate::store::recommendations`] reads the table.
//!
//! Without a tracker, counting is database work only, so the handler groups
//! ([`crate::runtime::group`]): a group's orders are recorded and their pairs added in one
//! statement when the group ends, instead of two statements per order. With a tracker, each
//! order has a transaction of its own, since its PutEvents call would hold up a group.
//!
//! # Amazon Personalize
//!
//! With an event tracker configured ([`PersonalizeTracker`]), the order's SKUs are sent with
//! PutEvents inside the handler, before its transaction commits: a failed call rolls back the
//! co-occurrence counts and the message is retried, so the two stay in step. Each event has a
//! deterministic `eventId` (`<order>:<sku>`), and Personalize ignores an event id it already
//! has for training, so the copy sent when the commit fails after a successful call (or when
//! an order of more than ten SKUs fails halfway through its calls) does no harm.
//! Throttling, 5xx and connection errors are retried; an invalid request (or an unknown
//! tracker) is permanent and goes to the DLQ with the reason.
//!
//! # What happens if two processes, or a crash, land here
//!
//! - Two processes, one order (an `OrderCompleted` delivered twice under different ids): the
//!   second's `personalization_orders` insert waits on the primary key until the first
//!   commits, then does nothing: counted once, forwarded once. If the first rolls back, the
//!   second counts and forwards. Two groups that share orders or SKUs queue on each other
//!   the same way without deadlocking: each inserts its orders in order-id order, then its
//!   pairs in SKU order.
//! - A crash or restart in the middle of a group: nothing of the group is committed; every
//!   event of it is received again and counted then.
//! - A crash before PutEvents: nothing was sent or counted; the redelivery does both.
//! - A crash after PutEvents (or after some of an order's chunks) and before the commit: the
//!   counts roll back and the redelivery sends the same events again, with the same `eventId`,
//!   `sentAt` (the envelope's time) and session. Personalize keeps them as received (its
//!   interactions data may hold the copy) but uses only the first of an event id for training,
//!   so recommendations do not count the order twice. The co-occurrence counts are exact.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_personalizeevents::config::http::HttpResponse;
use aws_sdk_personalizeevents::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_personalizeevents::types::Event as PersonalizeEvent;
use serde_json::json;

use crate::domain::envelope::Envelope;
use crate::domain::events::{self, OrderCompleted};
use crate::domain::outcome::{error_chain, HandlerError};
use crate::handlers::{Context, Handler};
use crate::store::db::{Cached, Tx};

/// Events per PutEvents call: the API's limit.
pub const MAX_EVENTS_PER_CALL: usize = 10;
/// The Personalize `eventType` of a purchase.
pub const PURCHASE_EVENT_TYPE: &str = "purchase";

/// An Amazon Personalize event tracker to forward purchases to.
#[derive(Debug, Clone)]
pub struct PersonalizeTracker {
    pub client: aws_sdk_personalizeevents::Client,
    /// The tracker's tracking id (not its ARN).
    pub tracking_id: String,
}

/// The personalization handler.
#[derive(Debug, Clone, Default)]
pub struct Personalization {
    tracker: Option<PersonalizeTracker>,
}

impl Personalization {
    /// Keeps co-occurrence only, or also forwards to `tracker`.
    pub fn new(tracker: Option<PersonalizeTracker>) -> Self {
        Personalization { tracker }
    }

    async fn forward(
        &self,
        tracker: &PersonalizeTracker,
        order: &OrderCompleted,
        quantities: &BTreeMap<&str, i64>,
        sent_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), HandlerError> {
        let sent_at = aws_sdk_personalizeevents::primitives::DateTime::from_millis(
            sent_at.timestamp_millis(),
        );
        let mut events = Vec::with_capacity(quantities.len());
        for (sku, quantity) in quantities {
            events.push(
                PersonalizeEvent::builder()
                    .event_id(format!("{}:{sku}", order.order_id))
                    .event_type(PURCHASE_EVENT_TYPE)
                    .item_id(*sku)
                    .sent_at(sent_at)
                    // A JSON string, as the API wants; the interactions schema may carry a
                    // QUANTITY field for it (Personalize maps camelCase keys to fields).
                    .properties(json!({ "quantity": quantity }).to_string())
                    .build()
                    .map_err(|e| {
                        HandlerError::permanent(format!("building a Personalize event: {e}"))
                    })?,
            );
        }
        for chunk in events.chunks(MAX_EVENTS_PER_CALL) {
            tracker
                .client
                .put_events()
                .tracking_id(&tracker.tracking_id)
                .user_id(&order.customer_id)
                .session_id(&order.order_id)
                .set_event_list(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| classify("Personalize PutEvents", &e))?;
        }
        Ok(())
    }
}

/// Classifies a Personalize failure where it is converted: throttling, server errors and
/// connection trouble are worth retrying; an invalid request or an unknown tracker is not.
pub fn classify<E>(context: &str, err: &SdkError<E, HttpResponse>) -> HandlerError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let reason = format!("{context}: {}", error_chain(err));
    match err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default();
            let retryable_code = [
                "Throttl",
                "TooManyRequests",
                "LimitExceeded",
                "ExpiredToken",
            ]
            .iter()
            .any(|c| code.contains(c))
                || [
                    "InternalFailure",
                    "InternalServerError",
                    "ServiceUnavailable",
                ]
                .contains(&code);
            let status = service.raw().status().as_u16();
            if retryable_code || status == 429 || status >= 500 {
                HandlerError::retry(reason)
            } else {
                HandlerError::permanent(reason)
            }
        }
        // The request never left, or no valid answer came back: try again.
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            HandlerError::retry(reason)
        }
        // The request could not even be built: the same input fails the same way.
        SdkError::ConstructionFailure(_) => HandlerError::permanent(reason),
        _ => HandlerError::retry(reason),
    }
}

/// The orders of one transaction, by order id: what [`count`] writes. An order completed
/// twice in one group (under two event ids) is kept once, as its first copy.
#[derive(Debug, Default)]
pub struct Orders(BTreeMap<String, (String, Vec<String>)>);

impl Orders {
    /// Adds `order`, bought as `skus`, unless an earlier copy of it is here.
    fn add(&mut self, order: &OrderCompleted, skus: Vec<String>) {
        self.0
            .entry(order.order_id.clone())
            .or_insert_with(|| (order.customer_id.clone(), skus));
    }
}

/// Counts `orders` once each: records them in `personalization_orders` and adds their pairs
/// to `co_purchases`, in one statement. Returns the ids of the orders counted now (the others
/// were counted before, by this or another process).
///
/// Order rows are inserted in order-id order, and the pair rows are written after all of
/// them, aggregated and in (sku, other_sku) order, so two transactions that share orders or
/// SKUs queue on each other instead of deadlocking: one waiting on an order holds no pair
/// yet, and pairs are always taken in the same order. An order another transaction has
/// inserted but not committed makes this one wait; it is counted here only if that one rolls
/// back.
async fn count(tx: &Tx, orders: &Orders) -> Result<Vec<String>, HandlerError> {
    if orders.0.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(orders.0.len());
    let mut customers = Vec::with_capacity(orders.0.len());
    let mut skus = Vec::with_capacity(orders.0.len());
    for (id, (customer, order_skus)) in &orders.0 {
        ids.push(id.as_str());
        customers.push(customer.as_str());
        skus.push(json!(order_skus));
    }
    let rows = tx
        .query_cached(
            "WITH counted AS (
                 INSERT INTO personalization_orders (order_id, customer_id, skus)
                 SELECT o.id, o.customer, ARRAY(SELECT jsonb_array_elements_text(o.skus))
                   FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS o(id, customer, skus)
                  ORDER BY o.id
                 ON CONFLICT (order_id) DO NOTHING
                 RETURNING order_id, skus
             ), pairs AS (
                 INSERT INTO co_purchases (sku, other_sku, count)
                 SELECT a, b, count(*) FROM counted, unnest(counted.skus) a, unnest(counted.skus) b
                  WHERE a <> b GROUP BY a, b ORDER BY a, b
                 ON CONFLICT (sku, other_sku)
                 DO UPDATE SET count = co_purchases.count + excluded.count
             )
             SELECT order_id FROM counted",
            &[&ids, &customers, &skus],
        )
        .await
        .map_err(|e| HandlerError::from_db("counting completed orders", &e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[async_trait]
impl Handler for Personalization {
    type Batch = Orders;

    fn name(&self) -> &str {
        "personalization"
    }

    /// Without a tracker, counting an order is two inserts and nothing else, so a group's
    /// orders are counted together, in one statement at the end ([`Handler::finish`]). With
    /// one, each order's PutEvents call would hold up the group: one order per transaction.
    fn group_commit(&self) -> bool {
        self.tracker.is_none()
    }

    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Orders>,
    ) -> Result<(), HandlerError> {
        if event.detail_type != "OrderCompleted" {
            return Err(HandlerError::permanent(format!(
                "personalization does not consume {}",
                event.detail_type
            )));
        }
        let order: OrderCompleted = events::decode(event)?;
        // Distinct SKUs, with the quantity bought of each.
        let mut quantities: BTreeMap<&str, i64> = BTreeMap::new();
        for line in &order.lines {
            *quantities.entry(line.sku.as_str()).or_default() += line.quantity;
        }
        let skus: Vec<String> = quantities.keys().map(|s| s.to_string()).collect();
        let Some(tracker) = &self.tracker else {
            // Counted with the rest of the transaction's orders, at its end.
            cx.batch.add(&order, skus);
            return Ok(());
        };
        // Forwarded only when counted now: the insert decides, once, who sends.
        let mut this = Orders::default();
        this.add(&order, skus);
        if count(cx.tx, &this).await?.is_empty() {
            tracing::debug!(order_id = %order.order_id, "order already counted");
            return Ok(());
        }
        self.forward(tracker, &order, &quantities, event.time).await
    }

    async fn finish(&self, tx: &Tx, orders: Orders) -> Result<(), HandlerError> {
        let counted = count(tx, &orders).await?;
        if counted.len() < orders.0.len() {
            tracing::debug!(
                orders = orders.0.len(),
                counted = counted.len(),
                "some orders were already counted"
            );
        }
        Ok(())
    }
}
