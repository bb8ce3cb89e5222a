//! The orders table as a transaction sees it: the rows it locked, cached for the rest of the
//! transaction (a group reads all of its orders in one statement), changed in memory by its
//! events, and written back in one statement before the commit ([`write_back`]).

use std::collections::{BTreeSet, HashMap, HashSet};

use super::saga::{DeliveryState, PaymentState, ReservationState, Snapshot, Status};
use crate::domain::events::{Contact, Currency, Money, SkuQuantity};
use crate::domain::outcome::HandlerError;
use crate::handlers::{lock_order_once, Context};
use crate::store::db::{Cached, Tx};

/// Serialises `OrderPlaced` and `OrderCancellationRequested` of one order: before the order
/// row exists there is nothing to lock, and without this a cancellation could miss an order
/// being inserted concurrently (and the insert miss the cancellation). A group took the locks
/// of all its orders already ([`Orders::lock_group`]), and they last until it commits.
pub(super) async fn lock_order_id(
    cx: &mut Context<'_, Rows>,
    order_id: &str,
) -> Result<(), HandlerError> {
    let tx = cx.tx;
    lock_order_once(tx, &mut cx.batch.held, "orders", order_id).await
}

/// An order row, locked for the rest of the transaction.
#[derive(Clone)]
pub(super) struct Locked {
    pub(super) id: String,
    pub(super) snap: Snapshot,
    pub(super) cancel_requested: bool,
    pub(super) cancel_reason: Option<String>,
    pub(super) tracking_number: Option<String>,
}

/// The order rows a transaction locked, as its events last left them. A group reads them all
/// when it locks them ([`Orders::lock_group`]), its events change them here, and
/// [`Orders::finish`] writes the changed ones back in one statement before the commit.
#[derive(Default)]
pub struct Rows {
    pub(super) locked: HashMap<String, Locked>,
    pub(super) changed: BTreeSet<String>,
    /// The orders whose `orders:<id>` advisory lock this transaction holds.
    pub(super) held: HashSet<String>,
    /// Orders this transaction inserted.
    pub(super) placed: HashSet<String>,
    /// What a group read up front for its `OrderPlaced` events.
    pub(super) placing: Option<Placing>,
    /// What the locked orders' events need to say about them.
    pub(super) details: HashMap<String, Details>,
}

/// What `OrderPlaced` needs to know besides its event, read once for a group's orders (in
/// [`Orders::lock_group`], after their locks): which of them had a cancellation requested
/// before they arrived, and which of the SKUs they name the catalogue knows.
pub(super) struct Placing {
    pub(super) cancel_requested: HashSet<String>,
    pub(super) asked: HashSet<String>,
    pub(super) known: HashSet<String>,
}

impl Rows {
    /// (the order exists, its cancellation was requested, the known SKUs of `skus`) from what
    /// the group read, when it covers this order and these SKUs.
    pub(super) fn facts(
        &self,
        order_id: &str,
        skus: &[&str],
    ) -> Option<(bool, bool, HashSet<String>)> {
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
pub(super) async fn select_locked(
    tx: &Tx,
    ids: &[&str],
) -> Result<Vec<(Locked, Details)>, HandlerError> {
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
pub(super) async fn lock(
    cx: &mut Context<'_, Rows>,
    order_id: &str,
) -> Result<Option<Locked>, HandlerError> {
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

pub(super) async fn lock_existing(
    cx: &mut Context<'_, Rows>,
    order_id: &str,
) -> Result<Locked, HandlerError> {
    lock(cx, order_id).await?.ok_or_else(|| {
        // Outcomes answer events orders emitted after inserting the order, so this is a
        // different database or a forged event, not a race.
        HandlerError::permanent(format!("order {order_id} is unknown"))
    })
}

/// Keeps `o` as this transaction's version of the order; [`Orders::finish`] writes it.
pub(super) fn save(cx: &mut Context<'_, Rows>, o: Locked) {
    let rows = &mut cx.batch;
    rows.changed.insert(o.id.clone());
    rows.locked.insert(o.id.clone(), o);
}

/// Writes the changed order rows of `rows` in one statement.
pub(super) async fn write_back(tx: &Tx, rows: Rows) -> Result<(), HandlerError> {
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
pub(super) struct Details {
    pub(super) customer: Option<Contact>,
    pub(super) lines: Vec<SkuQuantity>,
    pub(super) total: Option<Money>,
    pub(super) address: Option<serde_json::Value>,
}

/// The details of an order this transaction locked or inserted.
pub(super) async fn details(
    cx: &mut Context<'_, Rows>,
    order_id: &str,
) -> Result<Details, HandlerError> {
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
