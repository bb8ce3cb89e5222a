//! The outbox: the events a handler emitted, written in its own transaction next to its inbox
//! row ([`crate::store::inbox`]) and its effects, and published afterwards.
//!
//! The [`Relay`] publishes them to EventBridge afterwards, at least once. Consumers recognise a
//! republished event by its `detail.event_id` (see [`crate::domain::envelope::Envelope::event_key`]).
//!
//! An event EventBridge will never accept (an entry over 256 KB, counted as EventBridge
//! counts it, or an entry refused with a code that blames the entry itself, see
//! [`entry_refused_for_good`]) is moved to `outbox_dead_letters` with the reason, by the same
//! transaction that deletes it from the outbox and under the row lock the relay holds, so it is
//! in exactly one table whatever happens; the relay goes on with the next rows at once. Its
//! count is the `OutboxDeadLetters` metric (alarmed), and `orderfleet status` and `orderfleet
//! report` show it. Retryable failures (throttling, internal errors, a whole call failing or
//! timing out) leave rows in the outbox, counted in `attempts`.
//!
//! Rivals and crashes: two relays never hold the same row (`SKIP LOCKED`). A crash before the
//! commit leaves the row in the outbox with its lock released: it is checked again, and moved
//! again, by whichever relay takes it next. A crash after PutEvents succeeded and before the
//! commit republishes the batch; consumers absorb it by `event_id`. PutEvents is bounded by
//! [`crate::infra::aws::CALL_TIMEOUT`]: a hung call would otherwise hold the rows' locks and the relay.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use aws_sdk_eventbridge::operation::put_events::PutEventsOutput;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::{Notify, Semaphore};
use tokio_postgres::Statement;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::domain::outcome::{error_chain, HandlerError};
use crate::store::db::{Cached, Tx};

/// An event a handler asks to publish once its transaction commits.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub detail_type: String,
    pub detail: Value,
}

/// Outbox rows ready to be written by one statement, each with a fresh `event_id` that is also
/// stamped into its detail. Built by [`OutboxRows::prepare`], which does any round trip first, so
/// that [`OutboxRows::write`] sends its statement the moment it is first polled and can be
/// pipelined with the `COMMIT` after it.
///
/// Rows written with a claim (see [`Handoff`]) are the committing task's to publish until the
/// claim runs out; relays leave them alone until then.
pub struct OutboxRows {
    statement: Statement,
    source: String,
    ids: Vec<Uuid>,
    detail_types: Vec<String>,
    details: Vec<Value>,
    claim: Option<Duration>,
}

/// Rows a committed transaction wrote under a claim, for its [`Handoff`] to publish.
pub struct Claimed {
    source: String,
    ids: Vec<Uuid>,
    detail_types: Vec<String>,
    details: Vec<Value>,
}

impl OutboxRows {
    /// `None` when there is nothing to write. With `claim`, the rows are written claimed for
    /// that long (see [`Handoff`]).
    pub async fn prepare(
        tx: &Tx,
        source: &str,
        events: Vec<NewEvent>,
        claim: Option<Duration>,
    ) -> Result<Option<Self>, HandlerError> {
        if events.is_empty() {
            return Ok(None);
        }
        // The claim runs from the insert, which is sent with the COMMIT: a transaction that
        // waited long for locks does not eat into its hand-off's time.
        let statement = tx
            .prepare_cached(
                "INSERT INTO outbox (event_id, source, detail_type, detail, claimed_until)
                 SELECT id, $1, detail_type, detail,
                        clock_timestamp() + $5::float8 * interval '1 second'
                   FROM unnest($2::uuid[], $3::text[], $4::jsonb[]) AS e(id, detail_type, detail)",
            )
            .await
            .map_err(|e| HandlerError::from_db("preparing the outbox insert", &e))?;
        let mut rows = OutboxRows {
            statement,
            source: source.to_string(),
            ids: Vec::with_capacity(events.len()),
            detail_types: Vec::with_capacity(events.len()),
            details: Vec::with_capacity(events.len()),
            claim,
        };
        for ev in events {
            let id = Uuid::new_v4();
            let mut detail = ev.detail;
            if let Value::Object(map) = &mut detail {
                map.insert("event_id".into(), Value::String(id.to_string()));
            }
            rows.ids.push(id);
            rows.detail_types.push(ev.detail_type);
            rows.details.push(detail);
        }
        Ok(Some(rows))
    }

