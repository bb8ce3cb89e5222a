//! The S3 data lake: every event on the bus, archived through Kinesis Data Firehose, and read
//! back for `orderfleet lake stats` ([`reader`]).
//!
//! # Batching design
//!
//! The runtime hands a handler one event at a time, inside that event's database transaction,
//! while PutRecordBatch wants up to 500 records per call. So archiving is split in two, like the
//! event outbox:
//!
//! 1. The analytics handler ([`crate::handlers::analytics`]) turns the event into its lake
//!    record ([`record_for`]) and inserts it into `lake_outbox` ([`Records`]) in its own
//!    transaction, next to its inbox row. The SQS message is deleted only after that commit, so
//!    an event is either in `lake_outbox` or still on its queue: never lost. `event_key` is
//!    unique, so a redelivered event cannot add a second row (the inbox already stops it; the
//!    constraint is the belt to its braces).
//! 2. A [`LakeShipper`] in the worker process takes pending rows (`FOR UPDATE SKIP LOCKED`, so
//!    shippers in several processes never take the same row), packs them into one
//!    PutRecordBatch of at most [`MAX_BATCH_RECORDS`] records and [`MAX_BATCH_BYTES`] bytes,
//!    and, in the same transaction, marks shipped exactly the entries Firehose accepted. An
//!    entry with an `ErrorCode` stays pending with its error recorded, so the next call
//!    carries the failed records again and none of the accepted ones: none is dropped, and our
//!    own retries duplicate nothing.
//!
//! The guarantee is at least once. The one window for a duplicate is a crash (or a lost
//! connection) after Firehose accepted a batch and before the transaction that marks it
//! commits; the batch is then shipped again. Firehose itself is at least once as well. Each
//! record carries its EventBridge `id` and, for the fleet's own events, `detail.event_id`, so
//! readers can drop such copies: [`LakeStats`] counts distinct events and reports copies as
//! `duplicates`.
//!
//! # What happens if two processes, or a crash, land here
//!
//! - Two shippers (two worker processes): each takes rows with `FOR UPDATE SKIP LOCKED`, so a
//!   row is in at most one PutRecordBatch in flight; the rows stay locked for the call's
//!   duration, and the rival ships others or waits for the next pass.
//! - A crash before PutRecordBatch returns an answer we commit: the rows were never marked;
//!   the lock goes with the connection and the next pass ships them again. If Firehose had
//!   accepted them, the lake holds two copies of each (the at-least-once window above); readers
//!   drop them by event id.
//! - A partly failed batch is never a duplicate: only the accepted entries are marked.

//!
//! Reading the lake back, and the layout of its keys, is [`reader`].

pub mod reader;

pub use reader::{partition_day, read, resolve_bucket, Lake, LakeRecord, LakeStats};

use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use aws_sdk_firehose::primitives::Blob;
use aws_sdk_firehose::types::Record;
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::envelope::Envelope;
use crate::domain::outcome::{error_chain, HandlerError};
use crate::domain::redaction::Redactor;
use crate::store::db::{Cached, Tx};

/// Records per PutRecordBatch call: the API's limit.
pub const MAX_BATCH_RECORDS: usize = 500;
/// Bytes of record data per PutRecordBatch call: the API's limit of 4 MiB.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Bytes per record, before base64: the API's limit of 1,000 KiB.
pub const MAX_RECORD_BYTES: usize = 1000 * 1024;
/// Where the delivery stream puts events in the bucket (the fixed part of its prefix).
pub const EVENTS_PREFIX: &str = "events/";

/// The lake record of one event: the EventBridge envelope as one line of JSON, newline
/// terminated, so that the objects Firehose concatenates are newline-delimited JSON. Its
/// `detail` is what [`Redactor::redact`] leaves of it: no token, no direct identifier.
///
/// The envelope is re-serialised from its decoded form, which has every field EventBridge
/// sends (`version`, `id`, `detail-type`, `source`, `account`, `time`, `region`,
/// `resources`, `detail`); `detail` is kept as it arrived. Compact JSON escapes newlines inside
/// strings, so one record is always one line. A record over [`MAX_RECORD_BYTES`] can never be
/// accepted by Firehose: it is a permanent failure, and the event goes to the DLQ with that
/// reason. (EventBridge caps events at 256 KB, so this is a guard, not a path.)
pub fn record_for(event: &Envelope, redactor: &Redactor) -> Result<Vec<u8>, HandlerError> {
    let mut redacted = event.clone();
    redacted.detail = redactor.redact(&event.detail);
    let mut record = serde_json::to_vec(&redacted)
        .map_err(|e| HandlerError::permanent(format!("serialising the event for the lake: {e}")))?;
    record.push(b'\n');
    if record.len() > MAX_RECORD_BYTES {
        return Err(HandlerError::permanent(format!(
            "the event is {} bytes as a lake record; Firehose accepts at most {MAX_RECORD_BYTES}",
            record.len()
        )));
    }
    Ok(record)
}

