//! inventory: on-hand and reserved quantities per SKU, reservations per order, and the
//! product catalogue.
//!
//! | event | effect | emits |
//! |---|---|---|
//! | `StockReceived` | on_hand += quantity | |
//! | `ProductUpserted` | keeps the product document | |
//! | `OrderAccepted` | reserves every line, or none | `InventoryReserved` / `InventoryRejected` |
//! | `OrderCancelled` | releases the reservation (if any) | `InventoryReleased` (always) |
//! | `OrderShipped` | commits: on_hand -= qty, reserved -= qty | `InventoryCommitted` |
//! | `DeliveryFailed` | restocks the returned units | `InventoryReleased` |
//!
//! Correct with any number of instances at once: each order's events are serialised by a
//! transaction-scoped advisory lock on the order id, and stock rows are locked in SKU order
//! (`ORDER BY sku FOR UPDATE`), so two reservations never deadlock and never both take the last
//! unit. The CHECK constraints on `stock` (never negative, reserved ≤ on_hand) back this up.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use async_trait::async_trait;

use crate::db::{Cached, Tx};
use crate::envelope::Envelope;
use crate::events::{
    self, DeliveryFailed, InventoryCommitted, InventoryRejected, InventoryReleased,
    InventoryReserved, Meta, OrderAccepted, OrderCancelled, OrderShipped, ProductUpserted,
    ReleaseReason, Shortage, SkuQuantity, StockReceived,
};
use crate::handlers::{lock_keys, lock_order_ids, sorted_order_ids, Context, GroupState, Handler};
use crate::outcome::HandlerError;

/// The inventory handler.
pub struct Inventory;

/// Inventory's decision for one order (uniform across its reservation rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reserved,
    Rejected,
    Released,
    Committed,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Reserved => "reserved",
            State::Rejected => "rejected",
            State::Released => "released",
            State::Committed => "committed",
        }
    }

    fn parse(s: &str) -> Result<Self, HandlerError> {
        Ok(match s {
            "reserved" => State::Reserved,
            "rejected" => State::Rejected,
            "released" => State::Released,
            "committed" => State::Committed,
            other => {
                return Err(HandlerError::permanent(format!(
                    "unknown reservation state {other:?}"
                )))
            }
        })
    }
}

/// An order's reservation rows, read under the order's lock.
struct Reservation {
    state: State,
    /// Per SKU, sorted.
    lines: BTreeMap<String, i64>,
}

impl Reservation {
    fn lines(&self) -> Vec<SkuQuantity> {
        to_lines(&self.lines)
    }
}

fn to_lines(lines: &BTreeMap<String, i64>) -> Vec<SkuQuantity> {
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
fn per_sku(lines: &[SkuQuantity], order_id: &str) -> Result<BTreeMap<String, i64>, HandlerError> {
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
async fn lock_order(cx: &mut Context<'_>, order_id: &str) -> Result<(), HandlerError> {
    if cx.state::<Held>().contains(order_id) {
        return Ok(());
    }
    lock_order_ids(cx.tx, "inventory", &[order_id]).await?;
    cx.state::<Held>().insert(order_id.to_string());
    Ok(())
}

/// The orders whose lock this transaction holds.
type Held = HashSet<String>;

/// The SKUs an event names: its `sku`, and the `sku` of each of its `lines`.
fn skus_named(event: &Envelope) -> impl Iterator<Item = &str> {
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

async fn load(tx: &Tx, order_id: &str) -> Result<Option<Reservation>, HandlerError> {
    let rows = tx
        .query_cached(
            "SELECT sku, quantity, state FROM reservations WHERE order_id = $1 ORDER BY sku",
            &[&order_id],
        )
        .await
        .map_err(|e| HandlerError::from_db("reading reservations", &e))?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let state = State::parse(first.get(2))?;
    let lines = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();
    Ok(Some(Reservation { state, lines }))
}

async fn insert_rows(
    tx: &Tx,
    order_id: &str,
    lines: &BTreeMap<String, i64>,
    state: State,
) -> Result<(), HandlerError> {
    let (skus, qtys): (Vec<&str>, Vec<i64>) = lines.iter().map(|(s, q)| (s.as_str(), *q)).unzip();
    tx.execute_cached(
        "INSERT INTO reservations (order_id, sku, quantity, state)
         SELECT $1, sku, qty, $4 FROM unnest($2::text[], $3::bigint[]) AS l(sku, qty)",
        &[&order_id, &skus, &qtys, &state.as_str()],
    )
    .await
    .map_err(|e| HandlerError::from_db("writing reservations", &e))?;
    Ok(())
}

async fn set_state(tx: &Tx, order_id: &str, state: State) -> Result<(), HandlerError> {
    tx.execute_cached(
        "UPDATE reservations SET state = $2, updated_at = now() WHERE order_id = $1",
        &[&order_id, &state.as_str()],
    )
    .await
    .map_err(|e| HandlerError::from_db("updating reservations", &e))?;
    Ok(())
}

/// Locks the stock rows of `skus` in SKU order, the one order every instance uses, so that
/// concurrent reservations queue instead of deadlocking. Returns (on_hand, reserved) per SKU.
async fn lock_stock(
    tx: &Tx,
    lines: &BTreeMap<String, i64>,
) -> Result<BTreeMap<String, (i64, i64)>, HandlerError> {
    let skus: Vec<&str> = lines.keys().map(String::as_str).collect();
    let rows = tx
        .query_cached(
            "SELECT sku, on_hand, reserved FROM stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
            &[&skus],
        )
        .await
        .map_err(|e| HandlerError::from_db("locking stock", &e))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), (r.get(1), r.get(2))))
        .collect())
}

