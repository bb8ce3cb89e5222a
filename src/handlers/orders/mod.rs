//! orders: validates and persists orders and customers, and owns the order saga's state
//! machine.
//!
//! An order's `status` moves along guarded transitions:
//!
//! ```text
//! accepted ──(reserved and authorized)──> ready_to_ship ──(OrderShipped)──> shipped
//!    │                                         │                              │
//!    │ stock short, payment failed,            │ cancellation requested:      ├─(captured, committed, delivered)─> completed
//!    │ or cancellation requested               │ ShipmentCancelRequested,     │
//!    v                                         │ then ShipmentCancelled       └─(DeliveryFailed)─> returning
//! cancelling <─────────────────────────────────┘                                                    │
//!    │ (stock released and payment voided or refunded)                  (restocked and refunded) │
//!    v                                                                                            v
//! cancelled                                                                                   returned
//! ```
//!
//! plus `rejected` for an order that failed validation. `completed`, `cancelled`, `returned`
//! and `rejected` are terminal, and only reached when money and stock are settled.
//!
//! Outcome events arrive in any order, duplicated, late. Each one only moves the matching
//! sub-state (`reservation_state`, `payment_state`, `delivery_state`) forward by rank, under
//! `SELECT ... FOR UPDATE` on the order row; then [`advance`] derives the next status from the
//! whole row. The result does not depend on the order of arrival.
//!
//! An operator's cancellation (`OperatorCancellationRequested`, from `orderfleet order
//! cancel`) is honoured like the storefront's, and its outcome is recorded in the audited
//! action (`operator_actions`): `applied` when the order is cancelled at once or its parcel is
//! stopped, `pending` while fulfillment is asked to stop it, `refused` once it has shipped (or
//! was cancelled or rejected already). An operator's refund (`PaymentRefunded` with an
//! `action_id`) does not move the saga: the order goes on, with less money kept.

mod saga;
mod store;
mod validate;

use std::collections::{BTreeSet, HashSet};

use async_trait::async_trait;

use crate::domain::envelope::Envelope;
use crate::domain::events::Event;
use crate::domain::events::{
    self, Address, CancelReason, Meta, OperatorCancellationRequested, OrderAccepted,
    OrderCancellationRequested, OrderCancelled, OrderCompleted, OrderPlaced, OrderReadyToShip,
    OrderRejected, PaymentFailed, PaymentRefunded, PaymentStage, RejectionReason,
    ShipmentCancelRequested,
};
use crate::domain::outcome::HandlerError;
use crate::handlers::{lock_keys, sorted_order_ids, Context, Handler};
use crate::store::db::{Cached, Tx};
use crate::store::operator_actions;
pub use saga::{advance, DeliveryState, Effect, PaymentState, ReservationState, Snapshot, Status};
pub use store::Rows;
use store::*;
pub use validate::{validate, ValidOrder, MAX_UNITS_PER_SKU};

/// The orders handler.
pub struct Orders;

/// Emits what a transition asks for.
async fn apply_effect(
    cx: &mut Context<'_, Rows>,
    order_id: &str,
    effect: Effect,
) -> Result<(), HandlerError> {
    if effect == Effect::None {
        return Ok(());
    }
    let d = details(cx, order_id).await?;
    let missing = |what: &str| HandlerError::permanent(format!("order {order_id} has no {what}"));
    let customer = || d.customer.clone().ok_or_else(|| missing("customer"));
    let total = || d.total.ok_or_else(|| missing("total"));
    let order_id = order_id.to_string();
    match effect {
        Effect::None => Ok(()),
        Effect::ReadyToShip => {
            let address = d
                .address
                .clone()
                .ok_or_else(|| missing("shipping address"))?;
            let address: Address = serde_json::from_value(address).map_err(|e| {
                HandlerError::permanent(format!(
                    "order {order_id}: stored address is unreadable: {e}"
                ))
            })?;
            cx.emit_event(&OrderReadyToShip {
                meta: Meta::default(),
                customer: customer()?,
                order_id,
                lines: d.lines,
                shipping_address: address,
            })
        }
        Effect::Cancel(reason) => cx.emit_event(&OrderCancelled {
            meta: Meta::default(),
            total: total()?,
            order_id,
            reason,
            lines: d.lines,
        }),
        Effect::Completed => cx.emit_event(&OrderCompleted {
            meta: Meta::default(),
            customer_id: customer()?.id,
            total: total()?,
            order_id,
            lines: d.lines,
        }),
    }
}

