//! fulfillment: ships orders that are ready through a [`Carrier`], and stops a parcel when a
//! cancellation arrives before it left.
//!
//! | event | effect | emits |
//! |---|---|---|
//! | `OrderReadyToShip` | a shipment with a tracking number | `OrderShipped`, then `OrderDelivered` or `DeliveryFailed` when the carrier knows |
//! | `ShipmentCancelRequested` | the shipment is stopped, unless it left | `ShipmentCancelled` (only if stopped) |
//!
//! One row per order in `shipments`: `shipping` (the carrier may have the parcel), then
//! `shipped` or `cancelled`. Every event of an order runs under the transaction-scoped advisory
//! lock `fulfillment:<order id>`, taken before the row is read (a group takes all of its orders'
//! locks up front, [`Handler::lock_group`]), so the first decision wins across any number of
//! instances and nobody decides on a row another is about to change.
//!
//! **Shipping.** Under the lock, an order with no row gets a `shipping` row *committed before*
//! the carrier is called, in a short transaction of its own through a second pool (nobody else
//! can hold a conflicting row: they would need the lock we hold, so that write never waits).
//! The carrier is idempotent on the order id ([`Carrier::ship`]). The handler's transaction then
//! turns `shipping` into `shipped` (one statement per transaction, at its end) and emits
//! `OrderShipped`. A group does both steps once for
//! all of its orders that start with `OrderReadyToShip`: one statement records their intents,
//! one [`Carrier::ship_all`] hands their parcels over, and each event then takes its answer
//! exactly as a rerun after a crash would (`Fulfillment::ship_ahead`).
//!
//! **Stopping.** A stop request that finds no row records `cancelled`. One that lands while a
//! ship is in flight waits on the order's lock for its outcome, and then finds `shipped` (the
//! cancellation lost; orders learns it from `OrderShipped`). One that finds `shipping` (a ship
//! died after recording its intent, perhaps after the carrier took the parcel) cancels with the
//! carrier, by key, before recording `cancelled`: the carrier then refuses a later `ship` of
//! that key, so a rerun of the ship cannot create a parcel. If the carrier answers that the
//! parcel left ([`Cancellation::TooLate`]) the row stays `shipping` and the ship's rerun records
//! `shipped`.
//!
//! **What happens if two processes, or a crash, land here.**
//! - Two processes with the same order: the second waits on the lock, then reads the first's
//!   committed decision and does nothing (a duplicate delivery) or acts on it (a stop after a
//!   ship).
//! - A crash (or a rolled-back transaction) before the intent commits: nothing happened; the
//!   rerun starts again.
//! - A crash after the intent, before or after the carrier took the parcel: the row says
//!   `shipping`. The ship's rerun asks the carrier again with the same key and gets the same
//!   parcel (one shipment, not zero and not two) and records `shipped`; a stop request that
//!   comes first cancels with the carrier, and then the rerun of the ship hears
//!   [`CarrierError::Cancelled`] and does nothing.
//! - A crash after the carrier cancelled, before the stop committed: the stop's rerun cancels
//!   again (idempotent); a ship's rerun that comes first hears `Cancelled` and records the
//!   cancellation (emitting `ShipmentCancelled`) itself, so it is emitted once.
//! - A `shipping` row nobody reruns (both messages dead-lettered) stays `shipping`: the parcel's
//!   fate is then at the carrier, and the row says so to an operator.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use deadpool_postgres::Pool;

use crate::domain::envelope::Envelope;
use crate::domain::events::{
    self, DeliveryFailed, Event, Meta, OrderDelivered, OrderReadyToShip, OrderShipped,
    ShipmentCancelRequested, ShipmentCancelled,
};
use crate::handlers::{Context, Handler};
use crate::providers::carrier::{Cancellation, Carrier, CarrierError, Delivery, Dispatch, Parcel};
use crate::store::db::{Cached, Tx};

/// The longest a carrier call may take; less when the handler's time is shorter (see
/// [`Context::call_timeout`]).
const CARRIER_CALL_TIMEOUT: Duration = Duration::from_secs(20);
use crate::domain::outcome::HandlerError;

/// The fulfillment handler.
pub struct Fulfillment {
    carrier: Arc<dyn Carrier>,
    /// Where the intent to ship is committed before the carrier is called, outside the
    /// handler's transaction.
    intents: Pool,
}

stored_states!(
    /// A shipment row's state.
    State in "shipment state" {
        Shipping = "shipping";
        Shipped = "shipped";
        Cancelled = "cancelled";
    }
);

