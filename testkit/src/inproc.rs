//! An in-process fleet: the real handlers and the real [`runtime::execute`], with the outbox
//! standing in for EventBridge and SQS. For tests and the benchmark.
//!
//! A [`Fleet`] takes unpublished outbox rows (`FOR UPDATE SKIP LOCKED`, marked published or
//! deleted in the same statement), turns each into an [`Envelope`] as the relay and a rule
//! would, and runs [`runtime::execute`] for every consumer the catalogue lists that this fleet
//! has.
//! Storefront events enter through [`Fleet::publish`], which writes them to the outbox.
//!
//! Tests choose the granularity: [`Fleet::run_until_quiet`] drives everything to rest,
//! [`Fleet::step`] delivers one event, and [`Fleet::take`] plus [`Fleet::deliver`] /
//! [`Fleet::deliver_to`] let a test drop, duplicate or reorder deliveries. Nothing sleeps: a
//! retryable failure is redelivered at once, up to the queue's receive limit, then
//! dead-lettered in memory ([`Fleet::dead_letters`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio::sync::Notify;
use uuid::Uuid;

use orderfleet::domain::catalogue::{self, STOREFRONT_SOURCE};
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::events::Event;
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::outcome::{FailureKind, HandlerError};
use orderfleet::handlers::{fulfillment, inventory, orders, payments, AnyHandler};
use orderfleet::infra::topology::DEFAULT_MAX_RECEIVE_COUNT;
use orderfleet::providers::carrier::SandboxCarrier;
use orderfleet::providers::payment::SandboxProvider;
use orderfleet::runtime::group::{GroupCommit, GroupConfig};
use orderfleet::runtime::{self, Apply, Executed};
use orderfleet::store::db::Cached;
use orderfleet::worker::deps::Deps;

/// The handlers of the order saga: the ones a [`Fleet`] runs by default. Notifications,
/// analytics and personalization are not driven in process.
pub const SAGA: [HandlerName; 4] = [
    HandlerName::Orders,
    HandlerName::Inventory,
    HandlerName::Payments,
    HandlerName::Fulfillment,
];

/// A message that failed for good, kept in memory instead of a DLQ.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `None` when no handler was asked: the detail-type is not in the catalogue.
    pub handler: Option<HandlerName>,
    pub kind: FailureKind,
    pub reason: String,
    pub envelope: Envelope,
}

/// What one delivery of an event to one handler came to, after in-place retries.
#[derive(Debug)]
pub struct Delivery {
    pub handler: HandlerName,
    /// `Err` only when the failure was final (permanent, poison, or retries exhausted).
    pub outcome: Result<Executed, HandlerError>,
    /// Executions it took (1 unless retried).
    pub attempts: u32,
}

/// Counters of a fleet since it was built.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Events taken from the outbox (or delivered by hand).
    pub events: u64,
    /// Database transactions of handlers: one per event handled alone, one per group of
    /// events committed together (see [`orderfleet::runtime::group`]).
    pub executions: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub retries: u64,
    pub dead_lettered: u64,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    executions: AtomicU64,
    applied: AtomicU64,
    duplicates: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
}

struct Inner {
    pool: Pool,
    /// Handlers that run their transactions through a pool of their own (as their own
    /// database role, say) instead of `pool`.
    handler_pools: BTreeMap<HandlerName, Pool>,
    handlers: BTreeMap<HandlerName, Arc<dyn AnyHandler>>,
    /// The handlers that group commits ([`Handler::group_commit`]), with their groupers.
    groups: BTreeMap<HandlerName, GroupCommit>,
    group: GroupConfig,
    max_receive_count: u32,
    max_events: u64,
    keep_published: bool,
    counters: Counters,
    dead: Mutex<Vec<DeadLetter>>,
}

impl Inner {
    /// The pool `name`'s transactions run through.
    fn pool_of(&self, name: HandlerName) -> Pool {
        self.handler_pools.get(&name).unwrap_or(&self.pool).clone()
    }
}

/// An in-process fleet over one database. Cheap to clone; clones share handlers and counters.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