/// Moves the order as far as it can go on its own, emitting on the way, then saves it.
async fn settle(cx: &mut Context<'_, Rows>, mut o: Locked) -> Result<(), HandlerError> {
    while let Some((next, effect)) = advance(&o.snap) {
        tracing::debug!(
            order_id = %o.id,
            from = o.snap.status.as_str(),
            to = next.as_str(),
            "order transition"
        );
        if let Effect::Cancel(reason) = effect {
            o.cancel_reason
                .get_or_insert_with(|| reason.as_str().to_string());
        }
        o.snap.status = next;
        apply_effect(cx, &o.id, effect).await?;
    }
    save(cx, o);
    Ok(())
}

/// What a cancellation request did to an order.
enum Cancel {
    /// Cancelled at once: it was not ready to ship yet.
    Cancelled,
    /// Ready to ship: fulfillment is asked to stop the parcel (`asked`), or was asked before.
    StoppingParcel { asked: bool },
    /// Too late, or nothing to do: the order's status.
    Ignored(Status),
}

/// Honours a cancellation request for the locked order `o` (see [`Orders::request_cancel`]).
async fn cancel(cx: &mut Context<'_, Rows>, mut o: Locked) -> Result<Cancel, HandlerError> {
    match o.snap.status {
        Status::Accepted => {
            o.cancel_requested = true;
            o.cancel_reason = Some(CancelReason::Requested.as_str().into());
            o.snap.status = Status::Cancelling;
            apply_effect(cx, &o.id, Effect::Cancel(CancelReason::Requested)).await?;
            settle(cx, o).await?;
            Ok(Cancel::Cancelled)
        }
        Status::ReadyToShip if !o.cancel_requested => {
            o.cancel_requested = true;
            cx.emit_event(&ShipmentCancelRequested {
                meta: Meta::default(),
                order_id: o.id.clone(),
            })?;
            save(cx, o);
            Ok(Cancel::StoppingParcel { asked: true })
        }
        Status::ReadyToShip => Ok(Cancel::StoppingParcel { asked: false }),
        status => Ok(Cancel::Ignored(status)),
    }
}

