//! Stock and reservations as a transaction sees them: the rows it locked (stock in SKU order,
//! so two transactions never deadlock), the quantities it moved in memory, and one write-back
//! of every changed row with the movements' log before the commit ([`write_back`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::domain::envelope::Envelope;
use crate::domain::events::SkuQuantity;
use crate::domain::outcome::HandlerError;
use crate::handlers::{lock_order_once, Context};
use crate::store::db::{Cached, Tx};

stored_states!(
    /// Inventory's decision for one order (uniform across its reservation rows).
    pub(super) State in "reservation state" {
        Reserved = "reserved";
        Rejected = "rejected";
        Released = "released";
        Committed = "committed";
    }
);

/// An order's reservation rows, read under the order's lock.
#[derive(Clone)]
pub(super) struct Reservation {
    pub(super) state: State,
    /// Per SKU, sorted.
    pub(super) lines: BTreeMap<String, i64>,
}

impl Reservation {
    pub(super) fn lines(&self) -> Vec<SkuQuantity> {
        to_lines(&self.lines)
    }
}

pub(super) fn to_lines(lines: &BTreeMap<String, i64>) -> Vec<SkuQuantity> {
    lines
        .iter()
        .map(|(sku, &quantity)| SkuQuantity {
            sku: sku.clone(),
            quantity,
        })
        .collect()
}

/// Sums quantities per SKU (an order may list a SKU twice). Non-positive quantities are a
/// broken producer: orders validated them.
pub(super) fn per_sku(
    lines: &[SkuQuantity],
    order_id: &str,
) -> Result<BTreeMap<String, i64>, HandlerError> {
    let mut out: BTreeMap<String, i64> = BTreeMap::new();
    for l in lines {
        if l.quantity <= 0 {
            return Err(HandlerError::permanent(format!(
                "order {order_id} has a non-positive quantity {} of {}",
                l.quantity, l.sku
            )));
        }
        let q = out.entry(l.sku.clone()).or_default();
        *q = q.checked_add(l.quantity).ok_or_else(|| {
            HandlerError::permanent(format!("order {order_id}: quantity of {} overflows", l.sku))
        })?;
    }
    Ok(out)
}

/// Serialises every inventory event of one order, across instances, until the transaction
/// ends. An advisory lock rather than a row lock because the first event of an order may find
/// no row to lock yet.
pub(super) async fn lock_order(
    cx: &mut Context<'_, Group>,
    order_id: &str,
) -> Result<(), HandlerError> {
    let tx = cx.tx;
    lock_order_once(tx, &mut cx.batch.held, "inventory", order_id).await
}

/// What inventory keeps for the length of one transaction (one event, or a group).
///
/// Stock rows are hot: every order of a SKU updates its one row twice. So a transaction reads
/// each stock row once, when it locks it, moves the quantities in memory, and writes every
/// changed row back once, with the movements' log, in [`Handler::finish`]. A row updated once
/// per event would leave a chain of versions that every later lookup in the transaction walks.
#[derive(Default)]
pub struct Group {
    /// The orders whose lock this transaction holds.
    pub(super) held: HashSet<String>,
    /// The stock rows this transaction holds locked, as they stand now.
    pub(super) stock: BTreeMap<String, Level>,
    /// Movements to log at the end, in the order they happened.
    pub(super) moves: Vec<Movement>,
    /// The reservations of the orders this transaction read (`None`: the order has none yet).
    pub(super) reservations: HashMap<String, Held>,
}