impl Fleet {
    /// A fleet with no handlers: add them with [`Fleet::with_handler`].
    pub fn new(pool: Pool) -> Self {
        Fleet {
            inner: Arc::new(Inner {
                pool,
                handler_pools: BTreeMap::new(),
                handlers: BTreeMap::new(),
                groups: BTreeMap::new(),
                group: GroupConfig::default(),
                max_receive_count: DEFAULT_MAX_RECEIVE_COUNT,
                max_events: 1_000_000,
                keep_published: true,
                counters: Counters::default(),
                dead: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The four saga handlers with the sandbox payment provider (no latency) and carrier,
    /// the sandbox sharing `pool`. Fine for sequential driving; with concurrent deliveries use
    /// [`Fleet::sandbox_with`] and a separate pool, because each payment holds a connection
    /// for its transaction while the sandbox needs another.
    pub fn sandbox(pool: Pool) -> Self {
        Self::sandbox_with(pool.clone(), pool, Duration::ZERO)
    }

    /// The four saga handlers; the sandbox payment provider keeps its state through
    /// `provider_pool` and takes `payment_latency` per call; the sandbox carrier keeps its
    /// parcels, and fulfillment commits its intents to ship, through it too.
    pub fn sandbox_with(pool: Pool, provider_pool: Pool, payment_latency: Duration) -> Self {
        // The attempt log writes outside the handler's transaction; through the provider's
        // pool, a payment never waits on its own pool for a second connection.
        let provider = Arc::new(SandboxProvider::new(provider_pool.clone(), payment_latency));
        let payments = payments::Payments::with_attempt_log(provider, provider_pool.clone());
        Fleet::new(pool)
            .with_handler(HandlerName::Orders, Arc::new(orders::Orders))
            .with_handler(HandlerName::Inventory, Arc::new(inventory::Inventory))
            .with_handler(HandlerName::Payments, Arc::new(payments))
            .with_handler(
                HandlerName::Fulfillment,
                Arc::new(fulfillment::Fulfillment::new(
                    Arc::new(SandboxCarrier::new(provider_pool.clone())),
                    provider_pool,
                )),
            )
    }

    /// The saga handlers as the worker builds them from `deps`.
    pub fn from_deps(deps: &Deps) -> Result<Self> {
        let mut fleet = Fleet::new(deps.pool.clone());
        for name in SAGA {
            fleet = fleet.with_handler(name, orderfleet::worker::deps::build(name, deps)?);
        }
        Ok(fleet)
    }

    /// Adds (or replaces) the handler for `name`. Must be called before the fleet is cloned.
    pub fn with_handler(mut self, name: HandlerName, handler: Arc<dyn AnyHandler>) -> Self {
        let inner = self.inner_mut();
        inner.groups.remove(&name);
        if handler.group_commit() {
            let group = GroupCommit::new(handler.clone(), inner.pool_of(name), inner.group);
            inner.groups.insert(name, group);
        }
        inner.handlers.insert(name, handler);
        self
    }

    /// Runs `name`'s transactions through `pool` (e.g. [`orderfleet::store::db::pool_as`] its
    /// own database role) instead of the fleet's. Call before [`Fleet::with_handler`] for
    /// that handler.
    pub fn with_handler_pool(mut self, name: HandlerName, pool: Pool) -> Self {
        self.inner_mut().handler_pools.insert(name, pool);
        self
    }

    /// How events of the grouping handlers are committed together (default:
    /// [`GroupConfig::default`]; `max_group` 1 handles every event alone).
    pub fn with_group_commit(mut self, cfg: GroupConfig) -> Self {
        let inner = self.inner_mut();
        inner.group = cfg;
        for (name, group) in inner.groups.iter_mut() {
            let handler = inner.handlers[name].clone();
            let pool = inner.handler_pools.get(name).unwrap_or(&inner.pool).clone();
            *group = GroupCommit::new(handler, pool, cfg);
        }
        self
    }

    /// Receives after which a retryable failure is dead-lettered (default: the queues').
    pub fn with_max_receive_count(mut self, n: u32) -> Self {
        self.inner_mut().max_receive_count = n.max(1);
        self
    }

    /// Events [`Fleet::run_until_quiet`] delivers before it gives up on ever getting quiet.
    pub fn with_max_events(mut self, n: u64) -> Self {
        self.inner_mut().max_events = n;
        self
    }

    /// Whether taken events stay in the outbox, marked published (the default, so that tests
    /// can read what was emitted), or are deleted as the [`orderfleet::store::outbox::Relay`] deletes what
    /// it published (the benchmark, to do the relay's work).
    pub fn with_published_kept(mut self, keep: bool) -> Self {
        self.inner_mut().keep_published = keep;
        self
    }

    fn inner_mut(&mut self) -> &mut Inner {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner,
            None => panic!("configure a Fleet before cloning it"),
        }
    }

    /// The database the fleet runs on.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The handler for `name`, when this fleet has it.
    pub fn handler(&self, name: HandlerName) -> Option<Arc<dyn AnyHandler>> {
        self.inner.handlers.get(&name).cloned()
    }

    /// Counters since the fleet was built.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let grouped: u64 = self
            .inner
            .groups
            .values()
            .map(|g| g.stats().transactions)
            .sum();
        Stats {
            events: c.events.load(Relaxed),
            executions: c.executions.load(Relaxed) + grouped,
            applied: c.applied.load(Relaxed),
            duplicates: c.duplicates.load(Relaxed),
            retries: c.retries.load(Relaxed),
            dead_lettered: c.dead_lettered.load(Relaxed),
        }
    }

    /// Messages that failed for good so far.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner
            .dead
            .lock()
            .map(|d| d.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Publishes a storefront event: writes it to the outbox with source
    /// [`STOREFRONT_SOURCE`], as if the storefront had put it on the bus. The detail keeps its
    /// own `event_id` if it has one, so publishing the same detail twice is a duplicate.
    /// Returns the outbox row's id (the envelope id of its delivery).
    pub async fn publish(&self, detail_type: &str, detail: &impl Serialize) -> Result<Uuid> {
        let detail = serde_json::to_value(detail).context("encoding the detail")?;
        if !detail.is_object() {
            bail!("{detail_type} detail must be a JSON object");
        }
        let id = Uuid::new_v4();
        let client = self.inner.pool.get().await.context("database pool")?;
        client
            .execute_cached(
                "INSERT INTO outbox (event_id, source, detail_type, detail) VALUES ($1, $2, $3, $4)",
                &[&id, &STOREFRONT_SOURCE, &detail_type, &detail],
            )
            .await
            .context("writing a storefront event to the outbox")?;
        Ok(id)
    }

    /// [`Fleet::publish`] for a typed event.
    pub async fn publish_event<T: Event>(&self, event: &T) -> Result<Uuid> {
        self.publish(T::DETAIL_TYPE, event).await
    }

    /// Takes up to `limit` unpublished events, oldest first, and marks them published or
    /// deletes them ([`Fleet::with_published_kept`]), as the relay does once PutEvents
    /// succeeded. Rows another caller is taking are skipped.
    pub async fn take(&self, limit: usize) -> Result<Vec<Envelope>> {
        let client = self.inner.pool.get().await.context("database pool")?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = if self.inner.keep_published {
            "UPDATE outbox SET published_at = now(), attempts = attempts + 1
              WHERE id IN (SELECT id FROM outbox WHERE published_at IS NULL
                            ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
          RETURNING id, event_id, source, detail_type, detail, created_at"
        } else {
            "DELETE FROM outbox
              WHERE id IN (SELECT id FROM outbox WHERE published_at IS NULL
                            ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
          RETURNING id, event_id, source, detail_type, detail, created_at"
        };
        let rows = client
            .query_cached(sql, &[&limit])
            .await
            .context("taking events from the outbox")?;
        let mut taken: Vec<(i64, Envelope)> = rows
            .iter()
            .map(|r| {
                let id: Uuid = r.get(1);
                let time: DateTime<Utc> = r.get(5);
                (
                    r.get(0),
                    Envelope {
                        version: "0".into(),
                        id: id.to_string(),
                        source: r.get(2),
                        detail_type: r.get(3),
                        time,
                        account: String::new(),
                        region: String::new(),
                        resources: Vec::new(),
                        detail: r.get(4),
                    },
                )
            })
            .collect();
        taken.sort_by_key(|(id, _)| *id);
        self.inner
            .counters
            .events
            .fetch_add(taken.len() as u64, Relaxed);
        Ok(taken.into_iter().map(|(_, e)| e).collect())
    }

    /// How many events wait in the outbox.
    pub async fn pending(&self) -> Result<i64> {
        let client = self.inner.pool.get().await.context("database pool")?;
        let row = client
            .query_one_cached(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The consumers of `detail_type` (per the catalogue) that this fleet has.
    pub fn consumers(&self, detail_type: &str) -> Vec<HandlerName> {
        catalogue::spec(detail_type)
            .map(|spec| {
                spec.consumers
                    .iter()
                    .copied()
                    .filter(|h| self.inner.handlers.contains_key(h))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Delivers events oldest first until one of `detail_type` comes up, and returns it
    /// undelivered: for a test that holds an event back, drops it or delivers it twice.
    pub async fn deliver_until(&self, detail_type: &str) -> Result<Envelope> {
        loop {
            let Some(event) = self.take(1).await?.pop() else {
                bail!("the fleet went quiet before a {detail_type} came up");
            };
            if event.detail_type == detail_type {
                return Ok(event);
            }
            self.deliver(&event).await;
        }
    }

    /// Runs `handler` on `event` once, as one receive with `receive_count`.
    pub async fn deliver_to(
        &self,
        handler: HandlerName,
        event: &Envelope,
        receive_count: u32,
    ) -> Result<Executed, HandlerError> {
        let Some(h) = self.inner.handlers.get(&handler) else {
            return Err(HandlerError::permanent(format!(
                "handler {handler} is not in this fleet"
            )));
        };
        let c = &self.inner.counters;
        let result = match self.inner.groups.get(&handler) {
            // The group keeps the event until its group runs: its own copy, as a consumer's.
            Some(group) => {
                group
                    .apply(&std::sync::Arc::new(event.clone()), receive_count)
                    .await
            }
            None => {
                c.executions.fetch_add(1, Relaxed);
                runtime::execute(&**h, &self.inner.pool_of(handler), event, receive_count).await
            }
        };
        match &result {
            Ok(Executed::Applied { .. }) => c.applied.fetch_add(1, Relaxed),
            Ok(Executed::Duplicate) => c.duplicates.fetch_add(1, Relaxed),
            Err(_) => 0,
        };
        result
    }

    /// Delivers `event` to one handler as SQS would: a retryable failure is received again
    /// (immediately, here) until the receive limit, then dead-lettered; a permanent or poison
    /// failure is dead-lettered at once.
    pub async fn deliver_with_retries(&self, handler: HandlerName, event: &Envelope) -> Delivery {
        let max = self.inner.max_receive_count;
        let mut attempt = 1;
        loop {
            let outcome = self.deliver_to(handler, event, attempt).await;
            let final_failure = match &outcome {
                Ok(_) => None,
                Err(HandlerError::Retry { reason, .. }) if attempt >= max => Some((
                    FailureKind::Exhausted,
                    format!("retries exhausted after {attempt} receives: {reason}"),
                )),
                Err(HandlerError::Retry { .. }) => {
                    self.inner.counters.retries.fetch_add(1, Relaxed);
                    attempt += 1;
                    continue;
                }
                Err(HandlerError::Permanent { reason }) => {
                    Some((FailureKind::Permanent, reason.clone()))
                }
                Err(HandlerError::Poison { reason }) => Some((FailureKind::Poison, reason.clone())),
            };
            if let Some((kind, reason)) = final_failure {
                tracing::warn!(
                    handler = handler.as_str(),
                    detail_type = %event.detail_type,
                    kind = kind.as_str(),
                    reason,
                    "in-process delivery dead-lettered"
                );
                self.inner.counters.dead_lettered.fetch_add(1, Relaxed);
                let letter = DeadLetter {
                    handler: Some(handler),
                    kind,
                    reason,
                    envelope: event.clone(),
                };
                match self.inner.dead.lock() {
                    Ok(mut d) => d.push(letter),
                    Err(poisoned) => poisoned.into_inner().push(letter),
                }
            }
            return Delivery {
                handler,
                outcome,
                attempts: attempt,
            };
        }
    }

    /// Delivers `event` to every consumer this fleet has, one after the other, each with
    /// retries. An event the catalogue does not know is dead-lettered, as the runtime does.
    pub async fn deliver(&self, event: &Envelope) -> Vec<Delivery> {
        if catalogue::spec(&event.detail_type).is_none() {
            let reason = format!("unknown detail-type {:?}", event.detail_type);
            let letter = DeadLetter {
                handler: None,
                kind: FailureKind::Permanent,
                reason,
                envelope: event.clone(),
            };
            self.inner.counters.dead_lettered.fetch_add(1, Relaxed);
            match self.inner.dead.lock() {
                Ok(mut d) => d.push(letter),
                Err(poisoned) => poisoned.into_inner().push(letter),
            }
            return Vec::new();
        }
        let mut out = Vec::new();
        for handler in self.consumers(&event.detail_type) {
            out.push(self.deliver_with_retries(handler, event).await);
        }
        out
    }

    /// Takes the oldest waiting event and delivers it. `None` when the outbox is empty.
    pub async fn step(&self) -> Result<Option<(Envelope, Vec<Delivery>)>> {
        let Some(event) = self.take(1).await?.into_iter().next() else {
            return Ok(None);
        };
        let deliveries = self.deliver(&event).await;
        Ok(Some((event, deliveries)))
    }

    /// Delivers events one at a time, oldest first, until the outbox is empty. Returns the
    /// number of events delivered. Fails if the fleet never gets quiet (`with_max_events`).
    pub async fn run_until_quiet(&self) -> Result<u64> {
        let mut delivered = 0;
        loop {
            let batch = self.take(32).await?;
            if batch.is_empty() {
                return Ok(delivered);
            }
            for event in &batch {
                self.deliver(event).await;
                delivered += 1;
            }
            if delivered > self.inner.max_events {
                bail!("the fleet delivered {delivered} events and is still not quiet");
            }
        }
    }

    /// [`Fleet::run_until_quiet`] with `workers` concurrent tasks taking batches of up to
    /// `batch` events, the way several worker instances would share the queues. Returns when
    /// no task is delivering and the outbox is empty.
    pub async fn run_until_quiet_concurrently(&self, workers: usize, batch: usize) -> Result<u64> {
        let busy = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Notify::new());
        let delivered = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers.max(1) {
            let (fleet, busy, done, delivered) =
                (self.clone(), busy.clone(), done.clone(), delivered.clone());
            tasks.spawn(async move {
                loop {
                    // Registered before the check below, so a wake-up between the two is kept.
                    let woken = done.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    busy.fetch_add(1, SeqCst);
                    let taken = fleet.take(batch.max(1)).await;
                    let events = match taken {
                        Ok(events) => events,
                        Err(e) => {
                            busy.fetch_sub(1, SeqCst);
                            done.notify_waiters();
                            return Err(e);
                        }
                    };
                    if !events.is_empty() {
                        // Delivered side by side, as a worker's consumer tasks would: what
                        // reaches a grouping handler together is committed together.
                        let count = events.len();
                        let mut deliveries = tokio::task::JoinSet::new();
                        for event in events {
                            let fleet = fleet.clone();
                            deliveries.spawn(async move { fleet.deliver(&event).await });
                        }
                        while let Some(joined) = deliveries.join_next().await {
                            if let Err(e) = joined {
                                busy.fetch_sub(1, SeqCst);
                                done.notify_waiters();
                                bail!("a delivery task failed: {e}");
                            }
                        }
                        let n = delivered.fetch_add(count as u64, SeqCst);
                        busy.fetch_sub(1, SeqCst);
                        // What this batch emitted is committed: idle tasks may take it.
                        done.notify_waiters();
                        if n > fleet.inner.max_events {
                            bail!("the fleet delivered {n} events and is still not quiet");
                        }
                        continue;
                    }
                    if busy.fetch_sub(1, SeqCst) == 1 {
                        // Nobody is delivering, so nothing new can appear but what is there.
                        if fleet.pending().await? == 0 {
                            done.notify_waiters();
                            return Ok(());
                        }
                        continue;
                    }
                    woken.await;
                }
            });
        }
        let mut result = Ok(());
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(e) => result = Err(anyhow::anyhow!("fleet task failed: {e}")),
            }
        }
        result.map(|()| delivered.load(SeqCst))
    }
}
