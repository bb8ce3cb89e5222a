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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use async_trait::async_trait;

use crate::domain::envelope::Envelope;
use crate::domain::events::Event;
use crate::domain::events::{
    self, Address, CancelReason, Contact, Currency, Meta, Money, OrderAccepted,
    OrderCancellationRequested, OrderCancelled, OrderCompleted, OrderLine, OrderPlaced,
    OrderReadyToShip, OrderRejected, PaymentFailed, PaymentStage, RejectionCode, RejectionReason,
    ShipmentCancelRequested, SkuQuantity,
};
use crate::domain::outcome::HandlerError;
use crate::handlers::{lock_keys, lock_order_once, sorted_order_ids, Context, Handler};
use crate::store::db::{Cached, Tx};

/// The orders handler.
pub struct Orders;

stored_states!(
    /// The saga's state of an order.
    pub Status in "order status" {
        Accepted = "accepted", 0;
        ReadyToShip = "ready_to_ship", 1;
        Shipped = "shipped", 2;
        Completed = "completed", 3;
        Cancelling = "cancelling", 2;
        Cancelled = "cancelled", 3;
        Returning = "returning", 3;
        Returned = "returned", 4;
        Rejected = "rejected", 4;
    }
);

stored_states!(
    /// What orders has heard from inventory.
    pub ReservationState in "reservation state of an order" {
        Pending = "pending", 0;
        Reserved = "reserved", 1;
        Rejected = "rejected", 1;
        Committed = "committed", 2;
        Released = "released", 3;
    }
);

stored_states!(
    /// What orders has heard from payments.
    pub PaymentState in "payment state of an order" {
        Pending = "pending", 0;
        Authorized = "authorized", 1;
        Failed = "failed", 1;
        Captured = "captured", 2;
        // The provider declined the capture after the parcel left: a person must look.
        CaptureFailed = "capture_failed", 2;
        Voided = "voided", 3;
        Refunded = "refunded", 3;
    }
);

stored_states!(
    /// What orders has heard from fulfillment.
    pub DeliveryState in "delivery state of an order" {
        Pending = "pending", 0;
        Shipped = "shipped", 1;
        Delivered = "delivered", 2;
        Failed = "failed", 2;
    }
);

impl Status {
    /// Completed, cancelled, returned or rejected: money and stock are settled.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Cancelled | Status::Returned | Status::Rejected
        )
    }
}

/// The state of one order as the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub status: Status,
    pub reservation: ReservationState,
    pub payment: PaymentState,
    pub delivery: DeliveryState,
}

/// What a status transition asks the handler to emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    ReadyToShip,
    Cancel(CancelReason),
    Completed,
}

/// The next transition the order can take on its own, given everything heard so far; `None`
/// when it must wait. Applied repeatedly until it returns `None`.
pub fn advance(s: &Snapshot) -> Option<(Status, Effect)> {
    use DeliveryState as D;
    use PaymentState as P;
    use ReservationState as R;
    let money_settled = matches!(s.payment, P::Voided | P::Refunded);
    match s.status {
        Status::Accepted => {
            if s.reservation == R::Reserved && s.payment == P::Authorized {
                Some((Status::ReadyToShip, Effect::ReadyToShip))
            } else if matches!(s.reservation, R::Rejected | R::Released) {
                Some((Status::Cancelling, Effect::Cancel(CancelReason::OutOfStock)))
            } else if matches!(s.payment, P::Failed | P::Voided | P::Refunded) {
                Some((
                    Status::Cancelling,
                    Effect::Cancel(CancelReason::PaymentFailed),
                ))
            } else {
                None
            }
        }
        Status::Shipped => {
            if s.delivery == D::Failed {
                Some((Status::Returning, Effect::None))
            } else if s.delivery == D::Delivered
                && s.payment == P::Captured
                && s.reservation == R::Committed
            {
                Some((Status::Completed, Effect::Completed))
            } else {
                None
            }
        }
        Status::Cancelling if s.reservation == R::Released && money_settled => {
            Some((Status::Cancelled, Effect::None))
        }
        Status::Returning if s.reservation == R::Released && money_settled => {
            Some((Status::Returned, Effect::None))
        }
        _ => None,
    }
}