/// Applies `on_hand += d_on_hand * qty, reserved += d_reserved * qty` for every line, and logs
/// a stock movement of `kind` per line.
async fn move_stock(
    tx: &Tx,
    order_id: &str,
    event_key: &str,
    lines: &BTreeMap<String, i64>,
    (d_on_hand, d_reserved): (i64, i64),
    kind: &str,
) -> Result<(), HandlerError> {
    let (skus, qtys): (Vec<&str>, Vec<i64>) = lines.iter().map(|(s, q)| (s.as_str(), *q)).unzip();
    // The update and its log in one statement; the count is of the stock rows updated.
    let n: i64 = tx
        .query_one_cached(
            "WITH moved AS (
                 UPDATE stock SET on_hand = stock.on_hand + $3 * l.qty,
                                  reserved = stock.reserved + $4 * l.qty
                   FROM unnest($1::text[], $2::bigint[]) AS l(sku, qty)
                  WHERE stock.sku = l.sku
              RETURNING stock.sku
             ), logged AS (
                 INSERT INTO stock_movements (sku, kind, quantity, order_id, event_key)
                 SELECT sku, $5, qty, $6, $7 FROM unnest($1::text[], $2::bigint[]) AS l(sku, qty)
             )
             SELECT count(*) FROM moved",
            &[
                &skus,
                &qtys,
                &d_on_hand,
                &d_reserved,
                &kind,
                &order_id,
                &event_key,
            ],
        )
        .await
        .map_err(|e| HandlerError::from_db("moving stock", &e))?
        .get(0);
    if n != skus.len() as i64 {
        return Err(HandlerError::permanent(format!(
            "order {order_id}: {} of {} SKUs have no stock row",
            skus.len() as i64 - n,
            skus.len()
        )));
    }
    Ok(())
}

impl Inventory {
    async fn stock_received(
        &self,
        event: &Envelope,
        cx: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let d: StockReceived = events::decode(event)?;
        if d.quantity <= 0 {
            return Err(HandlerError::permanent(format!(
                "StockReceived for {} has a non-positive quantity {}",
                d.sku, d.quantity
            )));
        }
        cx.tx
            .execute_cached(
                "INSERT INTO stock (sku, on_hand) VALUES ($1, $2)
                 ON CONFLICT (sku) DO UPDATE SET on_hand = stock.on_hand + EXCLUDED.on_hand",
                &[&d.sku, &d.quantity],
            )
            .await?;
        cx.tx
            .execute_cached(
                "INSERT INTO stock_movements (sku, kind, quantity, event_key) VALUES ($1, 'received', $2, $3)",
                &[&d.sku, &d.quantity, &event.event_key()],
            )
            .await?;
        Ok(())
    }

    async fn product_upserted(
        &self,
        event: &Envelope,
        cx: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let d: ProductUpserted = events::decode(event)?;
        let mut doc = match serde_json::to_value(&d) {
            Ok(serde_json::Value::Object(doc)) => doc,
            _ => return Err(HandlerError::permanent("ProductUpserted is not an object")),
        };
        doc.remove("event_id");
        doc.remove("version");
        let doc = serde_json::Value::Object(doc);
        cx.tx
            .execute_cached(
                "INSERT INTO products (sku, doc) VALUES ($1, $2)
                 ON CONFLICT (sku) DO UPDATE SET doc = EXCLUDED.doc, updated_at = now()",
                &[&d.sku, &doc],
            )
            .await?;
        Ok(())
    }

