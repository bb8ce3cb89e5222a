//! Inbox retention: how long the runtime remembers that it applied an event.
//!
//! Every applied event leaves a row in `processed_messages`, which is what makes a second
//! delivery a duplicate (see [`crate::outbox`]). A copy of an event can arrive only while some
//! copy of it still exists upstream: SQS keeps a message at most 14 days (its
//! `MessageRetentionPeriod` ceiling), and a dead-letter queue counts from the original enqueue.
//! After that the row protects nothing and only makes the table, its index and every inbox
//! claim's index descent larger: about a dozen rows per order across the fleet.
//!
//! Each worker therefore deletes rows older than the retention (default 15 days, a day past
//! the SQS ceiling), in short batches so no delete holds locks or bloats WAL for long, once at
//! start and then every interval. Workers that prune at the same time skip each other's rows.
//! An EventBridge archive replayed further back than the retention is applied again: keep the
//! retention longer than any replay you would run.

use std::time::Duration;

use anyhow::{Context, Result};
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

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
        loop {
            let n = client
                .execute(
                    "DELETE FROM processed_messages
                      WHERE ctid = ANY(ARRAY(
                            SELECT ctid FROM processed_messages
                             WHERE processed_at < now() - make_interval(secs => $1)
                             LIMIT $2
                               FOR UPDATE SKIP LOCKED))",
                    &[&keep_secs, &self.batch],
                )
                .await
                .context("deleting old inbox rows")?;
            deleted += n;
            if n < self.batch as u64 || stop.is_cancelled() {
                return Ok(deleted);
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