impl Orders {
    async fn place(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        let d: OrderPlaced = events::decode(event)?;
        if d.order_id.trim().is_empty() {
            return Err(HandlerError::poison("OrderPlaced has an empty order_id"));
        }
        lock_order_id(cx, &d.order_id).await?;
        let skus: Vec<&str> = d.lines.iter().map(|l| l.sku.as_str()).collect();
        let (known_already, cancelled_early, known) = match cx.batch.facts(&d.order_id, &skus) {
            Some(facts) => facts,
            None => {
                // After the lock, in one round trip: is the order known already, was its
                // cancellation requested before it arrived, and which of its SKUs does the
                // catalogue know.
                let facts = cx
                    .tx
                    .query_one_cached(
                        "SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1),
                                EXISTS (SELECT 1 FROM order_cancellation_requests WHERE order_id = $1),
                                ARRAY(SELECT sku FROM products WHERE sku = ANY($2))",
                        &[&d.order_id, &skus],
                    )
                    .await?;
                let known: HashSet<String> = facts.get::<_, Vec<String>>(2).into_iter().collect();
                (facts.get(0), facts.get(1), known)
            }
        };
        if known_already {
            // The storefront placed it twice (a new event id for the same order).
            return Ok(());
        }
        let address = serde_json::to_value(&d.shipping_address)
            .map_err(|e| HandlerError::permanent(format!("encoding the address: {e}")))?;
        let valid = match validate(&d, &known) {
            Ok(v) => v,
            Err(reasons) => return self.reject(cx, d, reasons).await,
        };
        let status = if cancelled_early {
            Status::Cancelling
        } else {
            Status::Accepted
        };
        let cancel_reason = cancelled_early.then(|| CancelReason::Requested.as_str());
        let line_nos: Vec<i32> = (1..=valid.lines.len() as i32).collect();
        let skus: Vec<&str> = valid.lines.iter().map(|l| l.sku.as_str()).collect();
        let qtys: Vec<i64> = valid.lines.iter().map(|l| l.quantity).collect();
        let prices: Vec<i64> = valid
            .lines
            .iter()
            .map(|l| l.unit_price.amount_minor)
            .collect();
        let (discount, shipping, tax) = d.charges.minor();
        // Customer, order and lines in one statement. The foreign keys are checked at its end,
        // when all three rows exist.
        cx.tx
            .execute_cached(
                "WITH customer AS (
                     INSERT INTO customers (id, email, name) VALUES ($2, $3, $4)
                     ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, name = EXCLUDED.name,
                         updated_at = now()
                     WHERE (customers.email, customers.name)
                           IS DISTINCT FROM (EXCLUDED.email, EXCLUDED.name)
                 ), placed AS (
                     INSERT INTO orders (id, customer_id, status, total_minor, currency,
                                         shipping_address, placed_at,
                                         cancel_requested, cancel_reason, order_number,
                                         platform, platform_order_id, discount_minor,
                                         shipping_minor, tax_minor, tax_included)
                     VALUES ($1, $2, $5, $6, $7, $9, $10, $11, $12, $17, $18, $19, $20, $21,
                             $22, $23)
                 ), handed_over AS (
                     -- The token goes to payments, and nowhere else (migration 0013).
                     INSERT INTO payment_methods (order_id, payment_token)
                     SELECT $1, $8 WHERE NOT $11
                     ON CONFLICT (order_id) DO NOTHING
                 )
                 INSERT INTO order_lines (order_id, line_no, sku, quantity, unit_price_minor, currency)
                 SELECT $1, n, sku, qty, price, $7
                   FROM unnest($13::int[], $14::text[], $15::bigint[], $16::bigint[])
                        AS l(n, sku, qty, price)",
                &[
                    &d.order_id,
                    &valid.customer.id,
                    &valid.customer.email,
                    &valid.customer.name,
                    &status.as_str(),
                    &valid.total.amount_minor,
                    &valid.total.currency.as_str(),
                    &d.payment_token,
                    &address,
                    &d.placed_at,
                    &cancelled_early,
                    &cancel_reason,
                    &line_nos,
                    &skus,
                    &qtys,
                    &prices,
                    &d.order_number,
                    &d.platform.as_ref().map(|p| p.platform.as_str()),
                    &d.platform.as_ref().map(|p| p.id.as_str()),
                    &discount,
                    &shipping,
                    &tax,
                    &d.charges.tax_included,
                ],
            )
            .await?;
        cx.batch.placed.insert(d.order_id.clone());
        if cancelled_early {
            // Never accepted, so nothing to reserve or authorize; OrderCancelled still goes
            // out so that inventory and payments record the order as settled and confirm.
            return apply_effect(cx, &d.order_id, Effect::Cancel(CancelReason::Requested)).await;
        }
        cx.emit_event(&OrderAccepted {
            meta: Meta::default(),
            order_id: d.order_id,
            customer: valid.customer,
            lines: valid.lines,
            total: valid.total,
            payment_token: None,
            shipping_address: d.shipping_address,
            placed_at: d.placed_at,
            order_number: d.order_number,
            platform: d.platform,
            charges: d.charges,
        })
    }

    async fn reject(
        &self,
        cx: &mut Context<'_, Rows>,
        d: OrderPlaced,
        reasons: Vec<RejectionReason>,
    ) -> Result<(), HandlerError> {
        let codes: Vec<&str> = reasons.iter().map(|r| r.code.as_str()).collect();
        tracing::info!(order_id = %d.order_id, reasons = ?codes, "order rejected");
        let stored = serde_json::to_value(&reasons)
            .map_err(|e| HandlerError::permanent(format!("encoding the reasons: {e}")))?;
        cx.tx
            .execute_cached(
                // No address: a rejected order is never shipped, so it keeps none.
                "INSERT INTO orders (id, status, placed_at, rejection_reasons, terminal_at,
                                     order_number, platform, platform_order_id)
                 VALUES ($1, 'rejected', $2, $3, now(), $4, $5, $6)",
                &[
                    &d.order_id,
                    &d.placed_at,
                    &stored,
                    &d.order_number,
                    &d.platform.as_ref().map(|p| p.platform.as_str()),
                    &d.platform.as_ref().map(|p| p.id.as_str()),
                ],
            )
            .await?;
        cx.batch.placed.insert(d.order_id.clone());
        cx.emit_event(&OrderRejected {
            meta: Meta::default(),
            order_id: d.order_id,
            customer: d.customer,
            reasons,
        })
    }

    /// Honoured until shipment: before the order is ready to ship it is cancelled at once;
    /// while it is ready to ship, fulfillment is asked to stop the parcel first (it may be
    /// leaving right now); after that it is too late and the request is recorded only in logs.
    async fn request_cancel(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        let d: OrderCancellationRequested = events::decode(event)?;
        lock_order_id(cx, &d.order_id).await?;
        let Some(o) = lock(cx, &d.order_id).await? else {
            cx.tx
                .execute_cached(
                    "INSERT INTO order_cancellation_requests (order_id, reason) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &[&d.order_id, &d.reason],
                )
                .await?;
            if let Some(p) = &mut cx.batch.placing {
                p.cancel_requested.insert(d.order_id.clone());
            }
            return Ok(());
        };
        match cancel(cx, o).await? {
            Cancel::Ignored(status) => {
                tracing::info!(
                    order_id = %d.order_id,
                    status = status.as_str(),
                    "cancellation request ignored: already cancelling, shipped or final"
                );
                Ok(())
            }
            Cancel::Cancelled | Cancel::StoppingParcel { .. } => Ok(()),
        }
    }

    /// An operator's cancellation: as the storefront's, with the outcome recorded in the
    /// audited action.
    async fn operator_cancel(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        let d: OperatorCancellationRequested = events::decode(event)?;
        lock_order_id(cx, &d.order_id).await?;
        let (outcome, detail) = match lock(cx, &d.order_id).await? {
            None => ("refused", "there is no such order".to_string()),
            Some(o) => match cancel(cx, o).await? {
                Cancel::Cancelled => (
                    "applied",
                    "cancelled before it was ready to ship; stock and money are given back"
                        .to_string(),
                ),
                Cancel::StoppingParcel { asked: true } => (
                    "pending",
                    "the order is ready to ship: fulfillment is asked to stop the parcel"
                        .to_string(),
                ),
                Cancel::StoppingParcel { asked: false } => (
                    "pending",
                    "an earlier cancellation is already stopping the parcel".to_string(),
                ),
                Cancel::Ignored(status) => (
                    "refused",
                    match status {
                        Status::Cancelling | Status::Cancelled => {
                            "the order is cancelled already".to_string()
                        }
                        Status::Rejected => "the order was rejected; nothing to cancel".into(),
                        s => format!(
                            "the order has shipped (it is {}): refund it instead",
                            s.as_str()
                        ),
                    },
                ),
            },
        };
        tracing::info!(order_id = %d.order_id, action_id = d.action_id, operator = %d.operator,
            outcome, detail = %detail, "operator cancellation");
        operator_actions::record_outcome(cx.tx, d.action_id, &d.order_id, outcome, &detail).await
    }

    /// Applies an outcome of inventory, payments or fulfillment, then advances.
    async fn outcome(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        use DeliveryState as D;
        use PaymentState as P;
        use ReservationState as R;
        let order_id = events::decode_order_id(event)?;
        let mut o = lock_existing(cx, &order_id).await?;
        let s = &mut o.snap;
        let tracking = || {
            event
                .detail
                .get("tracking_number")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        match event.detail_type.as_str() {
            events::InventoryReserved::DETAIL_TYPE => {
                s.reservation = s.reservation.advance_to(R::Reserved)
            }
            events::InventoryRejected::DETAIL_TYPE => {
                s.reservation = s.reservation.advance_to(R::Rejected)
            }
            events::InventoryCommitted::DETAIL_TYPE => {
                s.reservation = s.reservation.advance_to(R::Committed)
            }
            events::InventoryReleased::DETAIL_TYPE => {
                s.reservation = s.reservation.advance_to(R::Released)
            }
            events::PaymentAuthorized::DETAIL_TYPE => {
                s.payment = s.payment.advance_to(P::Authorized)
            }
            PaymentFailed::DETAIL_TYPE => {
                let d: PaymentFailed = events::decode(event)?;
                if d.stage == PaymentStage::Capture {
                    // The parcel is gone and the capture was refused: a person must look. The
                    // order stays shipped, with the refusal on record for reports.
                    tracing::error!(order_id = %o.id, code = %d.code, "capture declined; the order stays shipped");
                    s.payment = s.payment.advance_to(P::CaptureFailed);
                } else {
                    s.payment = s.payment.advance_to(P::Failed);
                }
            }
            events::PaymentCaptured::DETAIL_TYPE => s.payment = s.payment.advance_to(P::Captured),
            events::PaymentVoided::DETAIL_TYPE => s.payment = s.payment.advance_to(P::Voided),
            PaymentRefunded::DETAIL_TYPE => {
                let d: PaymentRefunded = events::decode(event)?;
                // An operator's refund leaves the order where it is (see the module doc).
                if !d.by_operator() {
                    s.payment = s.payment.advance_to(P::Refunded);
                }
            }
            events::OrderShipped::DETAIL_TYPE
            | events::OrderDelivered::DETAIL_TYPE
            | events::DeliveryFailed::DETAIL_TYPE => {
                let next = match event.detail_type.as_str() {
                    events::OrderShipped::DETAIL_TYPE => D::Shipped,
                    events::OrderDelivered::DETAIL_TYPE => D::Delivered,
                    _ => D::Failed,
                };
                s.delivery = s.delivery.advance_to(next);
                if o.tracking_number.is_none() {
                    o.tracking_number = tracking();
                }
                match o.snap.status {
                    // A cancellation requested meanwhile lost the race: the parcel left.
                    Status::ReadyToShip => {
                        o.snap.status = Status::Shipped;
                        if o.cancel_requested {
                            operator_actions::settle_pending_cancellations(
                                cx.tx,
                                &o.id,
                                "refused",
                                "the parcel left before it could be stopped: refund it instead",
                            )
                            .await?;
                        }
                    }
                    Status::Accepted | Status::Cancelling | Status::Cancelled => {
                        return Err(HandlerError::permanent(format!(
                            "order {} shipped while {}: fulfillment shipped an order that was \
                             not ready to ship",
                            o.id,
                            o.snap.status.as_str()
                        )))
                    }
                    _ => {}
                }
            }
            events::ShipmentCancelled::DETAIL_TYPE => {
                if o.snap.status == Status::ReadyToShip {
                    o.snap.status = Status::Cancelling;
                    o.cancel_reason = Some(CancelReason::Requested.as_str().into());
                    apply_effect(cx, &o.id, Effect::Cancel(CancelReason::Requested)).await?;
                    operator_actions::settle_pending_cancellations(
                        cx.tx,
                        &o.id,
                        "applied",
                        "the parcel was stopped; stock and money are given back",
                    )
                    .await?;
                }
            }
            other => {
                return Err(HandlerError::permanent(format!(
                    "orders does not handle {other}"
                )))
            }
        }
        settle(cx, o).await
    }
}

