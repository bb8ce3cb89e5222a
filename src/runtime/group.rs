//! Group commit: several events of one handler applied in one PostgreSQL transaction.
//!
//! [`execute`](super::execute) spends four statements on every event besides the handler's
//! own: `BEGIN`, the inbox claim, the outbox insert and `COMMIT`. [`execute_group`] spends
//! them once per group: one claim for every event, the handler's [`Handler::lock_group`]
//! (which takes the group's locks in one global order, so that two groups never wait on each
//! other in opposite orders), the handler's statements for each event in turn, then one
//! outbox insert pipelined with `COMMIT`.
//!
//! The outcome of each event is what a transaction of its own would have given:
//! - an event whose handler fails rolls the group back. A retryable failure is that event's
//!   answer (it is received again later, as alone); so is a panic or running past the
//!   handler timeout, which cost only that event a receive. Any other failure is run again
//!   alone, in a transaction of its own, so a permanent verdict never rests on its
//!   neighbours. The others are grouped again without it.
//! - when the group itself cannot run (a deadlock while locking, a failed `COMMIT`), every
//!   event is run alone; when no connection can be had, every event is answered with a retry.
//! - an event whose consumer stopped waiting (its own timeout) is not committed: it will be
//!   received again.
//! - an event claimed before, or twice in one group, is a duplicate; nothing is applied twice.
//!   An event is its (event key, detail-type): one id reused across detail-types is two events.
//!
//! Deadlocks: every grouping handler's [`Handler::lock_group`] takes the advisory locks of the
//! group's order ids (and SKUs) and the rows it will change in sorted order, before handling
//! anything, so two groups that share an order or a SKU queue instead of deadlocking. A lock
//! the handler takes later that `lock_group` did not foresee can still deadlock; PostgreSQL
//! then aborts one transaction, and the event that hit it is answered with a retry.
//!
//! [`GroupCommit`] forms the groups. It is an [`Apply`]: each consumer task hands it one event
//! and awaits the answer. At most `transactions` groups of a handler run at once; events that
//! arrive while they are busy queue, and the next free runner takes up to the group cap of them.
//! So a quiet queue sees groups of one (no added latency), and a busy one sees groups that
//! grow with the load. The group cap is `max_group` (the flag), or, when the consumer that
//! applies through it shares its [`Counters`] ([`GroupCommit::counting_into`]), the consumer's
//! in-flight target divided by `transactions`, between 1 and `max_group`
//! ([`adapt::group_cap`]): every message in flight fits in the running groups, and a queue
//! without a backlog, whose target sits at the floor, keeps its groups (and its locks) small. Only handlers that say their work is all database work
//! ([`Handler::group_commit`]) are grouped: grouping serialises a remote call's waits.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::oneshot;

use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;

use super::adapt;
use super::consumer::{panic_text, payload_text};
use super::execute::{commit_with_outbox, execute_handing_off, roll_back, Apply, Executed};
use crate::domain::envelope::Envelope;
use crate::domain::outcome::HandlerError;
use crate::handlers::{AnyHandler, Context, GroupState};
use crate::store::db::OpenTransaction;
use crate::store::inbox;
use crate::store::outbox::{Handoff, NewEvent};
use crate::telemetry::metrics::Counters;

/// Rounds of dropping a failed event and grouping the rest again before the remaining events
/// are run alone.
const MAX_ROUNDS: usize = 3;

/// What [`execute_group`] did.
#[derive(Debug)]
pub struct GroupOutcome {
    /// One answer per event, in the order given.
    pub results: Vec<Result<Executed, HandlerError>>,
    /// Database transactions it opened (1 when the whole group committed together).
    pub transactions: u32,
}

