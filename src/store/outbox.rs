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

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_postgres::Statement;
use tokio_util::sync::CancellationToken;
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
pub struct OutboxRows {
    statement: Statement,
    source: String,
    ids: Vec<Uuid>,
    detail_types: Vec<String>,
    details: Vec<Value>,
}

impl OutboxRows {
    /// `None` when there is nothing to write.
    pub async fn prepare(
        tx: &Tx,
        source: &str,
        events: Vec<NewEvent>,
    ) -> Result<Option<Self>, HandlerError> {
        if events.is_empty() {
            return Ok(None);
        }
        let statement = tx
            .prepare_cached(
                "INSERT INTO outbox (event_id, source, detail_type, detail)
                 SELECT id, $1, detail_type, detail
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
        tx.execute(
            &self.statement,
            &[&self.source, &self.ids, &self.detail_types, &self.details],
        )
        .await
        .map_err(|e| HandlerError::from_db("writing the outbox", &e))?;
        Ok(())
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

/// One PutEvents call of a relay pass: its rows' ids, its entries and their size.
#[derive(Default)]
struct Call {
    ids: Vec<i64>,
    entries: Vec<PutEventsRequestEntry>,
    bytes: usize,
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
        let mut calls: Vec<Call> = Vec::new();
        for row in &rows {
            let id: i64 = row.get(0);
            let (source, detail_type): (String, String) = (row.get(2), row.get(3));
            let detail = row.get::<_, Value>(4).to_string();
            let entry = event_size(&source, &detail_type, &detail);
            if entry > MAX_PUT_EVENTS_BYTES {
                let reason = format!(
                    "the entry is {entry} bytes; EventBridge accepts at most {MAX_PUT_EVENTS_BYTES}"
                );
                tracing::error!(
                    outbox_id = id,
                    detail_type,
                    bytes = entry,
                    "relay: event too big for EventBridge; moved to the outbox dead letters"
                );
                dead_letter(&tx, id, &reason).await?;
                pass.dead_lettered += 1;
                continue;
            }
            let fits = calls.last().is_some_and(|c| {
                c.ids.len() < PUT_EVENTS_MAX_ENTRIES && c.bytes + entry <= MAX_PUT_EVENTS_BYTES
            });
            if !fits {
                calls.push(Call::default());
            }
            let call = calls.last_mut().expect("a call was just pushed");
            call.bytes += entry;
            call.ids.push(id);
            call.entries.push(
                PutEventsRequestEntry::builder()
                    .event_bus_name(&self.bus_name)
                    .source(source)
                    .detail_type(detail_type)
                    .detail(detail)
                    .build(),
            );
        }
        let mut answers = Vec::with_capacity(calls.len());
        for call in calls.iter_mut() {
            let request = self
                .events
                .put_events()
                .set_entries(Some(std::mem::take(&mut call.entries)))
                .send();
            // A hung call would hold the rows' locks and stop the relay.
            let answer = match tokio::time::timeout(self.call_timeout, request).await {
                Ok(Ok(out)) => Ok(out),
                Ok(Err(e)) => Err(error_chain(&e)),
                Err(_) => Err(format!("PutEvents timed out after {:?}", self.call_timeout)),
            };
            // After a whole-call failure (throttling, an outage) the next call would most
            // likely fail too: the rest of the pass is left, untried, for the next one.
            let failed = answer.is_err();
            answers.push(answer);
            if failed {
                break;
            }
        }
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
            // Entries of the response line up with the request; an entry with an error code
            // failed on its own: for good (dead letters) or for now (stays in the outbox for
            // the next pass).
            for (i, id) in call.ids.iter().enumerate() {
                match out.entries().get(i) {
                    Some(entry) if entry.error_code().is_none() => published.push(*id),
                    Some(entry) => {
                        let code = entry.error_code().unwrap_or_default();
                        let err = format!("{code}: {}", entry.error_message().unwrap_or_default());
                        if entry_refused_for_good(code) {
                            tracing::error!(outbox_id = id, code, error = %err, "relay: EventBridge refused an event for good; moved to the outbox dead letters");
                            dead_letter(&tx, *id, &err).await?;
                            pass.dead_lettered += 1;
                            continue;
                        }
                        pass.failed += 1;
                        tx.execute_cached(
                            "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1",
                            &[id, &err],
                        )
                        .await?;
                    }
                    None => pass.failed += 1,
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