/// The most units of one SKU an order may take, summed over its lines. Far past any real
/// basket; its point is that quantities stay where stock arithmetic cannot overflow, so a
/// broken or hostile order is an `OrderRejected` (`invalid_quantity`) at the edge and never a
/// failure deep in inventory after payments took an authorization hold.
pub const MAX_UNITS_PER_SKU: i64 = 1_000_000;

/// A valid order, ready to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidOrder {
    pub customer: Contact,
    pub lines: Vec<OrderLine>,
    pub total: Money,
}

/// Validates an `OrderPlaced` at the edge. `known_skus` are the SKUs of the order found in the
/// catalogue. Returns every reason the order is invalid, not just the first.
pub fn validate(
    order: &OrderPlaced,
    known_skus: &HashSet<String>,
) -> Result<ValidOrder, Vec<RejectionReason>> {
    let mut reasons = Vec::new();
    let mut reject = |code: RejectionCode, message: String| {
        if !reasons
            .iter()
            .any(|r: &RejectionReason| r.code == code && r.message == message)
        {
            reasons.push(RejectionReason { code, message });
        }
    };
    if order.customer.id.trim().is_empty() {
        reject(
            RejectionCode::MissingCustomer,
            "the customer has no id".into(),
        );
    }
    match order.customer.email.as_deref().map(str::trim) {
        None | Some("") => reject(
            RejectionCode::MissingEmail,
            "the customer has no email".into(),
        ),
        // Deliberately loose: the storefront verified the address; this catches garbage.
        Some(e) if !e.contains('@') || e.starts_with('@') || e.ends_with('@') => reject(
            RejectionCode::InvalidEmail,
            "the customer's email is not an email address".into(),
        ),
        Some(_) => {}
    }
    if order.payment_token.trim().is_empty() {
        reject(
            RejectionCode::MissingPaymentToken,
            "the order has no payment token".into(),
        );
    }
    if order.lines.is_empty() {
        reject(RejectionCode::NoLines, "the order has no lines".into());
    }
    let mut currencies: Vec<Currency> = Vec::new();
    let mut total: Option<i64> = Some(0);
    // Units per SKU across the order, as inventory reserves them: `None` once past i64.
    let mut units: BTreeMap<&str, Option<i64>> = BTreeMap::new();
    for line in &order.lines {
        if line.quantity <= 0 {
            reject(
                RejectionCode::InvalidQuantity,
                format!(
                    "{} has quantity {}; it must be at least 1",
                    line.sku, line.quantity
                ),
            );
        } else {
            let sum = units.entry(line.sku.as_str()).or_insert(Some(0));
            *sum = sum.and_then(|s| s.checked_add(line.quantity));
        }
        if !line.unit_price.currency.is_iso_4217() {
            reject(
                RejectionCode::InvalidCurrency,
                format!(
                    "{} is priced in {}, which is not an ISO 4217 currency",
                    line.sku, line.unit_price.currency
                ),
            );
        }
        if line.unit_price.amount_minor < 0 {
            reject(
                RejectionCode::InvalidPrice,
                format!(
                    "{} has a negative unit price {}",
                    line.sku, line.unit_price.amount_minor
                ),
            );
        }
        if !known_skus.contains(&line.sku) {
            reject(
                RejectionCode::UnknownSku,
                format!("{:?} is not in the catalogue", line.sku),
            );
        }
        if !currencies.contains(&line.unit_price.currency) {
            currencies.push(line.unit_price.currency);
        }
        total = total
            .and_then(|t| t.checked_add(line.quantity.checked_mul(line.unit_price.amount_minor)?));
    }
    for (sku, sum) in &units {
        match sum {
            Some(n) if *n <= MAX_UNITS_PER_SKU => {}
            Some(n) => reject(
                RejectionCode::InvalidQuantity,
                format!("{sku} is ordered {n} times; an order takes at most {MAX_UNITS_PER_SKU} units of one SKU"),
            ),
            None => reject(
                RejectionCode::InvalidQuantity,
                format!("the quantities of {sku} add up past 64 bits; an order takes at most {MAX_UNITS_PER_SKU} units of one SKU"),
            ),
        }
    }
    if currencies.len() > 1 {
        let names: Vec<&str> = currencies.iter().map(Currency::as_str).collect();
        reject(
            RejectionCode::MixedCurrencies,
            format!("the lines mix currencies {}", names.join(", ")),
        );
    }
    if total.is_none() {
        reject(
            RejectionCode::TotalOverflow,
            "the order total does not fit in 64-bit minor units".into(),
        );
    }
    match (reasons.is_empty(), total, currencies.first()) {
        (true, Some(total), Some(&currency)) => Ok(ValidOrder {
            customer: Contact {
                id: order.customer.id.clone(),
                email: order
                    .customer
                    .email
                    .as_deref()
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                name: order.customer.name.clone(),
            },
            lines: order
                .lines
                .iter()
                .map(|l| OrderLine {
                    sku: l.sku.clone(),
                    quantity: l.quantity,
                    unit_price: l.unit_price,
                })
                .collect(),
            total: Money::new(total, currency),
        }),
        _ => Err(reasons),
    }
}

