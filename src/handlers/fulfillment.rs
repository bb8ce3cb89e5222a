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

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;

use crate::carrier::{Carrier, CarrierError, Delivery, Parcel};
use crate::db::Cached;
use crate::envelope::Envelope;
use crate::events::{
    self, DeliveryFailed, Meta, OrderDelivered, OrderReadyToShip, OrderShipped,
    ShipmentCancelRequested, ShipmentCancelled,
};
use crate::handlers::{Context, Handler};
use crate::outcome::HandlerError;

/// The fulfillment handler.
pub struct Fulfillment {
    carrier: Arc<dyn Carrier>,
}

impl Fulfillment {
    pub fn new(carrier: Arc<dyn Carrier>) -> Self {
        Fulfillment { carrier }
    }

    async fn ship(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: OrderReadyToShip = events::decode(event)?;
        let decided = cx
            .tx
            .query_opt_cached(
                "SELECT 1 FROM shipments WHERE order_id = $1",
                &[&d.order_id],
            )
            .await?
            .is_some();
        if decided {
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
        // A stop request committed meanwhile wins: the row exists and nothing is inserted.
        let inserted = cx
            .tx
            .execute_cached(
                "INSERT INTO shipments (order_id, state, carrier, tracking_number, delivery_state, failure_reason)
                 VALUES ($1, 'shipped', $2, $3, $4, $5) ON CONFLICT (order_id) DO NOTHING",
                &[
                    &d.order_id,
                    &self.carrier.name(),
                    &dispatch.tracking_number,
                    &delivery_state,
                    &failure,
                ],
            )
            .await?;
        if inserted == 0 {
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
        let stopped = cx
            .tx
            .execute_cached(
                "INSERT INTO shipments (order_id, state) VALUES ($1, 'cancelled')
                 ON CONFLICT (order_id) DO NOTHING",
                &[&d.order_id],
            )
            .await?;
        if stopped == 0 {
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

    /// The order-id locks, in order-id order: events of a group create and change shipments.
    async fn lock_group(
        &self,
        tx: &crate::db::Tx,
        events: &[&Envelope],
        _state: &mut crate::handlers::GroupState,
    ) -> Result<(), HandlerError> {
        let ids = crate::handlers::sorted_order_ids(events);
        crate::handlers::lock_order_ids(tx, "fulfillment", &ids).await
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