/// Limits of one [`execute_group_with`] run.
pub struct Limits<'a> {
    /// One event's handling longer than this is abandoned and answered with a retry.
    pub event_timeout: Duration,
    /// Whether event `i` still has someone waiting for its answer. An event nobody waits for
    /// any more (its consumer timed out and will see it again) is not committed: the group
    /// rolls back and goes on without it.
    pub wanted: &'a (dyn Fn(usize) -> bool + Sync),
    /// Where caught panics are counted. (Timeouts are not: the consumer waiting for the event
    /// times out first, since its clock also runs while the event waits for a group, and
    /// counts it.)
    pub counters: Option<&'a Counters>,
    /// Publishes what a committed transaction emitted (see [`crate::store::outbox::Handoff`]);
    /// without one, the rows wait for a relay.
    pub handoff: Option<&'a Handoff>,
}

impl Default for Limits<'_> {
    fn default() -> Self {
        Limits {
            event_timeout: Duration::from_secs(30),
            wanted: &|_| true,
            counters: None,
            handoff: None,
        }
    }
}

/// Applies `events` (each with its receive count) with `handler`, in as few transactions as
/// the failures allow. See the module documentation.
pub async fn execute_group(
    handler: &dyn AnyHandler,
    pool: &Pool,
    events: &[(&Envelope, u32)],
) -> GroupOutcome {
    execute_group_with(handler, pool, events, &Limits::default()).await
}

/// [`execute_group`] with limits.
pub async fn execute_group_with(
    handler: &dyn AnyHandler,
    pool: &Pool,
    events: &[(&Envelope, u32)],
    limits: &Limits<'_>,
) -> GroupOutcome {
    let mut results: Vec<Option<Result<Executed, HandlerError>>> =
        events.iter().map(|_| None).collect();
    let mut members: Vec<usize> = (0..events.len()).collect();
    let mut alone: Vec<usize> = Vec::new();
    let mut transactions = 0;
    let mut rounds = 0;
    while members.len() > 1 && rounds < MAX_ROUNDS {
        members.retain(|&i| {
            let wanted = (limits.wanted)(i);
            if !wanted {
                results[i] = Some(Err(HandlerError::retry(NOT_WANTED)));
            }
            wanted
        });
        if members.len() <= 1 {
            break;
        }
        rounds += 1;
        transactions += 1;
        match try_group(handler, pool, events, &members, limits).await {
            Round::Committed(answers) => {
                for (&i, answer) in members.iter().zip(answers) {
                    results[i] = Some(answer);
                }
                members.clear();
            }
            Round::Failed { at, error } => {
                let i = members.remove(at);
                tracing::debug!(
                    handler = handler.name(),
                    event_id = %events[i].0.id,
                    error = %error,
                    "an event failed inside a group; grouping the others again"
                );
                match error {
                    HandlerError::Retry { .. } => results[i] = Some(Err(error)),
                    _ => alone.push(i),
                }
            }
            Round::Unavailable(error) => {
                // No connection: running the events one by one would wait for one each.
                let reason = error.to_string();
                for &i in &members {
                    results[i] = Some(Err(HandlerError::retry(reason.clone())));
                }
                members.clear();
            }
            Round::Broken(error) => {
                tracing::debug!(
                    handler = handler.name(),
                    events = members.len(),
                    error = %error,
                    "a group could not run; running its events one by one"
                );
                break;
            }
        }
    }
    alone.append(&mut members);
    alone.sort_unstable();
    for i in alone {
        if !(limits.wanted)(i) {
            results[i] = Some(Err(HandlerError::retry(NOT_WANTED)));
            continue;
        }
        transactions += 1;
        let (event, receive_count) = events[i];
        let deadline = tokio::time::Instant::now() + limits.event_timeout;
        let run = crate::handlers::DEADLINE.scope(
            deadline,
            guarded(
                execute_handing_off(handler, pool, event, receive_count, limits.handoff),
                limits,
            ),
        );
        results[i] = Some(
            tokio::time::timeout(limits.event_timeout, run)
                .await
                .unwrap_or_else(|_| Err(timed_out(limits.event_timeout))),
        );
    }
    GroupOutcome {
        results: results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(HandlerError::retry("the event was not run"))))
            .collect(),
        transactions,
    }
}