/// Serialises `OrderPlaced` and `OrderCancellationRequested` of one order: before the order
/// row exists there is nothing to lock, and without this a cancellation could miss an order
/// being inserted concurrently (and the insert miss the cancellation). A group took the locks
/// of all its orders already ([`Orders::lock_group`]), and they last until it commits.
async fn lock_order_id(cx: &mut Context<'_, Rows>, order_id: &str) -> Result<(), HandlerError> {
    let tx = cx.tx;
    lock_order_once(tx, &mut cx.batch.held, "orders", order_id).await
}

/// An order row, locked for the rest of the transaction.
#[derive(Clone)]
struct Locked {
    id: String,
    snap: Snapshot,
    cancel_requested: bool,
    cancel_reason: Option<String>,
    tracking_number: Option<String>,
}

/// The order rows a transaction locked, as its events last left them. A group reads them all
/// when it locks them ([`Orders::lock_group`]), its events change them here, and
/// [`Orders::finish`] writes the changed ones back in one statement before the commit.
#[derive(Default)]
pub struct Rows {
    locked: HashMap<String, Locked>,
    changed: BTreeSet<String>,
    /// The orders whose `orders:<id>` advisory lock this transaction holds.
    held: HashSet<String>,
    /// Orders this transaction inserted.
    placed: HashSet<String>,
    /// What a group read up front for its `OrderPlaced` events.
    placing: Option<Placing>,
    /// What the locked orders' events need to say about them.
    details: HashMap<String, Details>,
}

/// What `OrderPlaced` needs to know besides its event, read once for a group's orders (in
/// [`Orders::lock_group`], after their locks): which of them had a cancellation requested
/// before they arrived, and which of the SKUs they name the catalogue knows.
struct Placing {
    cancel_requested: HashSet<String>,
    asked: HashSet<String>,
    known: HashSet<String>,
}

impl Rows {
    /// (the order exists, its cancellation was requested, the known SKUs of `skus`) from what
    /// the group read, when it covers this order and these SKUs.
    fn facts(&self, order_id: &str, skus: &[&str]) -> Option<(bool, bool, HashSet<String>)> {
        let p = self.placing.as_ref()?;
        if !self.held.contains(order_id) || !skus.iter().all(|s| p.asked.contains(*s)) {
            return None;
        }
        let exists = self.locked.contains_key(order_id) || self.placed.contains(order_id);
        let known = skus
            .iter()
            .filter(|s| p.known.contains(**s))
            .map(|s| s.to_string())
            .collect();
        Some((exists, p.cancel_requested.contains(order_id), known))
    }
}

