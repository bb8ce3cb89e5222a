//! fulfillment: ships orders that are ready through a [`Carrier`], and stops a parcel when a
//! cancellation arrives before it left.
//!
//! | event | effect | emits |
//! |---|---|---|
//! | `OrderReadyToShip` | a shipment with a tracking number | `OrderShipped`, then `OrderDelivered` or `DeliveryFailed` when the carrier knows |
//! | `ShipmentCancelRequested` | the shipment is stopped, unless it left | `ShipmentCancelled` (only if stopped) |
//!
//! One row per order in `shipments`; its primary key makes the first decision win between
//! shipping and stopping, across any number of instances.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;

use crate::carrier::{Carrier, CarrierError, Delivery, Parcel};
use crate::db::{Cached, Tx};
use crate::envelope::Envelope;
use crate::events::{
    self, DeliveryFailed, Meta, OrderDelivered, OrderReadyToShip, OrderShipped,
    ShipmentCancelRequested, ShipmentCancelled,
};
use crate::handlers::{Context, GroupState, Handler};
use crate::outcome::HandlerError;

/// The fulfillment handler.
pub struct Fulfillment {
    carrier: Arc<dyn Carrier>,
}

/// A shipment row this transaction decided.
struct Shipment {
    order_id: String,
    state: &'static str,
    carrier: Option<String>,
    tracking_number: Option<String>,
    delivery_state: Option<&'static str>,
    failure_reason: Option<String>,
}

/// What a group of fulfillment events keeps for its transaction. The group holds the
/// `fulfillment:<id>` advisory lock of every order in `locked` ([`Handler::lock_group`]), and
/// read which of them have a shipment: those, and the ones its events decide, are in
/// `decided`. Its new rows wait in `new` for [`Handler::finish`].
#[derive(Default)]
struct Group {
    locked: HashSet<String>,
    decided: HashSet<String>,
    new: Vec<Shipment>,
}

/// Whether the order has a shipment row (shipped or stopped) already.
async fn decided(cx: &mut Context<'_>, order_id: &str) -> Result<bool, HandlerError> {
    let group = cx.state::<Group>();
    if group.decided.contains(order_id) {
        return Ok(true);
    }
    if group.locked.contains(order_id) {
        return Ok(false);
    }
    Ok(cx
        .tx
        .query_opt_cached("SELECT 1 FROM shipments WHERE order_id = $1", &[&order_id])
        .await?
        .is_some())
}

/// Records the decision `s`, unless one was recorded first; returns whether it was. Inside a
/// group, which holds the order's lock, the row is written by [`Handler::finish`]. A plain
/// `INSERT` there fails the group if an event running alone elsewhere (which takes no advisory
/// lock) decided first; the events are then run alone, and see that decision. Alone, the row
/// is inserted now, and the primary key makes the first decision win.
async fn record(cx: &mut Context<'_>, s: Shipment) -> Result<bool, HandlerError> {
    let group = cx.state::<Group>();
    if group.locked.contains(&s.order_id) {
        if !group.decided.insert(s.order_id.clone()) {
            return Ok(false);
        }
        group.new.push(s);
        return Ok(true);
    }
    let inserted = cx
        .tx
        .execute_cached(
            "INSERT INTO shipments (order_id, state, carrier, tracking_number, delivery_state,
                 failure_reason)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
            &[
                &s.order_id,
                &s.state,
                &s.carrier,
                &s.tracking_number,
                &s.delivery_state,
                &s.failure_reason,
            ],
        )
        .await?;
    Ok(inserted == 1)
}

/// Inserts `new` in one statement.
async fn write_back(tx: &Tx, new: Vec<Shipment>) -> Result<(), HandlerError> {
    if new.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = new.iter().map(|s| s.order_id.as_str()).collect();
    let states: Vec<&str> = new.iter().map(|s| s.state).collect();
    let carriers: Vec<Option<&str>> = new.iter().map(|s| s.carrier.as_deref()).collect();
    let tracking: Vec<Option<&str>> = new.iter().map(|s| s.tracking_number.as_deref()).collect();
    let delivery: Vec<Option<&str>> = new.iter().map(|s| s.delivery_state).collect();
    let failure: Vec<Option<&str>> = new.iter().map(|s| s.failure_reason.as_deref()).collect();
    tx.execute_cached(
        "INSERT INTO shipments (order_id, state, carrier, tracking_number, delivery_state,
             failure_reason)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
             $6::text[])",
        &[&ids, &states, &carriers, &tracking, &delivery, &failure],
    )
    .await
    .map_err(|e| HandlerError::from_db("recording the shipments", &e))?;
    Ok(())
}