/// The lake records of one transaction's events, written to `lake_outbox` in one statement
/// at its end ([`Records::write`]): a group of analytics events costs one insert, not one per
/// event. The conflict names no target so that widening the key to (event key, detail-type),
/// as the inbox's was in migration 0010, needs no change here; until then a storefront event
/// that reuses another event's id passes the inbox but finds that id's record here (or earlier
/// in the same statement) and is not archived a second time.
#[derive(Debug, Default)]
pub struct Records {
    keys: Vec<String>,
    detail_types: Vec<String>,
    records: Vec<Vec<u8>>,
}

impl Records {
    /// Adds `event`'s record, redacted by `redactor` (see [`record_for`]).
    pub fn add(&mut self, event: &Envelope, redactor: &Redactor) -> Result<(), HandlerError> {
        self.records.push(record_for(event, redactor)?);
        self.keys.push(event.event_key().to_string());
        self.detail_types.push(event.detail_type.clone());
        Ok(())
    }

    /// Inserts the records into `lake_outbox` in `tx`. Returns how many were new: a record
    /// whose event key is already there (a redelivery) is not added again.
    pub async fn write(self, tx: &Tx) -> Result<u64, HandlerError> {
        if self.records.is_empty() {
            return Ok(0);
        }
        tx.execute_cached(
            "INSERT INTO lake_outbox (event_key, detail_type, record)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])
             ON CONFLICT DO NOTHING",
            &[&self.keys, &self.detail_types, &self.records],
        )
        .await
        .map_err(|e| HandlerError::from_db("writing the lake outbox", &e))
    }
}

/// What one [`LakeShipper::ship_once`] pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShipPass {
    /// Records sent in the PutRecordBatch call (0: nothing was pending).
    pub sent: usize,
    /// Records Firehose accepted; now marked shipped.
    pub shipped: usize,
    /// Records that failed (their entry's ErrorCode, or the whole call); still pending.
    pub failed: usize,
    /// Whether pending records were left for another pass (the batch was full).
    pub more: bool,
}

/// Settings of a [`LakeShipper`].
#[derive(Debug, Clone)]
pub struct ShipperConfig {
    /// How long records wait to be batched when the shipper has caught up: the longest delay
    /// an event adds before it leaves for Firehose.
    pub flush_interval: Duration,
    /// First pause after a failed call; it doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// On stop, pending records are still shipped for this long.
    pub drain: Duration,
    /// Shipped rows are deleted from `lake_outbox` after this long.
    pub keep_shipped: Duration,
}

impl Default for ShipperConfig {
    fn default() -> Self {
        ShipperConfig {
            flush_interval: Duration::from_secs(1),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            drain: Duration::from_secs(5),
            keep_shipped: Duration::from_secs(24 * 3600),
        }
    }
}

/// Ships `lake_outbox` to the Firehose delivery stream (see the module header for the
/// guarantee). Run one per worker process that runs the analytics handler: [`LakeShipper::run`].
#[derive(Clone)]
pub struct LakeShipper {
    pool: Pool,
    firehose: aws_sdk_firehose::Client,
    stream: String,
    cfg: ShipperConfig,
}

impl LakeShipper {
    /// A shipper of `pool`'s `lake_outbox` to the delivery stream `stream`.
    pub fn new(
        pool: Pool,
        firehose: aws_sdk_firehose::Client,
        stream: impl Into<String>,
        cfg: ShipperConfig,
    ) -> Self {
        LakeShipper {
            pool,
            firehose,
            stream: stream.into(),
            cfg,
        }
    }