/// Locks and reads the order rows `ids` (in id order), each with what the events it may emit
/// need to say about it: its customer, lines, total and address. Reading them with the row
/// costs less than asking again for the few events that emit.
async fn select_locked(tx: &Tx, ids: &[&str]) -> Result<Vec<(Locked, Details)>, HandlerError> {
    let rows = tx
        .query_cached(
            "SELECT o.id, o.status, o.reservation_state, o.payment_state, o.delivery_state,
                    o.cancel_requested, o.cancel_reason, o.tracking_number,
                    c.id, c.email, c.name, o.total_minor, o.currency::text, o.shipping_address,
                    ARRAY(SELECT l.sku FROM order_lines l WHERE l.order_id = o.id ORDER BY l.line_no),
                    ARRAY(SELECT l.quantity FROM order_lines l WHERE l.order_id = o.id ORDER BY l.line_no)
               FROM orders o LEFT JOIN customers c ON c.id = o.customer_id
              WHERE o.id = ANY($1) ORDER BY o.id FOR UPDATE OF o",
            &[&ids],
        )
        .await
        .map_err(|e| HandlerError::from_db("locking the order", &e))?;
    rows.iter()
        .map(|r| {
            let locked = Locked {
                id: r.get(0),
                snap: Snapshot {
                    status: Status::parse(r.get(1))?,
                    reservation: ReservationState::parse(r.get(2))?,
                    payment: PaymentState::parse(r.get(3))?,
                    delivery: DeliveryState::parse(r.get(4))?,
                },
                cancel_requested: r.get(5),
                cancel_reason: r.get(6),
                tracking_number: r.get(7),
            };
            // A rejected order has no customer row and no total: it emits nothing more.
            let customer = match (r.get(8), r.get(9), r.get(10)) {
                (Some(id), Some(email), Some(name)) => Some(Contact { id, email, name }),
                _ => None,
            };
            let total = match (r.get::<_, Option<i64>>(11), r.get::<_, Option<String>>(12)) {
                (Some(minor), Some(currency)) => {
                    let currency = Currency::new(&currency).map_err(|e| {
                        HandlerError::permanent(format!("order {}: {e}", locked.id))
                    })?;
                    Some(Money::new(minor, currency))
                }
                _ => None,
            };
            let skus: Vec<String> = r.get(14);
            let quantities: Vec<i64> = r.get(15);
            let details = Details {
                customer,
                lines: skus
                    .into_iter()
                    .zip(quantities)
                    .map(|(sku, quantity)| SkuQuantity { sku, quantity })
                    .collect(),
                total,
                address: r.get(13),
            };
            Ok((locked, details))
        })
        .collect()
}

/// The order, locked: from this transaction's rows when it has it, else from the table.
async fn lock(cx: &mut Context<'_, Rows>, order_id: &str) -> Result<Option<Locked>, HandlerError> {
    if let Some(o) = cx.batch.locked.get(order_id) {
        return Ok(Some(o.clone()));
    }
    let Some((o, details)) = select_locked(cx.tx, &[order_id]).await?.into_iter().next() else {
        return Ok(None);
    };
    let rows = &mut cx.batch;
    rows.locked.insert(order_id.to_string(), o.clone());
    rows.details.insert(order_id.to_string(), details);
    Ok(Some(o))
}

async fn lock_existing(cx: &mut Context<'_, Rows>, order_id: &str) -> Result<Locked, HandlerError> {
    lock(cx, order_id).await?.ok_or_else(|| {
        // Outcomes answer events orders emitted after inserting the order, so this is a
        // different database or a forged event, not a race.
        HandlerError::permanent(format!("order {order_id} is unknown"))
    })
}

/// Keeps `o` as this transaction's version of the order; [`Orders::finish`] writes it.
fn save(cx: &mut Context<'_, Rows>, o: Locked) {
    let rows = &mut cx.batch;
    rows.changed.insert(o.id.clone());
    rows.locked.insert(o.id.clone(), o);
}