const NOT_WANTED: &str = "nobody waits for this event any more; it will be received again";

fn timed_out(limit: Duration) -> HandlerError {
    HandlerError::retry(format!("handler timed out after {}s", limit.as_secs_f64()))
}

/// Runs a handler's future, turning a panic into a retry of that event alone, counted.
async fn guarded<T>(
    run: impl std::future::Future<Output = Result<T, HandlerError>>,
    limits: &Limits<'_>,
) -> Result<T, HandlerError> {
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => {
            if let Some(c) = limits.counters {
                Counters::inc(&c.panics);
            }
            Err(HandlerError::retry(format!(
                "handler panicked: {}",
                payload_text(&*payload)
            )))
        }
    }
}

enum Round {
    /// One answer per member, in order.
    Committed(Vec<Result<Executed, HandlerError>>),
    /// Member `at` failed (or timed out, panicked, or was given up on); the transaction was
    /// rolled back.
    Failed { at: usize, error: HandlerError },
    /// No connection could be had.
    Unavailable(HandlerError),
    /// The group could not run or commit; the transaction was rolled back.
    Broken(HandlerError),
}

async fn try_group(
    handler: &dyn AnyHandler,
    pool: &Pool,
    events: &[(&Envelope, u32)],
    members: &[usize],
    limits: &Limits<'_>,
) -> Round {
    let conn = match pool.get().await {
        Ok(conn) => conn,
        Err(e) => return Round::Unavailable(e.into()),
    };
    let open = OpenTransaction::new(conn);
    let tx = open.tx();
    let keys: Vec<&str> = members.iter().map(|&i| events[i].0.event_key()).collect();
    let types: Vec<&str> = members
        .iter()
        .map(|&i| events[i].0.detail_type.as_str())
        .collect();
    let order_ids: Vec<Option<&str>> = members.iter().map(|&i| events[i].0.order_id()).collect();
    let (begun, claimed) = tokio::join!(
        tx.batch_execute("BEGIN"),
        inbox::claim_all(tx, handler.name(), &keys, &types, &order_ids)
    );
    if let Err(e) = begun {
        return Round::Broken(HandlerError::from_db("beginning a transaction", &e));
    }
    let claimed = match claimed {
        Ok(claimed) => claimed,
        Err(e) => {
            roll_back(open).await;
            return Round::Broken(e);
        }
    };
    // The first copy of a newly claimed (key, detail-type) is applied; every other one is a
    // duplicate.
    let mut taken = HashSet::new();
    let fresh: Vec<bool> = keys
        .iter()
        .zip(&types)
        .map(|(k, t)| {
            let key = (k.to_string(), t.to_string());
            claimed.contains(&key) && taken.insert(key)
        })
        .collect();
    let to_apply: Vec<&Envelope> = members
        .iter()
        .zip(&fresh)
        .filter(|(_, f)| **f)
        .map(|(&i, _)| events[i].0)
        .collect();
    if to_apply.is_empty() {
        roll_back(open).await;
        return Round::Committed(members.iter().map(|_| Ok(Executed::Duplicate)).collect());
    }
    let mut state = GroupState::default();
    if let Err(e) = handler.lock_group(tx, &to_apply, &mut state).await {
        roll_back(open).await;
        return Round::Broken(e);
    }
    let mut answers = Vec::with_capacity(members.len());
    let mut emitted: Vec<NewEvent> = Vec::new();
    for (at, (&i, fresh)) in members.iter().zip(&fresh).enumerate() {
        if !fresh {
            answers.push(Ok(Executed::Duplicate));
            continue;
        }
        let (event, receive_count) = events[i];
        let mut cx = Context::new(tx, receive_count);
        cx.deadline = Some(tokio::time::Instant::now() + limits.event_timeout);
        cx.batch = std::mem::take(&mut state);
        let run = guarded(handler.handle(event, &mut cx), limits);
        let Ok(handled) = tokio::time::timeout(limits.event_timeout, run).await else {
            // A statement may still be running: close the connection rather than wait for it.
            drop(cx);
            drop(open);
            return Round::Failed {
                at,
                error: timed_out(limits.event_timeout),
            };
        };
        let mine = std::mem::take(&mut cx.emitted);
        state = std::mem::take(&mut cx.batch);
        drop(cx);
        if let Err(error) = handled {
            roll_back(open).await;
            return Round::Failed { at, error };
        }
        answers.push(Ok(Executed::Applied {
            emitted: mine.len(),
        }));
        emitted.extend(mine);
    }
    if let Err(e) = handler.finish(tx, state).await {
        roll_back(open).await;
        return Round::Broken(e);
    }
    if let Some(at) = members.iter().position(|&i| !(limits.wanted)(i)) {
        roll_back(open).await;
        return Round::Failed {
            at,
            error: HandlerError::retry(NOT_WANTED),
        };
    }
    match commit_with_outbox(open, &handler.source(), emitted, limits.handoff).await {
        Ok(()) => Round::Committed(answers),
        Err(e) => Round::Broken(e),
    }
}

