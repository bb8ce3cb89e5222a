//! storefront: the connector to the shop's commerce platform, both ways.
//!
//! **In.** The platform's events reach the storefront queue through a rule on the platform's
//! EventBridge partner event bus ([`crate::infra::topology::Topology::external_rules`]). Each
//! is translated into the catalogue's storefront events and written to the outbox in the
//! transaction that claims it in the inbox, so it is published once whatever happens around
//! it. The platform's own id is the inbox key ([`crate::domain::platform::Platform::event_key`]):
//! a webhook delivered twice is applied once.
//!
//! | platform event | becomes |
//! |---|---|
//! | Shopify `orders/create`, commercetools `OrderCreated` | `OrderPlaced` (version 2: order number, platform ids, discount, shipping, tax) |
//! | Shopify `orders/cancelled`, commercetools `OrderStateChanged` to `Cancelled` | `OrderCancellationRequested` |
//! | Shopify `products/create`/`products/update`, commercetools `ProductPublished` | `ProductUpserted` per variant with a SKU |
//! | Shopify `inventory_levels/update` (a level), commercetools `InventoryEntryQuantitySet` (a change) | `StockReceived` for a rise; a fall is the platform selling or adjusting, which the fleet's own reservations already account for |
//! | any other topic | nothing: counted in `platform_skipped_topics`, acknowledged |
//!
//! A payload that cannot be read, or whose parts do not make its total, is poison with the
//! reason: it lands in the DLQ, never half-applied.
//!
//! **Back.** For an order that came from a platform, `OrderShipped`, `OrderCancelled` and
//! `PaymentRefunded` are written back through [`PlatformApi`]: the call is recorded in
//! `platform_calls` (committed before it is made, like payments' provider attempts), bounded by
//! the handler's time left, and marked done as soon as the platform answers (committed too,
//! so a rolled-back transaction does not make the call again). Orders from
//! elsewhere (the simulator, a storefront of the shop's own) are acknowledged.
//!
//! **Grouped when nothing calls out.** With the sandbox write-back (`--platform-api sandbox`,
//! the default), no call here waits on a remote system, so events share transactions
//! ([`crate::runtime::group`]): a group claims its events at once and commits once. Each
//! event's outcome is what it would be alone: a webhook delivered twice is applied once, a
//! write-back asked twice in one group or by two groups at once is made once (the second
//! sees the first's `done`), a refused one is judged alone while its neighbours commit, and a
//! rival group that takes an inventory item's row in the other order makes PostgreSQL abort
//! one of them (the event that hit the deadlock is retried later). A group rolled back (by a
//! neighbour's failure, or lost before its commit) keeps what a lone event would have kept:
//! the `platform_calls` records, committed around each call, so the rerun does not make a
//! call that was done. With the live APIs every event has a transaction of its own, since a
//! write-back call would hold up the group.

pub mod commercetools;
pub mod shopify;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;

use crate::domain::envelope::Envelope;
use crate::domain::events::{
    self, Currency, Event, Meta, OrderCancellationRequested, OrderCancelled, OrderPlaced,
    OrderShipped, PaymentRefunded, PlatformOrder, ProductUpserted, StockReceived,
};
use crate::domain::outcome::HandlerError;
use crate::domain::platform::Platform;
use crate::handlers::{out_of_time, Context, Handler};
use crate::providers::platform::{Action, Call, PlatformApi, PlatformError};
use crate::store::db::Cached;