/// Writes the changed order rows of `rows` in one statement.
async fn write_back(tx: &Tx, rows: Rows) -> Result<(), HandlerError> {
    let changed: Vec<&Locked> = rows
        .changed
        .iter()
        .filter_map(|id| rows.locked.get(id))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = changed.iter().map(|o| o.id.as_str()).collect();
    let status: Vec<&str> = changed.iter().map(|o| o.snap.status.as_str()).collect();
    let reservation: Vec<&str> = changed
        .iter()
        .map(|o| o.snap.reservation.as_str())
        .collect();
    let payment: Vec<&str> = changed.iter().map(|o| o.snap.payment.as_str()).collect();
    let delivery: Vec<&str> = changed.iter().map(|o| o.snap.delivery.as_str()).collect();
    let cancel_requested: Vec<bool> = changed.iter().map(|o| o.cancel_requested).collect();
    let cancel_reason: Vec<Option<&str>> =
        changed.iter().map(|o| o.cancel_reason.as_deref()).collect();
    let tracking: Vec<Option<&str>> = changed
        .iter()
        .map(|o| o.tracking_number.as_deref())
        .collect();
    let terminal: Vec<bool> = changed
        .iter()
        .map(|o| o.snap.status.is_terminal())
        .collect();
    let n = tx
        .execute_cached(
            "UPDATE orders o SET status = u.status, reservation_state = u.reservation_state,
                    payment_state = u.payment_state, delivery_state = u.delivery_state,
                    cancel_requested = u.cancel_requested, cancel_reason = u.cancel_reason,
                    tracking_number = u.tracking_number, updated_at = now(),
                    terminal_at = CASE WHEN u.terminal THEN coalesce(o.terminal_at, now()) END
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                           $6::bool[], $7::text[], $8::text[], $9::bool[])
                    AS u(id, status, reservation_state, payment_state, delivery_state,
                         cancel_requested, cancel_reason, tracking_number, terminal)
              WHERE o.id = u.id",
            &[
                &ids,
                &status,
                &reservation,
                &payment,
                &delivery,
                &cancel_requested,
                &cancel_reason,
                &tracking,
                &terminal,
            ],
        )
        .await
        .map_err(|e| HandlerError::from_db("updating the orders", &e))?;
    if n != ids.len() as u64 {
        return Err(HandlerError::retry(format!(
            "updated {n} of {} locked orders",
            ids.len()
        )));
    }
    Ok(())
}

/// What the emitted events need from an order beyond its state, as stored. The address is
/// parsed only by the one event that carries it.
#[derive(Clone)]
struct Details {
    customer: Option<Contact>,
    lines: Vec<SkuQuantity>,
    total: Option<Money>,
    address: Option<serde_json::Value>,
}