/// How [`GroupCommit`] forms groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupConfig {
    /// Most events in one transaction (1: every event alone); a ceiling that the consumer's
    /// in-flight target scales down when they share counters.
    pub max_group: usize,
    /// Most transactions of this handler running at once.
    pub transactions: usize,
    /// A group running longer than this is abandoned (its connection closed, so PostgreSQL
    /// rolls it back) and each of its events answered with a retry.
    pub timeout: Duration,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            max_group: 32,
            transactions: 4,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Counters of a [`GroupCommit`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupStats {
    /// Events answered.
    pub events: u64,
    /// Groups formed.
    pub groups: u64,
    /// Database transactions opened (more than `groups` when groups fell apart).
    pub transactions: u64,
    /// Handler panics caught (in the consumer's counters, when it counts into them).
    pub panics: u64,
    /// Events in the largest group formed.
    pub largest: u64,
}

/// Forms groups of the events handed to [`Apply::apply`] and runs them with
/// [`execute_group`]. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    inner: Arc<Inner>,
}

struct Inner {
    handler: Arc<dyn AnyHandler>,
    pool: Pool,
    cfg: GroupConfig,
    state: Mutex<State>,
    events: AtomicU64,
    groups: AtomicU64,
    transactions: AtomicU64,
    largest: AtomicU64,
    /// Caught panics are counted here (the consumer's counters, in a worker).
    counters: Arc<Counters>,
    handoff: Option<Handoff>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Request>,
    running: usize,
    /// Order ids of the events in running groups. A queued event of one of these orders waits
    /// in the queue for its group to finish, rather than in PostgreSQL for the group's locks
    /// with a whole group of others behind it.
    busy: HashSet<String>,
}

struct Request {
    /// When the event joined the queue.
    queued: std::time::Instant,
    event: Arc<Envelope>,
    receive_count: u32,
    reply: oneshot::Sender<Result<Executed, HandlerError>>,
}

impl GroupCommit {
    pub fn new(handler: Arc<dyn AnyHandler>, pool: Pool, cfg: GroupConfig) -> Self {
        Self::counting_into(handler, pool, cfg, Arc::default())
    }