/// An order's reservation as this transaction sees it, and what the write-back owes the table.
pub(super) struct Held {
    pub(super) reservation: Option<Reservation>,
    pub(super) write: Write,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Write {
    Nothing,
    /// New rows.
    Insert,
    /// A new state for the existing rows.
    State,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Level {
    pub(super) on_hand: i64,
    pub(super) reserved: i64,
    pub(super) changed: bool,
}

pub(super) struct Movement {
    pub(super) sku: String,
    pub(super) kind: &'static str,
    pub(super) quantity: i64,
    pub(super) order_id: Option<String>,
    pub(super) event_key: String,
}

/// The SKUs an event names: its `sku`, and the `sku` of each of its `lines`.
pub(super) fn skus_named(event: &Envelope) -> impl Iterator<Item = &str> {
    let detail = &event.detail;
    let lines = detail
        .get("lines")
        .and_then(|l| l.as_array())
        .map(|l| l.as_slice())
        .unwrap_or_default();
    detail
        .get("sku")
        .into_iter()
        .chain(lines.iter().filter_map(|l| l.get("sku")))
        .filter_map(|s| s.as_str())
}

/// Reads the reservations of `order_ids` into the transaction's [`Group`], in one query.
pub(super) async fn read_reservations(
    tx: &Tx,
    group: &mut Group,
    order_ids: &[&str],
) -> Result<(), HandlerError> {
    let rows = tx
        .query_cached(
            "SELECT order_id, sku, quantity, state FROM reservations
              WHERE order_id = ANY($1) ORDER BY order_id, sku",
            &[&order_ids],
        )
        .await
        .map_err(|e| HandlerError::from_db("reading reservations", &e))?;
    for id in order_ids {
        group.reservations.insert(
            id.to_string(),
            Held {
                reservation: None,
                write: Write::Nothing,
            },
        );
    }
    for r in &rows {
        let id: &str = r.get(0);
        let state = State::parse(r.get(3))?;
        let held = group
            .reservations
            .get_mut(id)
            .ok_or_else(|| HandlerError::permanent(format!("reservation of unasked order {id}")))?;
        held.reservation
            .get_or_insert_with(|| Reservation {
                state,
                lines: BTreeMap::new(),
            })
            .lines
            .insert(r.get(1), r.get(2));
    }
    Ok(())
}

/// The order's reservation, read once per transaction (the order's lock must be held).
pub(super) async fn load(
    cx: &mut Context<'_, Group>,
    order_id: &str,
) -> Result<Option<Reservation>, HandlerError> {
    if !cx.batch.reservations.contains_key(order_id) {
        let tx = cx.tx;
        read_reservations(tx, &mut cx.batch, &[order_id]).await?;
    }
    Ok(cx.batch.reservations[order_id].reservation.clone())
}

/// Records new reservation rows, written at the end of the transaction.
pub(super) fn insert_rows(
    cx: &mut Context<'_, Group>,
    order_id: &str,
    lines: &BTreeMap<String, i64>,
    state: State,
) {
    cx.batch.reservations.insert(
        order_id.to_string(),
        Held {
            reservation: Some(Reservation {
                state,
                lines: lines.clone(),
            }),
            write: Write::Insert,
        },
    );
}

/// Records a new state for the order's reservation rows, written at the end of the
/// transaction. The caller has [`load`]ed them.
pub(super) fn set_state(cx: &mut Context<'_, Group>, order_id: &str, state: State) {
    if let Some(held) = cx.batch.reservations.get_mut(order_id) {
        if let Some(r) = held.reservation.as_mut() {
            r.state = state;
            if held.write == Write::Nothing {
                held.write = Write::State;
            }
        }
    }
}

/// Locks the stock rows of `lines` in SKU order, the one order every instance uses, so that
/// concurrent reservations queue instead of deadlocking, and keeps them in the transaction's
/// [`Group`]. Rows it already holds are not read again. Returns (on_hand, reserved) per SKU
/// that has a row.
pub(super) async fn lock_stock(
    cx: &mut Context<'_, Group>,
    lines: &BTreeMap<String, i64>,
) -> Result<BTreeMap<String, (i64, i64)>, HandlerError> {
    let missing: Vec<&str> = {
        let held = &cx.batch.stock;
        lines
            .keys()
            .filter(|sku| !held.contains_key(*sku))
            .map(String::as_str)
            .collect()
    };
    if !missing.is_empty() {
        let rows = cx
            .tx
            .query_cached(
                "SELECT sku, on_hand, reserved FROM stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
                &[&missing],
            )
            .await
            .map_err(|e| HandlerError::from_db("locking stock", &e))?;
        hold(&mut cx.batch, &rows);
    }
    let held = &cx.batch.stock;
    Ok(lines
        .keys()
        .filter_map(|sku| {
            held.get(sku)
                .map(|l| (sku.clone(), (l.on_hand, l.reserved)))
        })
        .collect())
}

/// Keeps locked stock rows (`sku, on_hand, reserved`) in the transaction's [`Group`].
pub(super) fn hold(group: &mut Group, rows: &[tokio_postgres::Row]) {
    for r in rows {
        group.stock.insert(
            r.get(0),
            Level {
                on_hand: r.get(1),
                reserved: r.get(2),
                changed: false,
            },
        );
    }
}

/// Applies `on_hand += d_on_hand * qty, reserved += d_reserved * qty` for every line to the
/// locked rows (see [`lock_stock`]), and logs a stock movement of `kind` per line. The rows
/// keep the table's own rules: neither quantity negative, reserved no more than on hand.
pub(super) fn move_stock(
    cx: &mut Context<'_, Group>,
    order_id: &str,
    event_key: &str,
    lines: &BTreeMap<String, i64>,
    (d_on_hand, d_reserved): (i64, i64),
    kind: &'static str,
) -> Result<(), HandlerError> {
    let group = &mut cx.batch;
    let unknown = lines
        .keys()
        .filter(|sku| !group.stock.contains_key(*sku))
        .count();
    if unknown > 0 {
        return Err(HandlerError::permanent(format!(
            "order {order_id}: {unknown} of {} SKUs have no stock row",
            lines.len()
        )));
    }
    let mut moved = Vec::with_capacity(lines.len());
    for (sku, &qty) in lines {
        let level = group.stock[sku];
        let shift = |value: i64, delta: i64| {
            delta
                .checked_mul(qty)
                .and_then(|d| value.checked_add(d))
                .ok_or_else(|| {
                    HandlerError::permanent(format!("order {order_id}: stock of {sku} overflows"))
                })
        };
        let (on_hand, reserved) = (
            shift(level.on_hand, d_on_hand)?,
            shift(level.reserved, d_reserved)?,
        );
        if on_hand < 0 || reserved < 0 || reserved > on_hand {
            return Err(HandlerError::permanent(format!(
                "order {order_id}: moving stock of {sku} ({kind}) would leave on_hand {on_hand}, \
                 reserved {reserved}"
            )));
        }
        moved.push((sku, on_hand, reserved, qty));
    }
    for (sku, on_hand, reserved, qty) in moved {
        group.stock.insert(
            sku.clone(),
            Level {
                on_hand,
                reserved,
                changed: true,
            },
        );
        group.moves.push(Movement {
            sku: sku.clone(),
            kind,
            quantity: qty,
            order_id: Some(order_id.to_string()),
            event_key: event_key.to_string(),
        });
    }
    Ok(())
}

/// Writes the changed stock rows and the movements of a transaction, one statement each.
pub(super) async fn write_back(tx: &Tx, group: Group) -> Result<(), HandlerError> {
    let (skus, (on_hand, reserved)): (Vec<&str>, (Vec<i64>, Vec<i64>)) = group
        .stock
        .iter()
        .filter(|(_, l)| l.changed)
        .map(|(sku, l)| (sku.as_str(), (l.on_hand, l.reserved)))
        .unzip();
    if !skus.is_empty() {
        tx.execute_cached(
            "UPDATE stock SET on_hand = u.on_hand, reserved = u.reserved
               FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(sku, on_hand, reserved)
              WHERE stock.sku = u.sku",
            &[&skus, &on_hand, &reserved],
        )
        .await
        .map_err(|e| HandlerError::from_db("writing stock", &e))?;
    }
    let (mut new_rows, mut states) = ((vec![], vec![], vec![], vec![]), (vec![], vec![]));
    for (order_id, held) in &group.reservations {
        let Some(r) = &held.reservation else { continue };
        match held.write {
            Write::Nothing => {}
            Write::Insert => {
                for (sku, qty) in &r.lines {
                    new_rows.0.push(order_id.as_str());
                    new_rows.1.push(sku.as_str());
                    new_rows.2.push(*qty);
                    new_rows.3.push(r.state.as_str());
                }
            }
            Write::State => {
                states.0.push(order_id.as_str());
                states.1.push(r.state.as_str());
            }
        }
    }
    if !new_rows.0.is_empty() {
        tx.execute_cached(
            "INSERT INTO reservations (order_id, sku, quantity, state)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])",
            &[&new_rows.0, &new_rows.1, &new_rows.2, &new_rows.3],
        )
        .await
        .map_err(|e| HandlerError::from_db("writing reservations", &e))?;
    }
    if !states.0.is_empty() {
        tx.execute_cached(
            "UPDATE reservations r SET state = u.state, updated_at = now()
               FROM unnest($1::text[], $2::text[]) AS u(order_id, state)
              WHERE r.order_id = u.order_id",
            &[&states.0, &states.1],
        )
        .await
        .map_err(|e| HandlerError::from_db("updating reservations", &e))?;
    }
    if !group.moves.is_empty() {
        let m = &group.moves;
        let skus: Vec<&str> = m.iter().map(|m| m.sku.as_str()).collect();
        let kinds: Vec<&str> = m.iter().map(|m| m.kind).collect();
        let qtys: Vec<i64> = m.iter().map(|m| m.quantity).collect();
        let orders: Vec<Option<&str>> = m.iter().map(|m| m.order_id.as_deref()).collect();
        let keys: Vec<&str> = m.iter().map(|m| m.event_key.as_str()).collect();
        tx.execute_cached(
            "INSERT INTO stock_movements (sku, kind, quantity, order_id, event_key)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[])",
            &[&skus, &kinds, &qtys, &orders, &keys],
        )
        .await
        .map_err(|e| HandlerError::from_db("logging stock movements", &e))?;
    }
    Ok(())
}