    /// Writes the rows in one statement.
    pub async fn write(&self, tx: &Tx) -> Result<(), HandlerError> {
        let claim = self.claim.map(|c| c.as_secs_f64());
        tx.execute(
            &self.statement,
            &[
                &self.source,
                &self.ids,
                &self.detail_types,
                &self.details,
                &claim,
            ],
        )
        .await
        .map_err(|e| HandlerError::from_db("writing the outbox", &e))?;
        Ok(())
    }

    /// The rows, if they were written claimed; call once their transaction committed.
    pub fn into_claimed(self) -> Option<Claimed> {
        self.claim.map(|_| Claimed {
            source: self.source,
            ids: self.ids,
            detail_types: self.detail_types,
            details: self.details,
        })
    }
}

/// PutEvents' limit on the total size of one request's entries, and so on one entry.
const MAX_PUT_EVENTS_BYTES: usize = 256 * 1024;

/// An entry's size as EventBridge counts it: source, detail-type and detail in UTF-8 bytes
/// (plus 14 bytes for `Time` and each resource's bytes, neither of which the relay sends).
fn event_size(source: &str, detail_type: &str, detail: &str) -> usize {
    source.len() + detail_type.len() + detail.len()
}

/// Whether a PutEvents entry refused with `code` will be refused again whatever we do: the
/// entry itself is wrong. Everything else (throttling, internal failures, and codes about the
/// bus, permissions or keys, which an operator can fix) is retried. An unknown code is
/// retried: a wrong guess there costs delay, while a wrong guess the other way loses nothing
/// either (the row is kept) but needs a person.
pub fn entry_refused_for_good(code: &str) -> bool {
    matches!(
        code,
        "ValidationException" | "MalformedDetail" | "InvalidArgument" | "InvalidArgumentException"
    )
}

/// Publishes outbox rows to the bus with PutEvents, 10 per call (the API's limit).
#[derive(Clone)]
pub struct Relay {
    pool: Pool,
    events: aws_sdk_eventbridge::Client,
    bus_name: String,
    /// The sources whose rows this relay publishes: those of the handlers in its process, the
    /// only ones its IAM role may put on the bus (`events:source`).
    sources: Vec<String>,
    wake: Arc<Notify>,
    call_timeout: Duration,
    /// Whether this process's [`Handoff`] publishes on commit: off after a hand-off failed,
    /// on again once a relay pass published (see [`Handoff::claim`]).
    direct: Arc<AtomicBool>,
}

/// What one relay pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayPass {
    pub published: usize,
    pub failed: usize,
    /// Rows EventBridge will never accept, moved to `outbox_dead_letters`.
    pub dead_lettered: usize,
    /// The pass took as many rows as a pass may: more are probably waiting.
    pub full: bool,
}

/// Rows one relay pass takes at most: ten PutEvents calls.
pub const RELAY_PASS_ROWS: usize = 100;
/// PutEvents' limit on the entries of one call.
const PUT_EVENTS_MAX_ENTRIES: usize = 10;

/// One PutEvents call: its rows' keys (outbox ids for the relay, event ids for a hand-off),
/// its entries and their size.
struct Call<K> {
    ids: Vec<K>,
    entries: Vec<PutEventsRequestEntry>,
    bytes: usize,
}

/// An event too big for EventBridge ever to accept, and why.
struct TooBig<K> {
    id: K,
    detail_type: String,
    reason: String,
}