    /// [`GroupCommit::new`], counting caught handler panics, groups and their sizes in
    /// `counters` (those of the consumer that applies through it, so that they show in its
    /// metrics), and sizing groups from that consumer's in-flight target (see the module
    /// documentation). A panic while the group locks, claims or commits counts once for the
    /// group.
    pub fn counting_into(
        handler: Arc<dyn AnyHandler>,
        pool: Pool,
        cfg: GroupConfig,
        counters: Arc<Counters>,
    ) -> Self {
        GroupCommit {
            inner: Arc::new(Inner {
                handler,
                pool,
                cfg: GroupConfig {
                    max_group: cfg.max_group.max(1),
                    transactions: cfg.transactions.max(1),
                    timeout: cfg.timeout,
                },
                state: Mutex::new(State::default()),
                events: AtomicU64::new(0),
                groups: AtomicU64::new(0),
                transactions: AtomicU64::new(0),
                largest: AtomicU64::new(0),
                counters,
                handoff: None,
            }),
        }
    }

    /// Publishes what its groups commit through `handoff` (see
    /// [`crate::store::outbox::Handoff`]). Call before the first clone.
    pub fn handing_off(mut self, handoff: Option<Handoff>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("handing_off is called before GroupCommit is cloned")
            .handoff = handoff;
        self
    }

    /// Events waiting for a free transaction.
    pub fn queued(&self) -> usize {
        self.inner.lock().queue.len()
    }

    pub fn stats(&self) -> GroupStats {
        GroupStats {
            events: self.inner.events.load(Relaxed),
            groups: self.inner.groups.load(Relaxed),
            transactions: self.inner.transactions.load(Relaxed),
            panics: self.inner.counters.panics.load(Relaxed),
            largest: self.inner.largest.load(Relaxed),
        }
    }
}