/// What one transaction of fulfillment events keeps: the orders whose `fulfillment:<id>` lock
/// it holds, and the state of those that have a row, as its events left them.
#[derive(Default)]
pub struct Group {
    locked: HashSet<String>,
    states: HashMap<String, State>,
    /// The carrier's answers for the orders the group shipped in one call
    /// ([`Fulfillment::ship_ahead`]), taken by their `OrderReadyToShip`.
    dispatched: HashMap<String, Result<Dispatch, CarrierError>>,
    /// Shipments that left `shipping` for `shipped` in this transaction, written together by
    /// [`Handler::finish`].
    shipped: Vec<Shipped>,
}

/// A `shipped` row to write.
struct Shipped {
    order_id: String,
    tracking_number: String,
    delivery_state: &'static str,
    failure_reason: Option<String>,
}

/// Turns the transaction's `shipping` rows into `shipped`, in one statement.
async fn write_shipped(tx: &Tx, carrier: &str, rows: Vec<Shipped>) -> Result<(), HandlerError> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.order_id.as_str()).collect();
    let tracking: Vec<&str> = rows.iter().map(|r| r.tracking_number.as_str()).collect();
    let delivery: Vec<&str> = rows.iter().map(|r| r.delivery_state).collect();
    let failure: Vec<Option<&str>> = rows.iter().map(|r| r.failure_reason.as_deref()).collect();
    let updated = tx
        .execute_cached(
            "UPDATE shipments AS s
                SET state = 'shipped', carrier = $2, tracking_number = u.tracking,
                    delivery_state = u.delivery, failure_reason = u.failure, updated_at = now()
               FROM unnest($1::text[], $3::text[], $4::text[], $5::text[])
                    AS u(order_id, tracking, delivery, failure)
              WHERE s.order_id = u.order_id AND s.state = 'shipping'",
            &[&ids, &carrier, &tracking, &delivery, &failure],
        )
        .await
        .map_err(|e| HandlerError::from_db("recording the shipments", &e))?;
    if updated != rows.len() as u64 {
        return Err(HandlerError::retry(format!(
            "a shipment among {ids:?} left `shipping` under its order's lock"
        )));
    }
    Ok(())
}

/// Takes the order's lock unless this transaction holds it, and returns its shipment's state.
async fn lock(cx: &mut Context<'_, Group>, order_id: &str) -> Result<Option<State>, HandlerError> {
    let tx = cx.tx;
    if !cx.batch.locked.contains(order_id) {
        crate::handlers::lock_order_ids(tx, "fulfillment", &[order_id]).await?;
        let row = tx
            .query_opt_cached(
                "SELECT state FROM shipments WHERE order_id = $1",
                &[&order_id],
            )
            .await
            .map_err(|e| HandlerError::from_db("reading the shipment", &e))?;
        let group = &mut cx.batch;
        group.locked.insert(order_id.to_string());
        if let Some(row) = row {
            group
                .states
                .insert(order_id.to_string(), State::parse(row.get(0))?);
        }
    }
    Ok(cx.batch.states.get(order_id).copied())
}

/// Records `cancelled` for an order whose lock this transaction holds, and emits
/// `ShipmentCancelled`.
async fn cancelled(
    cx: &mut Context<'_, Group>,
    order_id: &str,
    had_row: bool,
) -> Result<(), HandlerError> {
    let sql = if had_row {
        "UPDATE shipments SET state = 'cancelled', updated_at = now() WHERE order_id = $1"
    } else {
        "INSERT INTO shipments (order_id, state) VALUES ($1, 'cancelled')"
    };
    cx.tx
        .execute_cached(sql, &[&order_id])
        .await
        .map_err(|e| HandlerError::from_db("recording the cancellation", &e))?;
    cx.batch
        .states
        .insert(order_id.to_string(), State::Cancelled);
    cx.emit_event(&ShipmentCancelled {
        meta: Meta::default(),
        order_id: order_id.to_string(),
    })
}

fn carrier_error(order_id: &str, e: CarrierError) -> HandlerError {
    match e {
        CarrierError::Transient(r) => HandlerError::retry(format!("carrier: {r}")),
        CarrierError::Refused(r) => {
            HandlerError::permanent(format!("carrier refused order {order_id}: {r}"))
        }
        CarrierError::Cancelled => {
            HandlerError::permanent(format!("carrier: the parcel of {order_id} was cancelled"))
        }
    }
}

impl Fulfillment {
    /// A handler shipping through `carrier`, committing its intent to ship through `intents`
    /// before each carrier call. Each ship holds a second connection of `intents` briefly
    /// while its transaction holds one: give it a pool of its own.
    pub fn new(carrier: Arc<dyn Carrier>, intents: Pool) -> Self {
        Fulfillment { carrier, intents }
    }