    /// Reserves every line of the order or none. A decision already taken (including a release
    /// that arrived first) stands.
    async fn reserve(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: OrderAccepted = events::decode(event)?;
        let lines: Vec<SkuQuantity> = d.lines.iter().map(SkuQuantity::from).collect();
        let wanted = per_sku(&lines, &d.order_id)?;
        if wanted.is_empty() {
            return Err(HandlerError::permanent(format!(
                "order {} has no lines to reserve",
                d.order_id
            )));
        }
        lock_order(cx, &d.order_id).await?;
        if load(cx.tx, &d.order_id).await?.is_some() {
            return Ok(());
        }
        let stock = lock_stock(cx.tx, &wanted).await?;
        let shortages: Vec<Shortage> = wanted
            .iter()
            .filter_map(|(sku, &requested)| {
                let (on_hand, reserved) = stock.get(sku).copied().unwrap_or((0, 0));
                let available = on_hand - reserved;
                (available < requested).then(|| Shortage {
                    sku: sku.clone(),
                    requested,
                    available: available.max(0),
                })
            })
            .collect();
        if !shortages.is_empty() {
            insert_rows(cx.tx, &d.order_id, &wanted, State::Rejected).await?;
            return events::emit(
                cx,
                &InventoryRejected {
                    meta: Meta::default(),
                    order_id: d.order_id,
                    shortages,
                },
            );
        }
        move_stock(
            cx.tx,
            &d.order_id,
            event.event_key(),
            &wanted,
            (0, 1),
            "reserved",
        )
        .await?;
        insert_rows(cx.tx, &d.order_id, &wanted, State::Reserved).await?;
        events::emit(
            cx,
            &InventoryReserved {
                meta: Meta::default(),
                order_id: d.order_id,
                lines: to_lines(&wanted),
            },
        )
    }

    /// Gives the reservation back. Always confirms with `InventoryReleased`, even when nothing
    /// was reserved, so that the order can settle; when the cancellation arrives before the
    /// order, it leaves released rows behind so that the late `OrderAccepted` reserves nothing.
    async fn release(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: OrderCancelled = events::decode(event)?;
        lock_order(cx, &d.order_id).await?;
        let released = match load(cx.tx, &d.order_id).await? {
            None => {
                let lines = per_sku(&d.lines, &d.order_id)?;
                if !lines.is_empty() {
                    insert_rows(cx.tx, &d.order_id, &lines, State::Released).await?;
                }
                Vec::new()
            }
            Some(r) => match r.state {
                State::Released => return Ok(()),
                State::Rejected => {
                    set_state(cx.tx, &d.order_id, State::Released).await?;
                    Vec::new()
                }
                State::Reserved => {
                    lock_stock(cx.tx, &r.lines).await?;
                    move_stock(
                        cx.tx,
                        &d.order_id,
                        event.event_key(),
                        &r.lines,
                        (0, -1),
                        "released",
                    )
                    .await?;
                    set_state(cx.tx, &d.order_id, State::Released).await?;
                    r.lines()
                }
                State::Committed => {
                    return Err(HandlerError::permanent(format!(
                        "order {} was cancelled after its stock was committed (shipped)",
                        d.order_id
                    )))
                }
            },
        };
        events::emit(
            cx,
            &InventoryReleased {
                meta: Meta::default(),
                order_id: d.order_id,
                reason: ReleaseReason::Cancelled,
                lines: released,
            },
        )
    }

    /// The parcel left: the reserved units leave the warehouse.
    async fn commit(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: OrderShipped = events::decode(event)?;
        lock_order(cx, &d.order_id).await?;
        let Some(r) = load(cx.tx, &d.order_id).await? else {
            return Err(HandlerError::permanent(format!(
                "order {} shipped without a reservation",
                d.order_id
            )));
        };
        match r.state {
            // Committed already, or the return was processed first (it released the
            // reservation, which leaves on_hand as it was: the units came back).
            State::Committed | State::Released => Ok(()),
            State::Rejected => Err(HandlerError::permanent(format!(
                "order {} shipped although its reservation was rejected",
                d.order_id
            ))),
            State::Reserved => {
                lock_stock(cx.tx, &r.lines).await?;
                move_stock(
                    cx.tx,
                    &d.order_id,
                    event.event_key(),
                    &r.lines,
                    (-1, -1),
                    "committed",
                )
                .await?;
                set_state(cx.tx, &d.order_id, State::Committed).await?;
                events::emit(
                    cx,
                    &InventoryCommitted {
                        meta: Meta::default(),
                        order_id: d.order_id,
                        lines: r.lines(),
                    },
                )
            }
        }
    }