impl Inner {
    /// The largest group to form now: `max_group` scaled to the consumer's in-flight target
    /// when the consumer sharing these counters has one (see [`adapt::group_cap`]), else
    /// `max_group` itself.
    fn max_group(&self) -> usize {
        let target = self.counters.in_flight_target.load(Relaxed) as usize;
        let cap = if target == 0 {
            self.cfg.max_group
        } else {
            adapt::group_cap(target, self.cfg.transactions, self.cfg.max_group)
        };
        self.counters.group_cap.store(cap as u64, Relaxed);
        cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Releases the order ids of the group this runner finished, then takes the next group:
    /// the oldest waiting events, up to the group size, skipping events of orders another
    /// running group has. Retires this runner when nothing can run; whichever runner holds a
    /// skipped event's order takes it when its group is done.
    fn next_group(&self, finished: &mut Vec<String>) -> Option<Vec<Request>> {
        let mut state = self.lock();
        for id in finished.drain(..) {
            state.busy.remove(&id);
        }
        let max_group = self.max_group();
        let mut group = Vec::new();
        let mut rest = VecDeque::with_capacity(state.queue.len());
        let queue = std::mem::take(&mut state.queue);
        for r in queue {
            // Events whose consumer stopped waiting are not run: it will receive them again.
            if r.reply.is_closed() {
                continue;
            }
            let free = !r.event.order_id().is_some_and(|id| state.busy.contains(id));
            if free && group.len() < max_group {
                if let Some(id) = r.event.order_id() {
                    if !finished.iter().any(|f| f == id) {
                        finished.push(id.to_string());
                    }
                }
                group.push(r);
            } else {
                rest.push_back(r);
            }
        }
        state.queue = rest;
        if group.is_empty() {
            state.running -= 1;
            return None;
        }
        state.busy.extend(finished.iter().cloned());
        Some(group)
    }
}

/// A runner: runs groups until the queue is empty.
async fn run(inner: Arc<Inner>) {
    // The order ids of this runner's current group, released when it takes the next one.
    let mut orders = Vec::new();
    while let Some(group) = inner.next_group(&mut orders) {
        let started = std::time::Instant::now();
        let waited = group
            .first()
            .map(|r| started - r.queued)
            .unwrap_or_default();
        let (events, replies): (Vec<(Arc<Envelope>, u32)>, Vec<_>) = group
            .into_iter()
            .map(|r| ((r.event, r.receive_count), Some(r.reply)))
            .unzip();
        let n = events.len();
        let replies = Arc::new(Mutex::new(replies));
        let (handler, pool, event_timeout) =
            (inner.handler.clone(), inner.pool.clone(), inner.cfg.timeout);
        let waiting = replies.clone();
        let counters = inner.counters.clone();
        let handoff = inner.handoff.clone();
        // Its own task, so that nothing it does can take the runner down; aborting it drops
        // the open transaction, which closes the connection.
        let mut task = tokio::spawn(async move {
            let refs: Vec<(&Envelope, u32)> = events.iter().map(|(e, c)| (&**e, *c)).collect();
            let wanted = |i: usize| {
                let replies = waiting.lock().unwrap_or_else(|p| p.into_inner());
                replies[i].as_ref().is_some_and(|r| !r.is_closed())
            };
            let limits = Limits {
                event_timeout,
                wanted: &wanted,
                counters: Some(&counters),
                handoff: handoff.as_ref(),
            };
            execute_group_with(&*handler, &pool, &refs, &limits).await
        });
        // A backstop only: every event already has its own time limit.
        let backstop = inner.cfg.timeout * 2 + Duration::from_secs(5);
        let answers: Vec<Result<Executed, HandlerError>> =
            match tokio::time::timeout(backstop, &mut task).await {
                Ok(Ok(outcome)) => {
                    inner
                        .transactions
                        .fetch_add(u64::from(outcome.transactions), Relaxed);
                    outcome.results
                }
                Ok(Err(join)) => {
                    let why = if join.is_panic() {
                        Counters::inc(&inner.counters.panics);
                        format!("handler panicked: {}", panic_text(join))
                    } else {
                        format!("handler task failed: {join}")
                    };
                    (0..n)
                        .map(|_| Err(HandlerError::retry(why.clone())))
                        .collect()
                }
                Err(_) => {
                    task.abort();
                    (0..n).map(|_| Err(timed_out(backstop))).collect()
                }
            };
        tracing::debug!(
            handler = inner.handler.name(),
            events = n,
            oldest_waited_ms = waited.as_millis() as u64,
            took_ms = started.elapsed().as_millis() as u64,
            "group ran"
        );
        inner.groups.fetch_add(1, Relaxed);
        inner.events.fetch_add(n as u64, Relaxed);
        inner.largest.fetch_max(n as u64, Relaxed);
        inner.counters.groups.fetch_add(1, Relaxed);
        inner.counters.grouped_events.fetch_add(n as u64, Relaxed);
        let mut replies = replies.lock().unwrap_or_else(|p| p.into_inner());
        for (reply, answer) in replies.iter_mut().zip(answers) {
            if let Some(reply) = reply.take() {
                // The caller may have given up waiting (its own timeout); the answer is moot.
                let _ = reply.send(answer);
            }
        }
    }
}

#[async_trait::async_trait]
impl Apply for GroupCommit {
    fn name(&self) -> &str {
        self.inner.handler.name()
    }

    async fn apply(
        &self,
        event: &Arc<Envelope>,
        receive_count: u32,
    ) -> Result<Executed, HandlerError> {
        let (reply, answer) = oneshot::channel();
        let start_runner = {
            let mut state = self.inner.lock();
            state.queue.push_back(Request {
                queued: std::time::Instant::now(),
                event: Arc::clone(event),
                receive_count,
                reply,
            });
            let start = state.running < self.inner.cfg.transactions;
            if start {
                state.running += 1;
            }
            start
        };
        if start_runner {
            tokio::spawn(run(self.inner.clone()));
        }
        answer.await.unwrap_or_else(|_| {
            Err(HandlerError::retry(
                "the group-commit runner stopped before answering",
            ))
        })
    }
    async fn applied(&self, event: &Envelope) -> Option<bool> {
        super::committed(&self.inner.pool, self.inner.handler.name(), event).await
    }
}