impl Fulfillment {
    pub fn new(carrier: Arc<dyn Carrier>) -> Self {
        Fulfillment { carrier }
    }

    async fn ship(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: OrderReadyToShip = events::decode(event)?;
        if decided(cx, &d.order_id).await? {
            return Ok(());
        }
        // The carrier is idempotent on the order id, so asking again after a rollback is safe.
        let dispatch = self
            .carrier
            .ship(&Parcel {
                order_id: &d.order_id,
                address: &d.shipping_address,
                lines: &d.lines,
            })
            .await
            .map_err(|e| match e {
                CarrierError::Transient(r) => HandlerError::retry(format!("carrier: {r}")),
                CarrierError::Refused(r) => {
                    HandlerError::permanent(format!("carrier refused order {}: {r}", d.order_id))
                }
            })?;
        let (delivery_state, failure) = match &dispatch.delivery {
            None => ("in_transit", None),
            Some(Delivery::Delivered) => ("delivered", None),
            Some(Delivery::Failed { reason }) => ("failed", Some(reason.as_str())),
        };
        let shipped = Shipment {
            order_id: d.order_id.clone(),
            state: "shipped",
            carrier: Some(self.carrier.name().to_string()),
            tracking_number: Some(dispatch.tracking_number.clone()),
            delivery_state: Some(delivery_state),
            failure_reason: failure.map(str::to_string),
        };
        if !record(cx, shipped).await? {
            // A stop request committed meanwhile wins.
            return Ok(());
        }
        let now = Utc::now();
        events::emit(
            cx,
            &OrderShipped {
                meta: Meta::default(),
                order_id: d.order_id.clone(),
                carrier: self.carrier.name().to_string(),
                tracking_number: dispatch.tracking_number.clone(),
                lines: d.lines.clone(),
                shipped_at: now,
            },
        )?;
        match dispatch.delivery {
            None => Ok(()),
            Some(Delivery::Delivered) => events::emit(
                cx,
                &OrderDelivered {
                    meta: Meta::default(),
                    order_id: d.order_id,
                    tracking_number: dispatch.tracking_number,
                    delivered_at: now,
                },
            ),
            Some(Delivery::Failed { reason }) => events::emit(
                cx,
                &DeliveryFailed {
                    meta: Meta::default(),
                    order_id: d.order_id,
                    tracking_number: dispatch.tracking_number,
                    reason,
                    lines: d.lines,
                },
            ),
        }
    }

    async fn stop(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: ShipmentCancelRequested = events::decode(event)?;
        let stopped = Shipment {
            order_id: d.order_id.clone(),
            state: "cancelled",
            carrier: None,
            tracking_number: None,
            delivery_state: None,
            failure_reason: None,
        };
        if !record(cx, stopped).await? {
            // Shipped already: orders learns it from OrderShipped, and the cancellation lost.
            return Ok(());
        }
        events::emit(
            cx,
            &ShipmentCancelled {
                meta: Meta::default(),
                order_id: d.order_id,
            },
        )
    }
}

#[async_trait]
impl Handler for Fulfillment {
    fn name(&self) -> &str {
        "fulfillment"
    }

    fn group_commit(&self) -> bool {
        self.carrier.answers_locally()
    }

    /// The order-id locks, in order-id order, then which of those orders have a shipment.
    async fn lock_group(
        &self,
        tx: &Tx,
        events: &[&Envelope],
        state: &mut GroupState,
    ) -> Result<(), HandlerError> {
        let ids = crate::handlers::sorted_order_ids(events);
        crate::handlers::lock_order_ids(tx, "fulfillment", &ids).await?;
        let rows = tx
            .query_cached(
                "SELECT order_id FROM shipments WHERE order_id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(|e| HandlerError::from_db("reading the shipments", &e))?;
        let group = state.get::<Group>();
        group.locked.extend(ids.iter().map(|id| id.to_string()));
        group
            .decided
            .extend(rows.iter().map(|r| r.get::<_, String>(0)));
        Ok(())
    }

    /// Inserts the shipments the group decided, in one statement.
    async fn finish(&self, tx: &Tx, state: GroupState) -> Result<(), HandlerError> {
        match state.into_inner::<Group>() {
            Some(group) => write_back(tx, group.new).await,
            None => Ok(()),
        }
    }

    async fn handle(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        match event.detail_type.as_str() {
            "OrderReadyToShip" => self.ship(event, cx).await,
            "ShipmentCancelRequested" => self.stop(event, cx).await,
            other => Err(HandlerError::permanent(format!(
                "fulfillment does not handle {other}"
            ))),
        }
    }
}