    /// The parcel came back: its units are sellable again.
    async fn restock_return(
        &self,
        event: &Envelope,
        cx: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let d: DeliveryFailed = events::decode(event)?;
        lock_order(cx, &d.order_id).await?;
        let restocked = match load(cx.tx, &d.order_id).await? {
            None => {
                let lines = per_sku(&d.lines, &d.order_id)?;
                if !lines.is_empty() {
                    insert_rows(cx.tx, &d.order_id, &lines, State::Released).await?;
                }
                Vec::new()
            }
            Some(r) => match r.state {
                State::Released => return Ok(()),
                State::Rejected => {
                    set_state(cx.tx, &d.order_id, State::Released).await?;
                    Vec::new()
                }
                State::Committed => {
                    lock_stock(cx.tx, &r.lines).await?;
                    move_stock(
                        cx.tx,
                        &d.order_id,
                        event.event_key(),
                        &r.lines,
                        (1, 0),
                        "returned",
                    )
                    .await?;
                    set_state(cx.tx, &d.order_id, State::Released).await?;
                    r.lines()
                }
                // The return overtook the shipment: on_hand never went down, so only the
                // reservation goes; the late OrderShipped then finds nothing to commit.
                State::Reserved => {
                    lock_stock(cx.tx, &r.lines).await?;
                    move_stock(
                        cx.tx,
                        &d.order_id,
                        event.event_key(),
                        &r.lines,
                        (0, -1),
                        "returned",
                    )
                    .await?;
                    set_state(cx.tx, &d.order_id, State::Released).await?;
                    r.lines()
                }
            },
        };
        events::emit(
            cx,
            &InventoryReleased {
                meta: Meta::default(),
                order_id: d.order_id,
                reason: ReleaseReason::Returned,
                lines: restocked,
            },
        )
    }
}

#[async_trait]
impl Handler for Inventory {
    fn name(&self) -> &str {
        "inventory"
    }

    fn group_commit(&self) -> bool {
        true
    }

    /// The order-id locks, then the stock rows of every SKU the events name or the orders
    /// have reserved, each in key order: the order a single event takes them in.
    async fn lock_group(
        &self,
        tx: &Tx,
        events: &[&Envelope],
        state: &mut GroupState,
    ) -> Result<(), HandlerError> {
        let ids = sorted_order_ids(events);
        let skus: BTreeSet<&str> = events.iter().flat_map(|e| skus_named(e)).collect();
        // The SKU locks cover stock rows an event is about to create.
        let keys: Vec<(&str, &str)> = ids
            .iter()
            .map(|id| ("inventory", *id))
            .chain(skus.iter().map(|sku| ("sku", *sku)))
            .collect();
        lock_keys(tx, &keys).await?;
        state
            .get::<Held>()
            .extend(ids.iter().map(|id| id.to_string()));
        let skus: Vec<&str> = skus.into_iter().collect();
        tx.execute_cached(
            "SELECT 1 FROM stock
              WHERE sku = ANY($1)
                 OR sku IN (SELECT sku FROM reservations WHERE order_id = ANY($2))
              ORDER BY sku FOR UPDATE",
            &[&skus, &ids],
        )
        .await
        .map_err(|e| HandlerError::from_db("locking stock", &e))?;
        Ok(())
    }

    async fn handle(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        match event.detail_type.as_str() {
            "StockReceived" => self.stock_received(event, cx).await,
            "ProductUpserted" => self.product_upserted(event, cx).await,
            "OrderAccepted" => self.reserve(event, cx).await,
            "OrderCancelled" => self.release(event, cx).await,
            "OrderShipped" => self.commit(event, cx).await,
            "DeliveryFailed" => self.restock_return(event, cx).await,
            other => Err(HandlerError::permanent(format!(
                "inventory does not handle {other}"
            ))),
        }
    }
}