#[async_trait]
impl Handler for Orders {
    type Batch = Rows;

    fn name(&self) -> &str {
        "orders"
    }

    fn group_commit(&self) -> bool {
        true
    }

    /// The order-id locks of `OrderPlaced` and `OrderCancellationRequested`, then the
    /// customers that orders being placed upsert, then the order rows, each in key order.
    async fn lock_group(
        &self,
        tx: &Tx,
        events: &[&Envelope],
        batch: &mut Rows,
    ) -> Result<(), HandlerError> {
        let ids = sorted_order_ids(events);
        let customers: BTreeSet<&str> = events
            .iter()
            .filter(|e| e.detail_type == <OrderPlaced as events::Event>::DETAIL_TYPE)
            .filter_map(|e| e.detail.get("customer")?.get("id")?.as_str())
            .collect();
        let keys: Vec<(&str, &str)> = ids
            .iter()
            .map(|id| ("orders", *id))
            .chain(customers.into_iter().map(|c| ("customers", c)))
            .collect();
        lock_keys(tx, &keys).await?;
        let rows = batch;
        rows.held.extend(ids.iter().map(|id| id.to_string()));
        for (o, details) in select_locked(tx, &ids).await? {
            rows.details.insert(o.id.clone(), details);
            rows.locked.insert(o.id.clone(), o);
        }
        let placed: Vec<&Envelope> = events
            .iter()
            .filter(|e| e.detail_type == <OrderPlaced as events::Event>::DETAIL_TYPE)
            .copied()
            .collect();
        if !placed.is_empty() {
            let placed_ids: Vec<&str> = placed.iter().filter_map(|e| e.order_id()).collect();
            let skus: BTreeSet<&str> = placed
                .iter()
                .filter_map(|e| e.detail.get("lines")?.as_array())
                .flatten()
                .filter_map(|l| l.get("sku")?.as_str())
                .collect();
            let skus: Vec<&str> = skus.into_iter().collect();
            let facts = tx
                .query_one_cached(
                    "SELECT ARRAY(SELECT order_id FROM order_cancellation_requests
                                   WHERE order_id = ANY($1)),
                            ARRAY(SELECT sku FROM products WHERE sku = ANY($2))",
                    &[&placed_ids, &skus],
                )
                .await
                .map_err(|e| HandlerError::from_db("reading what the orders need", &e))?;
            rows.placing = Some(Placing {
                cancel_requested: facts.get::<_, Vec<String>>(0).into_iter().collect(),
                asked: skus.iter().map(|s| s.to_string()).collect(),
                known: facts.get::<_, Vec<String>>(1).into_iter().collect(),
            });
        }
        Ok(())
    }

    /// Writes back the orders this transaction changed.
    async fn finish(&self, tx: &Tx, rows: Rows) -> Result<(), HandlerError> {
        write_back(tx, rows).await
    }

    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        match event.detail_type.as_str() {
            OrderPlaced::DETAIL_TYPE => self.place(event, cx).await,
            OrderCancellationRequested::DETAIL_TYPE => self.request_cancel(event, cx).await,
            OperatorCancellationRequested::DETAIL_TYPE => self.operator_cancel(event, cx).await,
            events::InventoryReserved::DETAIL_TYPE
            | events::InventoryRejected::DETAIL_TYPE
            | events::InventoryCommitted::DETAIL_TYPE
            | events::InventoryReleased::DETAIL_TYPE
            | events::PaymentAuthorized::DETAIL_TYPE
            | PaymentFailed::DETAIL_TYPE
            | events::PaymentCaptured::DETAIL_TYPE
            | events::PaymentVoided::DETAIL_TYPE
            | events::PaymentRefunded::DETAIL_TYPE
            | events::OrderShipped::DETAIL_TYPE
            | events::OrderDelivered::DETAIL_TYPE
            | events::DeliveryFailed::DETAIL_TYPE
            | events::ShipmentCancelled::DETAIL_TYPE => self.outcome(event, cx).await,
            other => Err(HandlerError::permanent(format!(
                "orders does not handle {other}"
            ))),
        }
    }
}
