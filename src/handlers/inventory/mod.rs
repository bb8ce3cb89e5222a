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

mod store;

use std::collections::BTreeSet;

use async_trait::async_trait;

use crate::domain::envelope::Envelope;
use crate::domain::events::Event;
use crate::domain::events::{
    self, DeliveryFailed, InventoryCommitted, InventoryRejected, InventoryReleased,
    InventoryReserved, Meta, OrderAccepted, OrderCancelled, OrderShipped, ProductUpserted,
    ReleaseReason, Shortage, SkuQuantity, StockReceived,
};
use crate::domain::outcome::HandlerError;
use crate::handlers::{lock_keys, sorted_order_ids, Context, Handler};
use crate::store::db::{Cached, Tx};
pub use store::Group;
use store::*;

/// The inventory handler.
pub struct Inventory;

impl Inventory {
    async fn stock_received(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Group>,
    ) -> Result<(), HandlerError> {
        let d: StockReceived = events::decode(event)?;
        if d.quantity <= 0 {
            return Err(HandlerError::permanent(format!(
                "StockReceived for {} has a non-positive quantity {}",
                d.sku, d.quantity
            )));
        }
        let group = &mut cx.batch;
        if let Some(level) = group.stock.get_mut(&d.sku) {
            // A row this transaction holds changes in memory, or its write-back would undo this.
            level.on_hand = level
                .on_hand
                .checked_add(d.quantity)
                .ok_or_else(|| HandlerError::permanent(format!("stock of {} overflows", d.sku)))?;
            level.changed = true;
        } else {
            cx.tx
                .execute_cached(
                    "INSERT INTO stock (sku, on_hand) VALUES ($1, $2)
                     ON CONFLICT (sku) DO UPDATE SET on_hand = stock.on_hand + EXCLUDED.on_hand",
                    &[&d.sku, &d.quantity],
                )
                .await?;
        }
        cx.batch.moves.push(Movement {
            sku: d.sku,
            kind: "received",
            quantity: d.quantity,
            order_id: None,
            event_key: event.event_key().to_string(),
        });
        Ok(())
    }

    async fn product_upserted(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Group>,
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
    async fn reserve(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Group>,
    ) -> Result<(), HandlerError> {
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
        if load(cx, &d.order_id).await?.is_some() {
            return Ok(());
        }
        let stock = lock_stock(cx, &wanted).await?;
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
            insert_rows(cx, &d.order_id, &wanted, State::Rejected);
            return cx.emit_event(&InventoryRejected {
                meta: Meta::default(),
                order_id: d.order_id,
                shortages,
            });
        }
        move_stock(
            cx,
            &d.order_id,
            event.event_key(),
            &wanted,
            (0, 1),
            "reserved",
        )?;
        insert_rows(cx, &d.order_id, &wanted, State::Reserved);
        cx.emit_event(&InventoryReserved {
            meta: Meta::default(),
            order_id: d.order_id,
            lines: to_lines(&wanted),
        })
    }