/// Cuts `rows` (key, source, detail-type, detail) into PutEvents calls within the API's limits:
/// 10 entries and 256 KB per call. A row over the limit alone can never be sent: it comes back
/// apart, with the reason.
fn cut_into_calls<K>(
    bus_name: &str,
    rows: impl IntoIterator<Item = (K, String, String, String)>,
) -> (Vec<Call<K>>, Vec<TooBig<K>>) {
    let mut calls: Vec<Call<K>> = Vec::new();
    let mut too_big = Vec::new();
    for (id, source, detail_type, detail) in rows {
        let entry = event_size(&source, &detail_type, &detail);
        if entry > MAX_PUT_EVENTS_BYTES {
            let reason = format!(
                "the entry is {entry} bytes; EventBridge accepts at most {MAX_PUT_EVENTS_BYTES}"
            );
            too_big.push(TooBig {
                id,
                detail_type,
                reason,
            });
            continue;
        }
        let fits = calls.last().is_some_and(|c| {
            c.ids.len() < PUT_EVENTS_MAX_ENTRIES && c.bytes + entry <= MAX_PUT_EVENTS_BYTES
        });
        if !fits {
            calls.push(Call {
                ids: Vec::new(),
                entries: Vec::new(),
                bytes: 0,
            });
        }
        let call = calls.last_mut().expect("a call was just pushed");
        call.bytes += entry;
        call.ids.push(id);
        call.entries.push(
            PutEventsRequestEntry::builder()
                .event_bus_name(bus_name)
                .source(source)
                .detail_type(detail_type)
                .detail(detail)
                .build(),
        );
    }
    (calls, too_big)
}

/// Sends `calls` one after another, each bounded by `timeout` (a hung call would hold its rows)
/// and all of them by `deadline`, if given: no call starts after it, and one under way is cut
/// off at it. After a whole-call failure (throttling, an outage, a timeout) the next call would
/// most likely fail too: the answers stop there, and the calls after it are left unsent.
async fn send_calls<K>(
    events: &aws_sdk_eventbridge::Client,
    timeout: Duration,
    deadline: Option<tokio::time::Instant>,
    calls: &mut [Call<K>],
) -> Vec<Result<PutEventsOutput, String>> {
    let mut answers = Vec::with_capacity(calls.len());
    for call in calls.iter_mut() {
        let timeout = match deadline {
            Some(at) => match at.checked_duration_since(tokio::time::Instant::now()) {
                Some(left) if !left.is_zero() => timeout.min(left),
                _ => break,
            },
            None => timeout,
        };
        let request = events
            .put_events()
            .set_entries(Some(std::mem::take(&mut call.entries)))
            .send();
        let answer = match tokio::time::timeout(timeout, request).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(error_chain(&e)),
            Err(_) => Err(format!("PutEvents timed out after {timeout:?}")),
        };
        let failed = answer.is_err();
        answers.push(answer);
        if failed {
            break;
        }
    }
    answers
}

/// What became of one entry of a call EventBridge answered.
enum Fate {
    Published,
    /// Refused with this error; `for_good` when it will always be (see
    /// [`entry_refused_for_good`]).
    Refused {
        error: String,
        for_good: bool,
    },
}

/// The fate of entry `i` of a call answered with `out`. Entries of the response line up with
/// the request; a missing one is treated as refused for now.
fn fate(out: &PutEventsOutput, i: usize) -> Fate {
    match out.entries().get(i) {
        Some(entry) if entry.error_code().is_none() => Fate::Published,
        Some(entry) => {
            let code = entry.error_code().unwrap_or_default();
            Fate::Refused {
                error: format!("{code}: {}", entry.error_message().unwrap_or_default()),
                for_good: entry_refused_for_good(code),
            }
        }
        None => Fate::Refused {
            error: "PutEvents answered without this entry".into(),
            for_good: false,
        },
    }
}

/// Moves outbox row `id` to `outbox_dead_letters` with `reason`, in the caller's transaction
/// (the one that holds the row's lock), so the row is in exactly one of the two tables.
async fn dead_letter(tx: &(impl Cached + Sync), id: i64, reason: &str) -> Result<()> {
    tx.execute_cached(
        "WITH moved AS (DELETE FROM outbox WHERE id = $1 RETURNING *)
         INSERT INTO outbox_dead_letters
                (id, event_id, source, detail_type, detail, created_at, attempts, reason)
         SELECT id, event_id, source, detail_type, detail, created_at, attempts + 1, $2
           FROM moved",
        &[&id, &reason],
    )
    .await
    .context("relay: moving a row to the outbox dead letters")?;
    Ok(())
}

