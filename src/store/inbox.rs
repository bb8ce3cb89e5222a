//! The inbox: the `processed_messages` table, and everything that reads or writes it.
//!
//! A row is keyed by (handler, event key, detail-type) and inserted in the handler's own
//! transaction: a redelivered event finds its row and is acknowledged with no effect. The
//! detail-type is part of the key because producers reuse ids across detail-types (a storefront
//! may send the order id as the `event_id` of both the order and its cancellation): keyed by id
//! alone, the cancellation would be dropped as a duplicate.
//!
//! A rival process claiming the same event blocks on the primary key until the first
//! transaction ends, then finds the row (a duplicate) or, if the first rolled back, claims it
//! itself. A crash before the commit leaves neither the row nor the effects, so the redelivery
//! applies the event; a crash after it leaves both, so the redelivery is a duplicate.
//!
//! Rows would grow forever (about a dozen per order across the fleet), and with them the
//! table, its index and every claim's index descent. [`InboxRetention`] deletes rows older than
//! the retention (default 30 days), in short batches so that no delete holds locks or bloats
//! WAL for long. Workers that prune at the same time skip each other's rows. The rule that keeps
//! a late event from being applied twice once its row is gone is the runtime's
//! ([`crate::runtime::retention`]).
//!
//! Each pass walks forward in time: a batch starts at the newest row the previous batch
//! deleted, so the BRIN index (migration 0009) skips the block ranges already emptied instead of
//! every batch scanning past the dead rows of the ones before. When the walk runs out, the pass
//! sweeps once more from the start for rows it passed over (stored out of time order); a row
//! another pruner had locked is left to it, or to the next pass.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use tokio_util::sync::CancellationToken;

use crate::domain::outcome::HandlerError;
use crate::store::db::{Cached, Tx};

/// Records that `handler` processed the event `key` of `detail_type`, about `order_id` if it
/// names one (migration 0018: `order show` reads it). Returns false when it
/// already had: the caller must then apply nothing. A concurrent duplicate blocks on the
/// primary key until the first transaction ends, so two deliveries can never both apply.
pub async fn claim(
    tx: &Tx,
    handler: &str,
    key: &str,
    detail_type: &str,
    order_id: Option<&str>,
) -> Result<bool, HandlerError> {
    let n = tx
        .execute_cached(
            "INSERT INTO processed_messages (handler, event_key, detail_type, order_id)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&handler, &key, &detail_type, &order_id],
        )
        .await
        .map_err(|e| HandlerError::from_db("recording the processed message", &e))?;
    Ok(n == 1)
}

/// Records every (key, detail-type) of `keys` and `detail_types` (about `order_ids`, one per
/// key) as processed by `handler`,
/// in key order (so that two groups claiming the same keys queue instead of deadlocking).
/// Returns the pairs that were new.
pub async fn claim_all(
    tx: &Tx,
    handler: &str,
    keys: &[&str],
    detail_types: &[&str],
    order_ids: &[Option<&str>],
) -> Result<HashSet<(String, String)>, HandlerError> {
    let rows = tx
        .query_cached(
            "INSERT INTO processed_messages (handler, event_key, detail_type, order_id)
             SELECT $1, k, t, o FROM unnest($2::text[], $3::text[], $4::text[]) AS m(k, t, o)
              ORDER BY k, t
             ON CONFLICT DO NOTHING
             RETURNING event_key, detail_type",
            &[&handler, &keys, &detail_types, &order_ids],
        )
        .await
        .map_err(|e| HandlerError::from_db("recording the processed messages", &e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// How many of `event_keys` `handler` has processed.
pub async fn count_processed(
    db: &impl GenericClient,
    handler: &str,
    event_keys: &[String],
) -> Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM processed_messages WHERE handler = $1 AND event_key = ANY($2)",
            &[&handler, &event_keys],
        )
        .await
        .with_context(|| format!("reading the {handler} inbox"))?
        .get(0))
}

/// Events each handler applied in the last `window`, from the inbox rows' `processed_at` (the
/// start of the transaction that applied them; duplicates add no row, so they are not counted).
/// The BRIN index on `processed_at` (migration 0009) keeps this cheap on a large inbox.
pub async fn applied_within(
    db: &impl GenericClient,
    window: Duration,
) -> Result<BTreeMap<String, i64>> {
    let secs = window.as_secs_f64();
    Ok(db
        .query(
            "SELECT handler, count(*) FROM processed_messages
              WHERE processed_at > now() - make_interval(secs => $1)
              GROUP BY handler",
            &[&secs],
        )
        .await
        .context("counting recently applied events in processed_messages")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
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