/// What one platform event means to the fleet.
#[derive(Debug)]
pub enum Inbound {
    Placed(Box<OrderPlaced>),
    CancelRequested(OrderCancellationRequested),
    Products {
        products: Vec<ProductUpserted>,
        /// Inventory item ids and the SKU each is (Shopify).
        items: Vec<(String, String)>,
    },
    /// An inventory item's level now (Shopify): a rise over the last level seen is received.
    /// Levels can arrive out of order (redeliveries, several workers): one measured before the
    /// last one applied (`at`) is stale and changes nothing.
    Level {
        item_id: String,
        available: i64,
        at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Stock on hand of a SKU changed by `delta` (commercetools).
    Received {
        sku: String,
        delta: i64,
    },
    /// A topic the fleet does not translate.
    Skipped {
        topic: String,
    },
}

/// Translates a platform event: `Ok` with what it means, or poison with the reason.
pub fn translate(
    platform: Platform,
    event: &Envelope,
    shop_currency: Currency,
) -> Result<Inbound, HandlerError> {
    match platform {
        Platform::Shopify if event.detail_type != shopify::DETAIL_TYPE => Ok(Inbound::Skipped {
            topic: event.detail_type.clone(),
        }),
        Platform::Shopify => shopify::translate(&event.detail, shop_currency),
        Platform::Commercetools => commercetools::translate(&event.detail_type, &event.detail),
    }
}

/// The storefront handler.
pub struct Storefront {
    platforms: HashMap<Platform, Arc<dyn PlatformApi>>,
    shop_currency: Currency,
    /// Where write-back calls are recorded before they are made, outside the handler's
    /// transaction so that the record survives its rollback.
    calls_pool: Pool,
    /// The longest a platform call may take.
    timeout: Duration,
}

impl Storefront {
    pub fn new(
        platforms: Vec<Arc<dyn PlatformApi>>,
        shop_currency: Currency,
        calls_pool: Pool,
        timeout: Duration,
    ) -> Self {
        Storefront {
            platforms: platforms.into_iter().map(|p| (p.platform(), p)).collect(),
            shop_currency,
            calls_pool,
            timeout,
        }
    }