    /// Gives the reservation back. Always confirms with `InventoryReleased`, even when nothing
    /// was reserved, so that the order can settle; when the cancellation arrives before the
    /// order, it leaves released rows behind so that the late `OrderAccepted` reserves nothing.
    async fn release(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Group>,
    ) -> Result<(), HandlerError> {
        let d: OrderCancelled = events::decode(event)?;
        lock_order(cx, &d.order_id).await?;
        let released = match load(cx, &d.order_id).await? {
            None => {
                let lines = per_sku(&d.lines, &d.order_id)?;
                if !lines.is_empty() {
                    insert_rows(cx, &d.order_id, &lines, State::Released);
                }
                Vec::new()
            }
            Some(r) => match r.state {
                State::Released => return Ok(()),
                State::Rejected => {
                    set_state(cx, &d.order_id, State::Released);
                    Vec::new()
                }
                State::Reserved => {
                    lock_stock(cx, &r.lines).await?;
                    move_stock(
                        cx,
                        &d.order_id,
                        event.event_key(),
                        &r.lines,
                        (0, -1),
                        "released",
                    )?;
                    set_state(cx, &d.order_id, State::Released);
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
        cx.emit_event(&InventoryReleased {
            meta: Meta::default(),
            order_id: d.order_id,
            reason: ReleaseReason::Cancelled,
            lines: released,
        })
    }

    /// The parcel left: the reserved units leave the warehouse.
    async fn commit(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Group>,
    ) -> Result<(), HandlerError> {
        let d: OrderShipped = events::decode(event)?;
        lock_order(cx, &d.order_id).await?;
        let Some(r) = load(cx, &d.order_id).await? else {
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
                lock_stock(cx, &r.lines).await?;
                move_stock(
                    cx,
                    &d.order_id,
                    event.event_key(),
                    &r.lines,
                    (-1, -1),
                    "committed",
                )?;
                set_state(cx, &d.order_id, State::Committed);
                cx.emit_event(&InventoryCommitted {
                    meta: Meta::default(),
                    order_id: d.order_id,
                    lines: r.lines(),
                })
            }
        }
    }

    /// The parcel came back: its units are sellable again.
    async fn restock_return(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Group>,
    ) -> Result<(), HandlerError> {
        let d: DeliveryFailed = events::decode(event)?;
        lock_order(cx, &d.order_id).await?;
        let restocked = match load(cx, &d.order_id).await? {
            None => {
                let lines = per_sku(&d.lines, &d.order_id)?;
                if !lines.is_empty() {
                    insert_rows(cx, &d.order_id, &lines, State::Released);
                }
                Vec::new()
            }
            Some(r) => match r.state {
                State::Released => return Ok(()),
                State::Rejected => {
                    set_state(cx, &d.order_id, State::Released);
                    Vec::new()
                }
                State::Committed => {
                    lock_stock(cx, &r.lines).await?;
                    move_stock(
                        cx,
                        &d.order_id,
                        event.event_key(),
                        &r.lines,
                        (1, 0),
                        "returned",
                    )?;
                    set_state(cx, &d.order_id, State::Released);
                    r.lines()
                }
                // The return overtook the shipment: on_hand never went down, so only the
                // reservation goes; the late OrderShipped then finds nothing to commit.
                State::Reserved => {
                    lock_stock(cx, &r.lines).await?;
                    move_stock(
                        cx,
                        &d.order_id,
                        event.event_key(),
                        &r.lines,
                        (0, -1),
                        "returned",
                    )?;
                    set_state(cx, &d.order_id, State::Released);
                    r.lines()
                }
            },
        };
        cx.emit_event(&InventoryReleased {
            meta: Meta::default(),
            order_id: d.order_id,
            reason: ReleaseReason::Returned,
            lines: restocked,
        })
    }
}

/// The stock rows of a group, locked in key order: those of the SKUs its events name (`$1`)
/// and those its orders (`$2`) reserved. One array of SKUs, so that the stock rows are found
/// through the primary key whatever the catalogue's size: written as `sku = ANY($1) OR sku IN
/// (SELECT ...)`, PostgreSQL can only filter every row of `stock` (15 ms a group with 50,000
/// SKUs, against 0.2 through the index; docs/BENCHMARKS.md).
pub const LOCK_GROUP_STOCK: &str = "SELECT sku, on_hand, reserved FROM stock
  WHERE sku = ANY($1::text[] || ARRAY(SELECT sku FROM reservations WHERE order_id = ANY($2)))
  ORDER BY sku FOR UPDATE";

#[async_trait]
impl Handler for Inventory {
    type Batch = Group;

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
        batch: &mut Group,
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
        let skus: Vec<&str> = skus.into_iter().collect();
        let rows = tx
            .query_cached(LOCK_GROUP_STOCK, &[&skus, &ids])
            .await
            .map_err(|e| HandlerError::from_db("locking stock", &e))?;
        let group = batch;
        group.held.extend(ids.iter().map(|id| id.to_string()));
        hold(group, &rows);
        read_reservations(tx, group, &ids).await
    }

    async fn finish(&self, tx: &Tx, group: Group) -> Result<(), HandlerError> {
        write_back(tx, group).await
    }

    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Group>,
    ) -> Result<(), HandlerError> {
        match event.detail_type.as_str() {
            StockReceived::DETAIL_TYPE => self.stock_received(event, cx).await,
            ProductUpserted::DETAIL_TYPE => self.product_upserted(event, cx).await,
            OrderAccepted::DETAIL_TYPE => self.reserve(event, cx).await,
            OrderCancelled::DETAIL_TYPE => self.release(event, cx).await,
            OrderShipped::DETAIL_TYPE => self.commit(event, cx).await,
            DeliveryFailed::DETAIL_TYPE => self.restock_return(event, cx).await,
            other => Err(HandlerError::permanent(format!(
                "inventory does not handle {other}"
            ))),
        }
    }
}