/// The details of an order this transaction locked or inserted.
async fn details(cx: &mut Context<'_, Rows>, order_id: &str) -> Result<Details, HandlerError> {
    if let Some(d) = cx.batch.details.get(order_id) {
        return Ok(d.clone());
    }
    // Inserted by this transaction: locked already, so reading it again only reads.
    let Some((_, d)) = select_locked(cx.tx, &[order_id]).await?.into_iter().next() else {
        return Err(HandlerError::permanent(format!(
            "order {order_id} is unknown"
        )));
    };
    cx.batch.details.insert(order_id.to_string(), d.clone());
    Ok(d)
}

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
            Err(reasons) => return self.reject(cx, d, reasons, address).await,
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
                                         payment_token, shipping_address, placed_at,
                                         cancel_requested, cancel_reason)
                     VALUES ($1, $2, $5, $6, $7, $8, $9, $10, $11, $12)
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
            payment_token: d.payment_token,
            shipping_address: d.shipping_address,
            placed_at: d.placed_at,
        })
    }

    async fn reject(
        &self,
        cx: &mut Context<'_, Rows>,
        d: OrderPlaced,
        reasons: Vec<RejectionReason>,
        address: serde_json::Value,
    ) -> Result<(), HandlerError> {
        let codes: Vec<&str> = reasons.iter().map(|r| r.code.as_str()).collect();
        tracing::info!(order_id = %d.order_id, reasons = ?codes, "order rejected");
        let stored = serde_json::to_value(&reasons)
            .map_err(|e| HandlerError::permanent(format!("encoding the reasons: {e}")))?;
        cx.tx
            .execute_cached(
                "INSERT INTO orders (id, status, payment_token, shipping_address, placed_at,
                                     rejection_reasons, terminal_at)
                 VALUES ($1, 'rejected', $2, $3, $4, $5, now())",
                &[
                    &d.order_id,
                    &d.payment_token,
                    &address,
                    &d.placed_at,
                    &stored,
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
        let Some(mut o) = lock(cx, &d.order_id).await? else {
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
        match o.snap.status {
            Status::Accepted => {
                o.cancel_requested = true;
                o.cancel_reason = Some(CancelReason::Requested.as_str().into());
                o.snap.status = Status::Cancelling;
                apply_effect(cx, &o.id, Effect::Cancel(CancelReason::Requested)).await?;
                settle(cx, o).await
            }
            Status::ReadyToShip if !o.cancel_requested => {
                o.cancel_requested = true;
                cx.emit_event(&ShipmentCancelRequested {
                    meta: Meta::default(),
                    order_id: o.id.clone(),
                })?;
                save(cx, o);
                Ok(())
            }
            status => {
                tracing::info!(
                    order_id = %o.id,
                    status = status.as_str(),
                    "cancellation request ignored: already cancelling, shipped or final"
                );
                Ok(())
            }
        }
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
            events::PaymentRefunded::DETAIL_TYPE => s.payment = s.payment.advance_to(P::Refunded),
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
                    Status::ReadyToShip => o.snap.status = Status::Shipped,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(status: Status, r: ReservationState, p: PaymentState, d: DeliveryState) -> Snapshot {
        Snapshot {
            status,
            reservation: r,
            payment: p,
            delivery: d,
        }
    }

    #[test]
    fn an_order_waits_for_both_reservation_and_authorization() {
        use DeliveryState::Pending as DP;
        use PaymentState as P;
        use ReservationState as R;
        assert_eq!(
            advance(&snap(Status::Accepted, R::Reserved, P::Pending, DP)),
            None
        );
        assert_eq!(
            advance(&snap(Status::Accepted, R::Pending, P::Authorized, DP)),
            None
        );
        assert_eq!(
            advance(&snap(Status::Accepted, R::Reserved, P::Authorized, DP)),
            Some((Status::ReadyToShip, Effect::ReadyToShip))
        );
        assert_eq!(
            advance(&snap(Status::Accepted, R::Rejected, P::Authorized, DP)),
            Some((Status::Cancelling, Effect::Cancel(CancelReason::OutOfStock)))
        );
        assert_eq!(
            advance(&snap(Status::Accepted, R::Reserved, P::Failed, DP)),
            Some((
                Status::Cancelling,
                Effect::Cancel(CancelReason::PaymentFailed)
            ))
        );
    }

    #[test]
    fn cancelling_ends_only_when_stock_and_money_are_settled() {
        use DeliveryState::Pending as DP;
        use PaymentState as P;
        use ReservationState as R;
        assert_eq!(
            advance(&snap(Status::Cancelling, R::Released, P::Authorized, DP)),
            None
        );
        assert_eq!(
            advance(&snap(Status::Cancelling, R::Reserved, P::Voided, DP)),
            None
        );
        assert_eq!(
            advance(&snap(Status::Cancelling, R::Released, P::Voided, DP)),
            Some((Status::Cancelled, Effect::None))
        );
    }

    #[test]
    fn stale_outcomes_never_move_a_state_back() {
        assert_eq!(
            PaymentState::Voided.advance_to(PaymentState::Authorized),
            PaymentState::Voided
        );
        assert_eq!(
            ReservationState::Released.advance_to(ReservationState::Committed),
            ReservationState::Released
        );
        assert_eq!(
            ReservationState::Pending.advance_to(ReservationState::Reserved),
            ReservationState::Reserved
        );
    }

    #[test]
    fn terminal_states_do_not_advance() {
        use PaymentState as P;
        use ReservationState as R;
        for s in [
            Status::Completed,
            Status::Cancelled,
            Status::Returned,
            Status::Rejected,
        ] {
            assert!(s.is_terminal());
            assert_eq!(
                advance(&snap(s, R::Reserved, P::Authorized, DeliveryState::Failed)),
                None
            );
        }
    }
}
