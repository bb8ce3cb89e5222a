//! Inbox retention: how long the runtime remembers that it applied an event.
//!
//! Every applied event leaves a row in `processed_messages`, which is what makes a second
//! delivery a duplicate (see [`crate::store::outbox`]). The rows would grow forever (about a dozen per
//! order across the fleet), and with them the table, its index and every inbox claim's index
//! descent. So each worker deletes rows older than the retention (default 30 days), in short
//! batches so no delete holds locks or bloats WAL for long, once at start and then every
//! interval. Workers that prune at the same time skip each other's rows.
//!
//! How long is long enough cannot be bounded by SQS alone: SQS keeps a message at most 14 days,
//! but dead-lettering, `orderfleet dlq redrive` and `dlq import` each send a *new* message with
//! a fresh clock, and an EventBridge archive can be replayed from any date. So the consumer
//! does not trust the upstream to be young: an event whose EventBridge `time` is older than the
//! retention less [`CLOCK_MARGIN`] ([`max_event_age`]) is dead-lettered unapplied, with a reason
//! that says why ([`too_old`]). An inbox row is written no earlier than its event's `time`, so
//! every event younger than that still finds its row if it was applied: a duplicate is never
//! applied twice, however late or however often it comes back. Every worker on one database
//! must use the same retention.
//!
//! Each pass walks forward in time: a batch starts at the newest row the previous batch
//! deleted, so the BRIN index skips the block ranges already emptied instead of every batch
//! scanning past the dead rows of the ones before. When the walk runs out, the pass sweeps once
//! more from the start for rows it passed over (stored out of time order); a row another
//! pruner had locked is left to it, or to the next pass.

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::domain::envelope::Envelope;

/// What separates the pruner's cutoff from the oldest event a consumer applies: room for the
/// clocks of EventBridge, the worker and PostgreSQL to disagree.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(3_600);

/// The oldest event a consumer may apply when inbox rows are kept for `keep`.
pub fn max_event_age(keep: Duration) -> Duration {
    keep.saturating_sub(CLOCK_MARGIN)
}

/// Why `event` may not be applied at `now`, if it is older than `max`: its inbox row, had it
/// been applied, may be gone, so a second application could not be told from a first.
pub fn too_old(event: &Envelope, max: Duration, now: DateTime<Utc>) -> Option<String> {
    let age = now.signed_duration_since(event.time).to_std().ok()?;
    (age > max).then(|| {
        format!(
            "event {} ({}) is from {}, {:.1} days ago; the inbox only remembers applied events \
             for {:.1} days (--inbox-retention-days less {} h), so whether this one was applied \
             cannot be told and it is not applied again. Check its order's state; to apply it \
             anyway, publish a fresh event",
            event.id,
            event.detail_type,
            event.time.to_rfc3339(),
            age.as_secs_f64() / 86_400.0,
            max.as_secs_f64() / 86_400.0,
            CLOCK_MARGIN.as_secs() / 3_600,
        )
    })
}

/// Rows deleted per statement.
pub const BATCH: i64 = 5_000;

/// Deletes `processed_messages` rows older than a retention.
#[derive(Clone)]
pub struct InboxRetention {
    pool: Pool,
    keep: Duration,
    batch: i64,
}

impl InboxRetention {
    /// Keeps rows younger than `keep`.
    pub fn new(pool: Pool, keep: Duration) -> Self {
        InboxRetention {
            pool,
            keep,
            batch: BATCH,
        }
    }

    /// Deletes at most `batch` rows per statement.
    pub fn with_batch(mut self, batch: i64) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Deletes every row older than the retention, batch by batch; returns how many it deleted.
    pub async fn prune(&self) -> Result<u64> {
        self.prune_until(&CancellationToken::new()).await
    }

    /// [`Self::prune`], stopping after the batch during which `stop` fires.
    async fn prune_until(&self, stop: &CancellationToken) -> Result<u64> {
        let client = self
            .pool
            .get()
            .await
            .context("connecting to prune the inbox")?;
        let keep_secs = self.keep.as_secs_f64();
        let mut deleted = 0;
        let mut from: DateTime<Utc> = DateTime::UNIX_EPOCH;
        loop {
            let row = client
                .query_one(
                    "WITH gone AS (
                         DELETE FROM processed_messages
                          WHERE ctid = ANY(ARRAY(
                                SELECT ctid FROM processed_messages
                                 WHERE processed_at < now() - make_interval(secs => $1)
                                   AND processed_at >= $3
                                 LIMIT $2
                                   FOR UPDATE SKIP LOCKED))
                         RETURNING processed_at)
                     SELECT count(*), max(processed_at) FROM gone",
                    &[&keep_secs, &self.batch, &from],
                )
                .await
                .with_context(|| {
                    format!("deleting old inbox rows ({deleted} deleted before this batch)")
                })?;
            let n: i64 = row.get(0);
            deleted += n as u64;
            if stop.is_cancelled() {
                return Ok(deleted);
            }
            if n < self.batch {
                if from == DateTime::UNIX_EPOCH {
                    return Ok(deleted);
                }
                // The walk ran out; one more sweep from the start for rows it passed over.
                from = DateTime::UNIX_EPOCH;
                continue;
            }
            if let Some(newest) = row.get::<_, Option<DateTime<Utc>>>(1) {
                from = newest;
            }
        }
    }

    /// Prunes now and then every `every` until `stop`. A failed pass is logged and tried again
    /// at the next tick: the rows wait, nothing is lost.
    pub async fn run(self, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => match self.prune_until(&stop).await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::info!(
                        deleted,
                        retention_days = self.keep.as_secs() / 86_400,
                        "pruned the inbox"
                    ),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "inbox pruning failed; trying again later"),
                },
            }
        }
    }
}