    /// Commits a `shipping` row for each of `order_ids`, whose locks the caller's transaction
    /// holds and which have no row: one statement, in a transaction of its own.
    async fn record_intents(&self, order_ids: &[&str]) -> Result<(), HandlerError> {
        let client = self.intents.get().await.map_err(|e| {
            HandlerError::retry(format!(
                "recording the intent to ship {} order(s): {e}",
                order_ids.len()
            ))
        })?;
        let inserted = client
            .execute_cached(
                "INSERT INTO shipments (order_id, state)
                 SELECT id, 'shipping' FROM unnest($1::text[]) AS u(id)
                 ON CONFLICT (order_id) DO NOTHING",
                &[&order_ids],
            )
            .await
            .map_err(|e| HandlerError::from_db("recording the intent to ship", &e))?;
        if inserted != order_ids.len() as u64 {
            // Only a writer that does not take the lock (an older version, mid-deploy) can
            // get here: read again.
            return Err(HandlerError::retry(format!(
                "a shipment among {order_ids:?} was written without the order's lock"
            )));
        }
        Ok(())
    }

    /// For a group: the orders whose first event in it is an `OrderReadyToShip` and which are
    /// not decided get their intents recorded in one statement and are handed to the carrier
    /// in one call, before any event runs. Each event then finds its order `shipping` and takes
    /// the carrier's answer from the group, as a rerun after a crash would ask for it again.
    /// Nothing changes for the order otherwise: the events still decide, in order, under the
    /// locks the group holds; if the group fails, its events run alone and ask the carrier
    /// again by key. A carrier that cannot be reached here is asked again per event.
    async fn ship_ahead(
        &self,
        events: &[&Envelope],
        group: &mut Group,
    ) -> Result<(), HandlerError> {
        let mut seen = HashSet::new();
        let mut ready = Vec::new();
        for event in events {
            let Some(order_id) = event.order_id() else {
                continue;
            };
            if !seen.insert(order_id) || event.detail_type != OrderReadyToShip::DETAIL_TYPE {
                continue;
            }
            // One that does not decode is left to its own run, which dead-letters it.
            if let Ok(d) = events::decode::<OrderReadyToShip>(event) {
                match group.states.get(&d.order_id) {
                    None | Some(State::Shipping) => ready.push(d),
                    Some(State::Shipped | State::Cancelled) => {}
                }
            }
        }
        if ready.is_empty() {
            return Ok(());
        }
        let new: Vec<&str> = ready
            .iter()
            .filter(|d| !group.states.contains_key(&d.order_id))
            .map(|d| d.order_id.as_str())
            .collect();
        if !new.is_empty() {
            self.record_intents(&new).await?;
            for id in new {
                group.states.insert(id.to_string(), State::Shipping);
            }
        }
        let parcels: Vec<Parcel<'_>> = ready
            .iter()
            .map(|d| Parcel {
                order_id: &d.order_id,
                address: &d.shipping_address,
                lines: &d.lines,
            })
            .collect();
        let Ok(answers) =
            tokio::time::timeout(CARRIER_CALL_TIMEOUT, self.carrier.ship_all(&parcels)).await
        else {
            return Ok(());
        };
        for (d, answer) in ready.iter().zip(answers) {
            if !matches!(answer, Err(CarrierError::Transient(_))) {
                group.dispatched.insert(d.order_id.clone(), answer);
            }
        }
        Ok(())
    }