impl Relay {
    /// A relay for the rows of `sources`.
    pub fn new(
        pool: Pool,
        events: aws_sdk_eventbridge::Client,
        bus_name: String,
        sources: Vec<String>,
    ) -> Self {
        Relay {
            pool,
            events,
            bus_name,
            sources,
            wake: Arc::new(Notify::new()),
            call_timeout: crate::infra::aws::CALL_TIMEOUT,
            direct: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The hand-off through which this process's committing tasks publish their own events
    /// (see [`Handoff`]); it shares this relay's wake-up and EventBridge client.
    pub fn handoff(&self) -> Handoff {
        self.handoff_claiming(CLAIM)
    }

    /// [`Relay::handoff`] with claims of `claim` instead of [`CLAIM`].
    pub fn handoff_claiming(&self, claim: Duration) -> Handoff {
        Handoff {
            inner: Arc::new(HandoffInner {
                pool: self.pool.clone(),
                events: self.events.clone(),
                call_timeout: self.call_timeout,
                bus_name: self.bus_name.clone(),
                claim,
                direct: self.direct.clone(),
                wake: self.wake.clone(),
                tasks: TaskTracker::new(),
                published: AtomicU64::new(0),
                handed_back: AtomicU64::new(0),
                to_delete: Default::default(),
                delete_scheduled: AtomicBool::new(false),
                in_flight: Arc::new(Semaphore::new(HANDOFFS_IN_FLIGHT)),
            }),
        }
    }

    /// A handle that wakes the relay at once; the runtime pokes it after a commit that wrote
    /// to the outbox, so events leave without waiting for the next poll.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Publishes up to [`RELAY_PASS_ROWS`] unpublished rows, in PutEvents calls of at most 10
    /// entries (the API's limit) and 256 KB, sent one after another. Rows are locked with `FOR UPDATE
    /// SKIP LOCKED`, so any number of relays can run at once without publishing a row twice in
    /// the normal case; a crash after PutEvents and before the commit republishes the pass,
    /// which consumers absorb. A row EventBridge will never accept is moved to
    /// `outbox_dead_letters` instead.
    ///
    /// One pass is one transaction: under a backlog, the reads, the delete and the commit are
    /// paid once per hundred events rather than once per ten. The calls are not sent side by
    /// side: in the fleet benchmark that raised each worker's peak RSS by 5 to 10 MB
    /// (docs/BENCHMARKS.md, "Memory").
    pub async fn publish_once(&self) -> Result<RelayPass> {
        let mut client = self.pool.get().await.context("relay: database pool")?;
        let tx = client.transaction().await?;
        // One query per source, each the first rows of the index on (source, attempts, id)
        // (migration 0020): a pass reads what it takes, not every unpublished row. Rows that
        // failed before sink behind fresh ones (`attempts`), so one event EventBridge keeps
        // refusing for a while cannot hold up everything after it.
        let mut rows = Vec::with_capacity(RELAY_PASS_ROWS);
        for source in &self.sources {
            let want = (RELAY_PASS_ROWS - rows.len()) as i64;
            if want == 0 {
                break;
            }
            rows.extend(
                tx.query_cached(
                    "SELECT id, event_id, source, detail_type, detail FROM outbox
                     WHERE published_at IS NULL AND source = $1
                       AND (claimed_until IS NULL OR claimed_until < now())
                     ORDER BY attempts, id LIMIT $2 FOR UPDATE SKIP LOCKED",
                    &[source, &want],
                )
                .await
                .context("relay: reading the outbox")?,
            );
        }
        let mut pass = RelayPass {
            full: rows.len() == RELAY_PASS_ROWS,
            ..RelayPass::default()
        };
        if rows.is_empty() {
            return Ok(pass);
        }
        // PutEvents refuses a request over 256 KB or over 10 entries: the rows are cut into
        // calls that fit. A row that alone is over the limit can never be sent: it goes to the
        // dead letters at once.
        let (mut calls, too_big) = cut_into_calls(
            &self.bus_name,
            rows.iter().map(|row| {
                let detail = row.get::<_, Value>(4).to_string();
                (row.get::<_, i64>(0), row.get(2), row.get(3), detail)
            }),
        );
        for row in too_big {
            tracing::error!(
                outbox_id = row.id,
                detail_type = row.detail_type,
                reason = row.reason,
                "relay: event too big for EventBridge; moved to the outbox dead letters"
            );
            dead_letter(&tx, row.id, &row.reason).await?;
            pass.dead_lettered += 1;
        }
        let answers = send_calls(&self.events, self.call_timeout, None, &mut calls).await;
        let mut published = Vec::new();
        let mut call_failed = None;
        for (call, answer) in calls.iter().zip(answers) {
            let out = match answer {
                Ok(out) => out,
                // A whole-call failure (throttling, network, timeout) says nothing about the
                // entries: they stay, and are retried.
                Err(err) => {
                    tx.execute_cached(
                        "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1)",
                        &[&call.ids, &err],
                    )
                    .await?;
                    call_failed = Some(err);
                    continue;
                }
            };
            // An entry with an error code failed on its own: for good (dead letters) or for
            // now (stays in the outbox for the next pass).
            for (i, id) in call.ids.iter().enumerate() {
                match fate(&out, i) {
                    Fate::Published => published.push(*id),
                    Fate::Refused {
                        error,
                        for_good: true,
                    } => {
                        tracing::error!(outbox_id = id, error = %error, "relay: EventBridge refused an event for good; moved to the outbox dead letters");
                        dead_letter(&tx, *id, &error).await?;
                        pass.dead_lettered += 1;
                    }
                    Fate::Refused { error, .. } => {
                        pass.failed += 1;
                        tx.execute_cached(
                            "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1",
                            &[id, &error],
                        )
                        .await?;
                    }
                }
            }
        }
        // A published row has done its job (the lake archives every event): deleting it keeps
        // the outbox as small as its backlog, and costs less than updating a JSONB row.
        if !published.is_empty() {
            tx.execute_cached("DELETE FROM outbox WHERE id = ANY($1)", &[&published])
                .await?;
        }
        tx.commit()
            .await
            .context("relay: removing published rows")?;
        pass.published = published.len();
        if pass.published > 0 && call_failed.is_none() {
            // EventBridge takes events again: committing tasks may publish their own again.
            self.direct.store(true, Relaxed);
        }
        if let Some(err) = call_failed {
            anyhow::bail!(
                "relay: PutEvents failed: {err} ({} of this pass's events published)",
                pass.published
            );
        }
        Ok(pass)
    }

    /// Runs until `stop`: publishes while there is work, then waits for a wake-up or the
    /// poll interval (other processes write to the outbox too). Errors back off, up to 5 s.
    pub async fn run(self, stop: CancellationToken, poll: Duration) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if stop.is_cancelled() {
                return;
            }
            let started = tokio::time::Instant::now();
            let result = self.publish_once().await;
            if let Ok(pass) = &result {
                if pass.published > 0 {
                    tracing::debug!(
                        published = pass.published,
                        took_ms = started.elapsed().as_millis() as u64,
                        "relay pass"
                    );
                }
            }
            match result {
                // A full pass, or one that only moved rows aside, leaves more to do at once.
                Ok(pass) if pass.failed == 0 && (pass.full || pass.dead_lettered > 0) => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(pass) => {
                    if pass.failed > 0 {
                        tracing::warn!(failed = pass.failed, "relay: entries failed; retrying");
                        sleep_or_stop(&stop, backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(poll) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "relay: pass failed; backing off");
                    sleep_or_stop(&stop, backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Publishes until the outbox is empty or `deadline` passes (used at shutdown).
    pub async fn drain(&self, deadline: Duration) -> Result<usize> {
        let until = tokio::time::Instant::now() + deadline;
        let mut total = 0;
        while tokio::time::Instant::now() < until {
            let pass = self.publish_once().await?;
            total += pass.published;
            if pass.published + pass.failed + pass.dead_lettered == 0 {
                break;
            }
        }
        Ok(total)
    }
}

/// How long a committing task's claim on the rows it wrote lasts: three PutEvents timeouts, so
/// that a live hand-off finishes (or hands its rows back) well inside it. Past it, any relay
/// publishes the rows: that is how the events of a process that died between its commit and
/// its hand-off still leave.
pub const CLAIM: Duration = Duration::from_secs(30);

/// Hand-offs of one process that call EventBridge at once. While that many are under way,
/// commits write their rows for the relay instead; a hand-off that finds none free waits for
/// one within its time.
pub const HANDOFFS_IN_FLIGHT: usize = 16;

/// How long published rows wait to be deleted together (see [`Handoff::delete_soon`]).
pub const DELETE_LINGER: Duration = Duration::from_millis(50);

/// Publishing on commit: the task that committed a handler's events publishes them itself,
/// straight after its commit, instead of waking the relay to find them again.
///
/// The rows are written *claimed* ([`OutboxRows::prepare`] with [`Handoff::claim`]):
/// `claimed_until` is set, and relays pass over them until it is past. After the commit the
/// hand-off sends them with PutEvents (the same calls, limits and timeout as a relay pass),
/// then queues what EventBridge took for deletion: one statement deletes what every hand-off
/// of the process published within [`DELETE_LINGER`]. The relay pass it replaces read the rows back under a
/// lock in a transaction of its own, one pass at a time per process; a hand-off needs no read,
/// no transaction and no turn.
///
/// Rivals, crashes and failures:
/// - A relay (in this process or another) never takes a claimed row while the claim holds, so
///   a live hand-off and a relay do not both send it. A hand-off sends nothing after half its
///   claim ([`CLAIM`]) has passed, and cuts off a call still out then: what it has not
///   published by then it hands back, so its sends end before any relay may start.
/// - A process that dies after its commit and before its hand-off finished leaves its rows
///   claimed: once the claim runs out, a relay of their source publishes them (the handler's
///   own worker after its restart, or another worker running that handler). The events are
///   late, not lost. So are those of a hand-off still running when a stop's second for them
///   ran out, and those of a commit whose task was cut off after the `COMMIT` had reached the
///   server (a handler timeout).
/// - A death after PutEvents and before the delete publishes them again then; consumers absorb
///   the copy by `event_id`, as they do a relay's.
/// - Anything a hand-off could not publish (a whole call failing or cut off, an entry refused,
///   an entry too big for EventBridge) it hands back: the claim is cleared, `attempts` and
///   `last_error` are set, and the relay is woken to retry or dead-letter it under its usual
///   rules. After a whole call failed, this process stops claiming (its rows go to the relay,
///   which backs off) until a relay pass publishes again without a call failing.
/// - At most [`HANDOFFS_IN_FLIGHT`] hand-offs of a process call EventBridge at once; commits
///   made while all are busy write their rows for the relay.
/// - If the database refuses the hand-back, the rows keep their claim and the relay takes them
///   when it runs out, as after a crash. A refused delete is retried every second; rows whose
///   claim runs out first are sent again by a relay, and absorbed.
/// - During a rolling deploy from a release without claims, the old relays do not know them
///   and may send a row a hand-off is sending: a duplicate, absorbed like any other.
#[derive(Clone)]
pub struct Handoff {
    inner: Arc<HandoffInner>,
}

struct HandoffInner {
    pool: Pool,
    events: aws_sdk_eventbridge::Client,
    call_timeout: Duration,
    bus_name: String,
    claim: Duration,
    direct: Arc<AtomicBool>,
    wake: Arc<Notify>,
    tasks: TaskTracker,
    published: AtomicU64,
    handed_back: AtomicU64,
    /// Published rows waiting for [`Handoff::delete_published`].
    to_delete: std::sync::Mutex<Vec<Uuid>>,
    delete_scheduled: AtomicBool,
    /// Hand-offs calling EventBridge now, at most [`HANDOFFS_IN_FLIGHT`].
    in_flight: Arc<Semaphore>,
}

/// What one hand-off did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HandedOff {
    pub published: usize,
    /// Rows given back to the relay, unpublished.
    pub handed_back: usize,
}

impl Handoff {
    /// How long to claim the rows about to be written, or `None` to write them for the relay:
    /// after a PutEvents call of a hand-off failed (until a relay pass publishes again), and
    /// while [`HANDOFFS_IN_FLIGHT`] hand-offs are under way.
    pub fn claim(&self) -> Option<Duration> {
        (self.inner.direct.load(Relaxed) && self.inner.in_flight.available_permits() > 0)
            .then_some(self.inner.claim)
    }

    /// After the commit of rows written with [`OutboxRows::prepare`]: publishes them in a task
    /// of its own if they were claimed, and otherwise wakes the relay for them.
    pub fn committed(&self, rows: OutboxRows) {
        match rows.into_claimed() {
            Some(claimed) => {
                let this = self.clone();
                self.inner.tasks.spawn(async move {
                    this.publish(claimed).await;
                });
            }
            None => self.inner.wake.notify_one(),
        }
    }

    /// Publishes `rows`, deletes what EventBridge took and hands the rest back to the relay.
    pub async fn publish(&self, rows: Claimed) -> HandedOff {
        let inner = &*self.inner;
        let started = tokio::time::Instant::now();
        let Claimed {
            source,
            ids,
            detail_types,
            details,
        } = rows;
        let (mut calls, too_big) = cut_into_calls(
            &inner.bus_name,
            ids.into_iter()
                .zip(detail_types)
                .zip(details)
                .map(|((id, detail_type), detail)| {
                    (id, source.clone(), detail_type, detail.to_string())
                }),
        );
        let mut back: Vec<(Uuid, String)> = too_big.into_iter().map(|t| (t.id, t.reason)).collect();
        // Everything is sent, or given back, well before the claim runs out: past it a relay
        // would send the same rows. Half the claim leaves the other half for the hand-back's
        // wait for a connection.
        let deadline = started + inner.claim / 2;
        // At most HANDOFFS_IN_FLIGHT hand-offs call EventBridge at once in a process.
        let permit = tokio::time::timeout_at(deadline, inner.in_flight.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok);
        let answers = match permit {
            Some(permit) => {
                let answers = send_calls(
                    &inner.events,
                    inner.call_timeout,
                    Some(deadline),
                    &mut calls,
                )
                .await;
                drop(permit);
                answers
            }
            None => Vec::new(),
        };
        let mut failed = false;
        let mut published = Vec::new();
        let mut answers = answers.into_iter();
        for call in &calls {
            match answers.next() {
                Some(Ok(out)) => {
                    for (i, id) in call.ids.iter().enumerate() {
                        match fate(&out, i) {
                            Fate::Published => published.push(*id),
                            Fate::Refused { error, .. } => back.push((*id, error)),
                        }
                    }
                }
                Some(Err(error)) => {
                    failed = true;
                    back.extend(call.ids.iter().map(|id| (*id, error.clone())));
                }
                None => {
                    failed = true;
                    back.extend(call.ids.iter().map(|id| {
                        let why = "not sent: an earlier call of its hand-off failed, or the \
                                   hand-off ran out of time";
                        (*id, why.to_string())
                    }))
                }
            }
        }
        if failed {
            inner.direct.store(false, Relaxed);
        }
        let done = HandedOff {
            published: published.len(),
            handed_back: back.len(),
        };
        if let Err(e) = self.hand_back(&back).await {
            tracing::warn!(
                error = %format!("{e:#}"),
                handed_back = done.handed_back,
                "hand-off: could not give rows back to the relay; they wait for their claim to run out"
            );
        }
        self.delete_soon(published);
        inner.published.fetch_add(done.published as u64, Relaxed);
        inner
            .handed_back
            .fetch_add(done.handed_back as u64, Relaxed);
        if !back.is_empty() {
            tracing::warn!(
                handed_back = done.handed_back,
                published = done.published,
                first_error = back[0].1.as_str(),
                "hand-off: events not published on commit; the relay takes them"
            );
            inner.wake.notify_one();
        } else {
            tracing::debug!(
                published = done.published,
                took_ms = started.elapsed().as_millis() as u64,
                "published on commit"
            );
        }
        done
    }

    /// Clears the claim of rows this hand-off could not publish and counts the attempt, so
    /// that the relay takes them under its rules.
    async fn hand_back(&self, back: &[(Uuid, String)]) -> Result<()> {
        if back.is_empty() {
            return Ok(());
        }
        let (ids, errors): (Vec<Uuid>, Vec<&str>) =
            back.iter().map(|(id, e)| (*id, e.as_str())).unzip();
        let client = self.client().await?;
        client
            .execute_cached(
                "UPDATE outbox o
                    SET claimed_until = NULL, attempts = o.attempts + 1, last_error = b.error
                   FROM unnest($1::uuid[], $2::text[]) AS b(event_id, error)
                  WHERE o.event_id = b.event_id",
                &[&ids, &errors],
            )
            .await
            .context("hand-off: giving rows back to the relay")?;
        Ok(())
    }

    /// Queues published rows for deletion. The deletes of all hand-offs within
    /// [`DELETE_LINGER`] go in one statement: one connection and one statement per linger
    /// rather than per commit. Until then the rows stay claimed, so no relay sends them; a
    /// process that dies meanwhile has them sent again once the claim runs out.
    fn delete_soon(&self, ids: Vec<Uuid>) {
        if ids.is_empty() {
            return;
        }
        self.inner
            .to_delete
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids);
        self.schedule_delete(DELETE_LINGER);
    }

    /// Runs [`Handoff::delete_published`] after `after`, unless a run is already scheduled.
    fn schedule_delete(&self, after: Duration) {
        if !self.inner.delete_scheduled.swap(true, Relaxed) {
            let this = self.clone();
            self.inner.tasks.spawn(async move {
                tokio::time::sleep(after).await;
                this.delete_published().await;
            });
        }
    }

    /// Deletes the rows queued by [`Handoff::delete_soon`]. If the database refuses, they go
    /// back in the queue and the delete is tried again a second later (until the stop; rows
    /// still queued then are sent again by a relay once their claim runs out).
    async fn delete_published(&self) {
        // Cleared before the queue is taken: rows queued from here on schedule a delete of
        // their own.
        self.inner.delete_scheduled.store(false, Relaxed);
        let ids = std::mem::take(
            &mut *self
                .inner
                .to_delete
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if ids.is_empty() {
            return;
        }
        let deleted = async {
            let client = self.client().await?;
            client
                .execute_cached("DELETE FROM outbox WHERE event_id = ANY($1)", &[&ids])
                .await
                .context("hand-off: removing published rows")
        };
        if let Err(e) = deleted.await {
            tracing::warn!(
                error = %format!("{e:#}"),
                rows = ids.len(),
                "hand-off: published rows not deleted yet; retrying in a second"
            );
            self.inner
                .to_delete
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(ids);
            self.schedule_delete(Duration::from_secs(1));
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.inner
            .pool
            .get()
            .await
            .context("hand-off: database pool")
    }

    /// Events published on commit, and events handed back, since this hand-off began.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.inner.published.load(Relaxed),
            self.inner.handed_back.load(Relaxed),
        )
    }

    /// At a stop: waits up to `deadline` for the hand-offs in flight and the deletes they
    /// queued. One still running after it leaves its rows to the relay once their claim runs
    /// out.
    pub async fn finish(&self, deadline: Duration) {
        self.inner.tasks.close();
        if tokio::time::timeout(deadline, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.inner.tasks.len(),
                "hand-offs still running at the stop; their events leave once their claim runs out"
            );
        }
    }
}

async fn sleep_or_stop(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_entry_errors_that_blame_the_entry_are_dead_lettered() {
        for code in ["ValidationException", "MalformedDetail", "InvalidArgument"] {
            assert!(entry_refused_for_good(code), "{code}");
        }
        for code in [
            "ThrottlingException",
            "InternalFailure",
            "InternalException",
            "AccessDeniedException",
            "NotAuthorizedForSourceException",
            "ResourceNotFoundException",
            "SomethingNew",
        ] {
            assert!(!entry_refused_for_good(code), "{code}");
        }
    }

    #[test]
    fn an_entry_is_measured_in_utf8_bytes_of_source_detail_type_and_detail() {
        assert_eq!(event_size("ab", "cd", r#"{"x":"é"}"#), 2 + 2 + 10);
    }
}