    /// The delivery stream it ships to.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Ships one batch: the oldest pending records, up to [`MAX_BATCH_RECORDS`] and
    /// [`MAX_BATCH_BYTES`], in one PutRecordBatch call. Accepted entries are marked shipped and
    /// failed ones stay pending, in one transaction. An error means the database failed;
    /// Firehose failures are counted in [`ShipPass::failed`] and recorded on the rows.
    pub async fn ship_once(&self) -> Result<ShipPass> {
        let mut client = self
            .pool
            .get()
            .await
            .context("lake shipper: database pool")?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT id, record FROM lake_outbox WHERE shipped_at IS NULL
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&(MAX_BATCH_RECORDS as i64)],
            )
            .await
            .context("lake shipper: reading lake_outbox")?;
        if rows.is_empty() {
            return Ok(ShipPass::default());
        }
        // The oldest rows that fit in one call. The first always fits: a record is at most
        // MAX_RECORD_BYTES (checked on the way in, and by the table's CHECK).
        let mut ids: Vec<i64> = Vec::with_capacity(rows.len());
        let mut records = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for row in &rows {
            let data: Vec<u8> = row.get(1);
            if !ids.is_empty() && bytes + data.len() > MAX_BATCH_BYTES {
                break;
            }
            bytes += data.len();
            ids.push(row.get(0));
            records.push(
                Record::builder()
                    .data(Blob::new(data))
                    .build()
                    .map_err(|e| anyhow!("building a Firehose record: {e}"))?,
            );
        }
        let more = ids.len() < rows.len() || rows.len() == MAX_BATCH_RECORDS;
        let sent = ids.len();

        let result = self
            .firehose
            .put_record_batch()
            .delivery_stream_name(&self.stream)
            .set_records(Some(records))
            .send()
            .await;
        let (shipped, failed) = match result {
            Ok(out) if out.request_responses().len() == sent => {
                let mut shipped: (Vec<i64>, Vec<String>) = (Vec::new(), Vec::new());
                let mut failed: (Vec<i64>, Vec<String>) = (Vec::new(), Vec::new());
                // Entries answer the records in order.
                for (id, entry) in ids.iter().zip(out.request_responses()) {
                    match entry.error_code() {
                        None => {
                            shipped.0.push(*id);
                            shipped
                                .1
                                .push(entry.record_id().unwrap_or_default().to_string());
                        }
                        Some(code) => {
                            failed.0.push(*id);
                            failed.1.push(format!(
                                "{code}: {}",
                                entry.error_message().unwrap_or_default()
                            ));
                        }
                    }
                }
                (shipped, failed)
            }
            Ok(out) => {
                // Cannot tell which entries succeeded: keep them all pending. Shipping them
                // again may duplicate the accepted ones, which readers absorb; losing them
                // would not be recoverable.
                let err = format!(
                    "PutRecordBatch answered {} entries for {sent} records",
                    out.request_responses().len()
                );
                (
                    (Vec::new(), Vec::new()),
                    (ids.clone(), vec![err; ids.len()]),
                )
            }
            Err(e) => {
                let err = format!("PutRecordBatch: {}", error_chain(&e));
                ((Vec::new(), Vec::new()), (ids.clone(), vec![err; sent]))
            }
        };
        if !shipped.0.is_empty() {
            tx.execute(
                "UPDATE lake_outbox o SET shipped_at = now(), firehose_record_id = s.record_id
                   FROM unnest($1::bigint[], $2::text[]) AS s(id, record_id)
                  WHERE o.id = s.id",
                &[&shipped.0, &shipped.1],
            )
            .await
            .context("lake shipper: marking records shipped")?;
        }
        if !failed.0.is_empty() {
            tx.execute(
                "UPDATE lake_outbox o SET attempts = attempts + 1, last_error = f.error
                   FROM unnest($1::bigint[], $2::text[]) AS f(id, error)
                  WHERE o.id = f.id",
                &[&failed.0, &failed.1],
            )
            .await
            .context("lake shipper: recording failed records")?;
            tracing::warn!(
                stream = %self.stream,
                sent,
                failed = failed.0.len(),
                error = %failed.1[0],
                "some lake records were not accepted; they stay pending and are retried"
            );
        }
        tx.commit()
            .await
            .context("lake shipper: committing the batch")?;
        tracing::debug!(stream = %self.stream, sent, shipped = shipped.0.len(), "lake batch shipped");
        Ok(ShipPass {
            sent,
            shipped: shipped.0.len(),
            failed: failed.0.len(),
            more,
        })
    }

    /// Ships until nothing is pending, a call fails, or `deadline` passes. Returns the records
    /// shipped.
    pub async fn drain(&self, deadline: Duration) -> Result<usize> {
        let until = Instant::now() + deadline;
        let mut total = 0;
        while Instant::now() < until {
            let pass = self.ship_once().await?;
            total += pass.shipped;
            if pass.sent == 0 || pass.failed > 0 {
                break;
            }
        }
        Ok(total)
    }

    /// Records not yet accepted by Firehose.
    pub async fn pending(&self) -> Result<i64> {
        let client = self
            .pool
            .get()
            .await
            .context("lake shipper: database pool")?;
        let row = client
            .query_one(
                "SELECT count(*) FROM lake_outbox WHERE shipped_at IS NULL",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Deletes rows shipped longer ago than `keep_shipped`, a bounded number at a time.
    async fn prune(&self) -> Result<u64> {
        let client = self
            .pool
            .get()
            .await
            .context("lake shipper: database pool")?;
        let keep_secs = self.cfg.keep_shipped.as_secs_f64();
        let n = client
            .execute(
                "DELETE FROM lake_outbox WHERE id IN (
                     SELECT id FROM lake_outbox
                      WHERE shipped_at < now() - make_interval(secs => $1)
                      LIMIT 10000)",
                &[&keep_secs],
            )
            .await?;
        Ok(n)
    }

    /// Ships until `stop` is cancelled, then drains for [`ShipperConfig::drain`]. Stop it
    /// after the consumers, so that what the last handlers committed still leaves; anything
    /// left is shipped by the next shipper to run, in this process or another.
    pub async fn run(self, stop: CancellationToken) {
        tracing::info!(stream = %self.stream, "lake shipper started");
        let mut backoff = self.cfg.min_backoff;
        let mut last_prune = Instant::now();
        loop {
            let pause = match self.ship_once().await {
                Ok(pass) if pass.failed == 0 && pass.more => {
                    // A full batch went out and more is waiting: go again at once.
                    backoff = self.cfg.min_backoff;
                    None
                }
                Ok(pass) if pass.failed == 0 => {
                    // Caught up: let the next batch gather.
                    backoff = self.cfg.min_backoff;
                    Some(self.cfg.flush_interval)
                }
                Ok(_) => Some(next_backoff(&mut backoff, self.cfg.max_backoff)),
                Err(e) => {
                    tracing::warn!(stream = %self.stream, error = %format!("{e:#}"), "lake shipper pass failed");
                    Some(next_backoff(&mut backoff, self.cfg.max_backoff))
                }
            };
            if let Some(pause) = pause {
                if last_prune.elapsed() > Duration::from_secs(60) {
                    last_prune = Instant::now();
                    if let Err(e) = self.prune().await {
                        tracing::warn!(error = %format!("{e:#}"), "pruning lake_outbox failed");
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            } else if stop.is_cancelled() {
                break;
            }
        }
        match self.drain(self.cfg.drain).await {
            Ok(n) => tracing::info!(stream = %self.stream, shipped = n, "lake shipper stopped"),
            Err(e) => tracing::warn!(
                stream = %self.stream,
                error = %format!("{e:#}"),
                "final lake drain failed; records stay in lake_outbox"
            ),
        }
    }
}

/// Returns the current backoff, with jitter, and doubles it up to `max`.
fn next_backoff(backoff: &mut Duration, max: Duration) -> Duration {
    let now = *backoff;
    *backoff = (*backoff * 2).min(max);
    // Jitter: shippers of several processes that failed together do not retry together.
    now.mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversize_event_is_a_permanent_failure() {
        let body = serde_json::json!({
            "version": "0", "id": "e-1", "detail-type": "OrderPlaced", "source": "s",
            "time": "2026-01-02T03:04:05Z", "account": "1", "region": "r", "resources": [],
            "detail": {"blob": "x".repeat(MAX_RECORD_BYTES)}
        });
        let env = Envelope::decode(&body.to_string()).unwrap();
        let err = record_for(&env, &Redactor::new(&[7u8; 32]).unwrap()).unwrap_err();
        assert_eq!(err.kind(), "permanent", "{err}");
    }

    #[test]
    fn a_record_is_one_line_of_the_envelope() {
        let body = r#"{"version":"0","id":"e-1","detail-type":"OrderPlaced","source":"s","account":"1","time":"2026-01-02T03:04:05Z","region":"r","resources":[],"detail":{"note":"two\nlines"}}"#;
        let env = Envelope::decode(body).unwrap();
        let record = record_for(&env, &Redactor::new(&[7u8; 32]).unwrap()).unwrap();
        assert_eq!(record.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(record.last(), Some(&b'\n'));
        let back: serde_json::Value = serde_json::from_slice(&record).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(body).unwrap()
        );
    }
}