    async fn ship(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Group>,
    ) -> Result<(), HandlerError> {
        let d: OrderReadyToShip = events::decode(event)?;
        match lock(cx, &d.order_id).await? {
            Some(State::Shipped | State::Cancelled) => return Ok(()),
            // An earlier run recorded its intent and died: ask the carrier again, by key.
            Some(State::Shipping) => {}
            None => {
                self.record_intents(&[&d.order_id]).await?;
                cx.batch.states.insert(d.order_id.clone(), State::Shipping);
            }
        }
        let shipped = match cx.batch.dispatched.remove(&d.order_id) {
            Some(answer) => answer,
            None => {
                let parcel = Parcel {
                    order_id: &d.order_id,
                    address: &d.shipping_address,
                    lines: &d.lines,
                };
                // Bounded by the handler's time, so the answer can still be recorded and
                // committed; a ship cut short is asked again by key on the retry.
                cx.bounded(CARRIER_CALL_TIMEOUT, self.carrier.ship(&parcel))
                    .await
                    .unwrap_or_else(|limit| {
                        Err(CarrierError::Transient(crate::handlers::out_of_time(
                            "the carrier's ship",
                            limit,
                        )))
                    })
            }
        };
        let dispatch = match shipped {
            Ok(dispatch) => dispatch,
            // A stop cancelled with the carrier and died before its commit: record it here;
            // the stop's rerun then finds it recorded.
            Err(CarrierError::Cancelled) => return cancelled(cx, &d.order_id, true).await,
            Err(e) => return Err(carrier_error(&d.order_id, e)),
        };
        let (delivery_state, failure) = match &dispatch.delivery {
            None => ("in_transit", None),
            Some(Delivery::Delivered) => ("delivered", None),
            Some(Delivery::Failed { reason }) => ("failed", Some(reason.as_str())),
        };
        cx.batch.shipped.push(Shipped {
            order_id: d.order_id.clone(),
            tracking_number: dispatch.tracking_number.clone(),
            delivery_state,
            failure_reason: failure.map(str::to_string),
        });
        cx.batch.states.insert(d.order_id.clone(), State::Shipped);
        let now = Utc::now();
        cx.emit_event(&OrderShipped {
            meta: Meta::default(),
            order_id: d.order_id.clone(),
            carrier: self.carrier.name().to_string(),
            tracking_number: dispatch.tracking_number.clone(),
            lines: d.lines.clone(),
            shipped_at: now,
        })?;
        match dispatch.delivery {
            None => Ok(()),
            Some(Delivery::Delivered) => cx.emit_event(&OrderDelivered {
                meta: Meta::default(),
                order_id: d.order_id,
                tracking_number: dispatch.tracking_number,
                delivered_at: now,
            }),
            Some(Delivery::Failed { reason }) => cx.emit_event(&DeliveryFailed {
                meta: Meta::default(),
                order_id: d.order_id,
                tracking_number: dispatch.tracking_number,
                reason,
                lines: d.lines,
            }),
        }
    }

    async fn stop(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Group>,
    ) -> Result<(), HandlerError> {
        let d: ShipmentCancelRequested = events::decode(event)?;
        match lock(cx, &d.order_id).await? {
            None => cancelled(cx, &d.order_id, false).await,
            // A ship died after recording its intent: the carrier may have the parcel.
            Some(State::Shipping) => match cx
                .bounded(CARRIER_CALL_TIMEOUT, self.carrier.cancel(&d.order_id))
                .await
                .unwrap_or_else(|limit| {
                    Err(CarrierError::Transient(crate::handlers::out_of_time(
                        "the carrier's cancel",
                        limit,
                    )))
                }) {
                Ok(Cancellation::Cancelled) => cancelled(cx, &d.order_id, true).await,
                Ok(Cancellation::TooLate) => {
                    tracing::info!(
                        order_id = %d.order_id,
                        "the parcel left before the stop request; the ship's rerun records it"
                    );
                    Ok(())
                }
                Err(e) => Err(carrier_error(&d.order_id, e)),
            },
            // Shipped already: orders learns it from OrderShipped, and the cancellation lost.
            Some(State::Shipped | State::Cancelled) => Ok(()),
        }
    }
}

#[async_trait]
impl Handler for Fulfillment {
    type Batch = Group;

    fn name(&self) -> &str {
        "fulfillment"
    }

    fn group_commit(&self) -> bool {
        self.carrier.answers_locally()
    }

    /// The order-id locks, in order-id order, then the shipments of those orders; then the
    /// group's ships are recorded and handed to the carrier together ([`Fulfillment::ship_ahead`]).
    async fn lock_group(
        &self,
        tx: &Tx,
        events: &[&Envelope],
        batch: &mut Group,
    ) -> Result<(), HandlerError> {
        let ids = crate::handlers::sorted_order_ids(events);
        crate::handlers::lock_order_ids(tx, "fulfillment", &ids).await?;
        let rows = tx
            .query_cached(
                "SELECT order_id, state FROM shipments WHERE order_id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(|e| HandlerError::from_db("reading the shipments", &e))?;
        let group = batch;
        group.locked.extend(ids.iter().map(|id| id.to_string()));
        for r in &rows {
            group.states.insert(r.get(0), State::parse(r.get(1))?);
        }
        self.ship_ahead(events, group).await
    }

    async fn finish(&self, tx: &Tx, group: Group) -> Result<(), HandlerError> {
        write_shipped(tx, self.carrier.name(), group.shipped).await
    }

    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Group>,
    ) -> Result<(), HandlerError> {
        match event.detail_type.as_str() {
            OrderReadyToShip::DETAIL_TYPE => self.ship(event, cx).await,
            ShipmentCancelRequested::DETAIL_TYPE => self.stop(event, cx).await,
            other => Err(HandlerError::permanent(format!(
                "fulfillment does not handle {other}"
            ))),
        }
    }
}