    async fn inbound(
        &self,
        platform: Platform,
        event: &Envelope,
        cx: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        match translate(platform, event, self.shop_currency)? {
            Inbound::Placed(order) => {
                if let Some(p) = &order.platform {
                    cx.tx
                        .execute_cached(
                            "INSERT INTO platform_orders (order_id, platform, platform_order_id,
                                                          shop, order_number)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (order_id) DO UPDATE
                                SET shop = EXCLUDED.shop, order_number = EXCLUDED.order_number",
                            &[
                                &order.order_id,
                                &p.platform.as_str(),
                                &p.id,
                                &p.shop,
                                &order.order_number,
                            ],
                        )
                        .await?;
                }
                cx.emit_event(order.as_ref())
            }
            Inbound::CancelRequested(request) => {
                // Remembered, so that our OrderCancelled is not written back to a platform
                // that cancelled the order itself. The cancellation may come first.
                let platform_id = platform_order_id(platform, &request.order_id);
                cx.tx
                    .execute_cached(
                        "INSERT INTO platform_orders (order_id, platform, platform_order_id,
                                                      cancelled_on_platform)
                         VALUES ($1, $2, $3, true)
                         ON CONFLICT (order_id) DO UPDATE SET cancelled_on_platform = true",
                        &[&request.order_id, &platform.as_str(), &platform_id],
                    )
                    .await?;
                cx.emit_event(&request)
            }
            Inbound::Products { products, items } => {
                if !items.is_empty() {
                    let (ids, skus): (Vec<String>, Vec<String>) = items.into_iter().unzip();
                    cx.tx
                        .execute_cached(
                            "INSERT INTO platform_inventory_items (platform, item_id, sku)
                             SELECT $1, id, sku FROM unnest($2::text[], $3::text[]) AS i(id, sku)
                             ON CONFLICT (platform, item_id) DO UPDATE SET sku = EXCLUDED.sku",
                            &[&platform.as_str(), &ids, &skus],
                        )
                        .await?;
                }
                for product in &products {
                    cx.emit_event(product)?;
                }
                Ok(())
            }
            Inbound::Level {
                item_id,
                available,
                at,
            } => {
                let row = cx
                    .tx
                    .query_opt_cached(
                        "SELECT sku, last_available, last_level_at FROM platform_inventory_items
                          WHERE platform = $1 AND item_id = $2 FOR UPDATE",
                        &[&platform.as_str(), &item_id],
                    )
                    .await?;
                let Some(row) = row else {
                    // Its product's webhook names the SKU; it may still be on its way.
                    return Err(HandlerError::retry(format!(
                        "{platform} inventory item {item_id} is not known yet: its product \
                         (which names the SKU) has not arrived"
                    )));
                };
                let (sku, last): (String, Option<i64>) = (row.get(0), row.get(1));
                let last_at: Option<chrono::DateTime<chrono::Utc>> = row.get(2);
                if let (Some(at), Some(last_at)) = (at, last_at) {
                    if at <= last_at {
                        tracing::info!(%platform, %item_id, %at, %last_at,
                            "stale inventory level (an older measurement arrived late); ignored");
                        return Ok(());
                    }
                }
                cx.tx
                    .execute_cached(
                        "UPDATE platform_inventory_items
                            SET last_available = $3, last_level_at = coalesce($4, last_level_at)
                          WHERE platform = $1 AND item_id = $2",
                        &[&platform.as_str(), &item_id, &available, &at],
                    )
                    .await?;
                // The first level seen of an item is received in full.
                self.receive(cx, sku, available - last.unwrap_or(0))
            }
            Inbound::Received { sku, delta } => self.receive(cx, sku, delta),
            Inbound::Skipped { topic } => {
                tracing::info!(%platform, %topic, "platform topic not translated; acknowledged");
                cx.tx
                    .execute_cached(
                        "INSERT INTO platform_skipped_topics (platform, topic, events)
                         VALUES ($1, $2, 1)
                         ON CONFLICT (platform, topic) DO UPDATE
                            SET events = platform_skipped_topics.events + 1, last_seen = now()",
                        &[&platform.as_str(), &topic],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    fn receive(&self, cx: &mut Context<'_>, sku: String, delta: i64) -> Result<(), HandlerError> {
        if delta <= 0 {
            return Ok(());
        }
        cx.emit_event(&StockReceived {
            meta: Meta::default(),
            sku,
            quantity: delta,
        })
    }

    /// Writes `action` back to the platform of `order_id`, if it came from one.
    async fn write_back(
        &self,
        cx: &mut Context<'_>,
        order_id: &str,
        key: String,
        action: Action,
    ) -> Result<(), HandlerError> {
        let row = cx
            .tx
            .query_opt_cached(
                "SELECT platform, platform_order_id, shop, cancelled_on_platform,
                        (SELECT state FROM platform_calls WHERE idempotency_key = $2)
                   FROM platform_orders WHERE order_id = $1",
                &[&order_id, &key],
            )
            .await?;
        let Some(row) = row else {
            return Ok(()); // not a platform's order
        };
        let platform: Platform = row
            .get::<_, String>(0)
            .parse()
            .map_err(HandlerError::permanent)?;
        let cancelled_there: bool = row.get(3);
        let state: Option<String> = row.get(4);
        if state.as_deref() == Some("done")
            || (cancelled_there && matches!(action, Action::Cancel { .. }))
        {
            return Ok(());
        }
        let api = self.platforms.get(&platform).ok_or_else(|| {
            HandlerError::permanent(format!(
                "order {order_id} came from {platform}, but no {platform} API is configured \
                 (see the README, Connecting your platform); configure it and redrive"
            ))
        })?;
        let call = Call {
            order: PlatformOrder {
                platform,
                id: row.get(1),
                shop: row.get(2),
            },
            idempotency_key: key,
        };
        if !self.record_call(order_id, &call, &action).await? {
            return Ok(()); // made meanwhile, by a rival process
        }
        let outcome = cx.bounded(self.timeout, api.apply(&call, &action)).await;
        let what = format!("{platform} {} of order {order_id}", action.operation());
        match outcome {
            Ok(Ok(reference)) => {
                tracing::info!(order_id, %platform, operation = action.operation(),
                    reference = %reference, "written back to the platform");
                self.record_answer(&call, "done", &reference).await
            }
            Ok(Err(PlatformError::Retry(reason))) => Err(HandlerError::retry(reason)),
            Ok(Err(PlatformError::Refused(reason))) => {
                self.record_answer(&call, "failed", &reason).await?;
                Err(HandlerError::permanent(format!("{what}: {reason}")))
            }
            Err(limit) => Err(HandlerError::retry(out_of_time(&what, limit))),
        }
    }

    /// Commits, before the call, that it is about to be made (and how often it was). False
    /// when the call is done already: a rival process made it after this one looked.
    ///
    /// This and [`Storefront::record_answer`] run on a connection of their own and commit at
    /// once, so the handler's transaction never holds a `platform_calls` row: in a group, a
    /// row it held until the group's commit would make another process's group wait for it
    /// on a connection PostgreSQL cannot tie to that group, a deadlock it cannot see.
    async fn record_call(
        &self,
        order_id: &str,
        call: &Call,
        action: &Action,
    ) -> Result<bool, HandlerError> {
        let client = self.calls_pool.get().await.map_err(|e| {
            HandlerError::retry(format!("recording the platform call for {order_id}: {e}"))
        })?;
        let recorded = client
            .execute_cached(
                "INSERT INTO platform_calls (idempotency_key, order_id, platform, operation, state)
                 VALUES ($1, $2, $3, $4, 'started')
                 ON CONFLICT (idempotency_key) DO UPDATE
                    SET attempts = platform_calls.attempts + 1, last_call_at = now(),
                        state = 'started'
                  WHERE platform_calls.state <> 'done'",
                &[
                    &call.idempotency_key,
                    &order_id,
                    &call.order.platform.as_str(),
                    &action.operation(),
                ],
            )
            .await
            .map_err(|e| HandlerError::from_db("recording the platform call", &e))?;
        Ok(recorded == 1)
    }

    /// Commits the platform's answer: `done` with its reference (whatever happens to the
    /// handler's transaction, the call is not made again), or `failed` with its refusal.
    async fn record_answer(
        &self,
        call: &Call,
        state: &str,
        result: &str,
    ) -> Result<(), HandlerError> {
        let what = "recording the platform's answer";
        let client = (self.calls_pool.get().await)
            .map_err(|e| HandlerError::retry(format!("{what}: {e}")))?;
        client
            .execute_cached(
                "UPDATE platform_calls
                    SET state = $2, result = $3,
                        done_at = CASE WHEN $2 = 'done' THEN now() ELSE done_at END
                  WHERE idempotency_key = $1",
                &[&call.idempotency_key, &state, &result],
            )
            .await
            .map_err(|e| HandlerError::from_db(what, &e))?;
        Ok(())
    }
}

/// The platform's id of our order `order_id` (as [`shopify::order_id`] and
/// [`commercetools::order_id`] made it).
fn platform_order_id(platform: Platform, order_id: &str) -> String {
    match platform {
        Platform::Shopify => format!(
            "gid://shopify/Order/{}",
            order_id.strip_prefix("shopify-").unwrap_or(order_id)
        ),
        Platform::Commercetools => order_id.strip_prefix("ct-").unwrap_or(order_id).to_string(),
    }
}

#[async_trait]
impl Handler for Storefront {
    type Batch = ();

    fn name(&self) -> &str {
        "storefront"
    }

    /// Whether every write-back goes to an API that answers locally (the sandbox, or no API
    /// at all): then nothing here waits on a remote call, and events share transactions. With
    /// a live API, an order's write-back call would hold up the group.
    fn group_commit(&self) -> bool {
        self.platforms.values().all(|api| api.answers_locally())
    }

    async fn handle(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        if let Some(platform) = Platform::of_source(&event.source) {
            return self.inbound(platform, event, cx).await;
        }
        match event.detail_type.as_str() {
            OrderShipped::DETAIL_TYPE => {
                let d: OrderShipped = events::decode(event)?;
                let key = format!("fulfill:{}", d.order_id);
                let action = Action::Fulfill {
                    carrier: d.carrier,
                    tracking_number: d.tracking_number,
                };
                self.write_back(cx, &d.order_id, key, action).await
            }
            OrderCancelled::DETAIL_TYPE => {
                let d: OrderCancelled = events::decode(event)?;
                let key = format!("cancel:{}", d.order_id);
                let action = Action::Cancel {
                    reason: d.reason.as_str().to_string(),
                };
                self.write_back(cx, &d.order_id, key, action).await
            }
            PaymentRefunded::DETAIL_TYPE => {
                let d: PaymentRefunded = events::decode(event)?;
                if d.amount.amount_minor == 0 {
                    // Operators refunded everything before a cancellation or a return asked:
                    // their refunds were written back already.
                    return Ok(());
                }
                let key = format!("refund:{}:{}", d.order_id, d.refund_id);
                let action = Action::Refund { amount: d.amount };
                self.write_back(cx, &d.order_id, key, action).await
            }
            other => Err(HandlerError::permanent(format!(
                "storefront does not handle {other} from {}",
                event.source
            ))),
        }
    }
}
