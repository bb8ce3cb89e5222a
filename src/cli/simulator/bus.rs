//! Putting a run's events on the bus with PutEvents, and the `simulator_runs` table that
//! tells `orderfleet wait` how many orders a run published.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use deadpool_postgres::GenericClient;
use serde::Serialize;

use super::{StorefrontEvent, PUT_EVENTS_BATCH};
use crate::domain::catalogue::STOREFRONT_SOURCE;
use crate::store::inbox;

/// Puts storefront events on `bus` with PutEvents, [`PUT_EVENTS_BATCH`] per call. Entries
/// EventBridge fails one by one (throttling, internal errors) are sent again, up to five
/// attempts with backoff; the storefront's event ids make a resend harmless.
pub async fn put_events(
    client: &aws_sdk_eventbridge::Client,
    bus: &str,
    events: &[StorefrontEvent],
) -> Result<()> {
    put_events_from(client, bus, STOREFRONT_SOURCE, events).await
}

/// [`put_events`] with the events' `source` given: a commerce platform's partner event
/// source, on its own bus (`orderfleet publish --platform`).
pub async fn put_events_from(
    client: &aws_sdk_eventbridge::Client,
    bus: &str,
    source: &str,
    events: &[StorefrontEvent],
) -> Result<()> {
    for chunk in events.chunks(PUT_EVENTS_BATCH) {
        let mut todo: Vec<&StorefrontEvent> = chunk.iter().collect();
        let mut attempt = 0u32;
        while !todo.is_empty() {
            attempt += 1;
            let entries = todo
                .iter()
                .map(|e| {
                    PutEventsRequestEntry::builder()
                        .event_bus_name(bus)
                        .source(source)
                        .detail_type(e.detail_type)
                        .detail(e.detail.to_string())
                        .build()
                })
                .collect();
            let out = client
                .put_events()
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "PutEvents to bus {bus:?} failed: {}",
                        crate::domain::outcome::error_chain(&e)
                    )
                })?;
            if out.failed_entry_count() == 0 {
                break;
            }
            let mut failed = Vec::new();
            let mut last_error = String::new();
            for (i, e) in todo.iter().enumerate() {
                match out.entries().get(i) {
                    Some(entry) if entry.error_code().is_none() => {}
                    Some(entry) => {
                        last_error = format!(
                            "{}: {}",
                            entry.error_code().unwrap_or_default(),
                            entry.error_message().unwrap_or_default()
                        );
                        failed.push(*e);
                    }
                    None => failed.push(*e),
                }
            }
            if attempt >= 5 {
                bail!(
                    "PutEvents to bus {bus:?}: {} entries still failing after {attempt} attempts; last error {last_error}",
                    failed.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            todo = failed;
        }
    }
    Ok(())
}

/// Creates `simulator_runs` if it is missing. It is the simulator's own bookkeeping (a real
/// storefront writes nothing into the fleet's database), which is why it is not one of the
/// fleet's migrations.
pub async fn ensure_runs_table(db: &impl GenericClient) -> Result<()> {
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS simulator_runs (
             run_id           text        PRIMARY KEY,
             seed             bigint      NOT NULL,
             order_id_prefix  text        NOT NULL,
             orders_planned   integer     NOT NULL,
             orders_published integer     NOT NULL DEFAULT 0,
             kinds            jsonb       NOT NULL DEFAULT '{}',
             started_at       timestamptz NOT NULL DEFAULT now(),
             finished_at      timestamptz
         );
         -- The operator login reads it too (`orderfleet wait` and `watch` look runs up). A
         -- publisher that cannot grant (not the table's owner) leaves the grant as it is.
         DO $$
         BEGIN
             IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'orderfleet_operator')
                AND NOT has_table_privilege('orderfleet_operator', 'simulator_runs', 'SELECT') THEN
                 GRANT SELECT ON simulator_runs TO orderfleet_operator;
             END IF;
         EXCEPTION WHEN insufficient_privilege THEN NULL;
         END $$",
    )
    .await
    .context("creating simulator_runs")?;
    Ok(())
}

/// A run of the simulator as recorded in `simulator_runs`.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub run_id: String,
    pub order_id_prefix: String,
    pub orders_planned: i32,
    pub orders_published: i32,
    /// `false` while publishing, or when the publisher stopped half way.
    pub finished: bool,
}

/// The run `run_id`, or the latest run when `None`. `Ok(None)` when there is none (or the
/// table does not exist yet).
pub async fn find_run(db: &impl GenericClient, run_id: Option<&str>) -> Result<Option<Run>> {
    let exists: bool = db
        .query_one("SELECT to_regclass('simulator_runs') IS NOT NULL", &[])
        .await
        .context("looking for simulator_runs")?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = db
        .query_opt(
            "SELECT run_id, order_id_prefix, orders_planned, orders_published,
                    finished_at IS NOT NULL
               FROM simulator_runs
              WHERE $1::text IS NULL OR run_id = $1
              ORDER BY started_at DESC LIMIT 1",
            &[&run_id],
        )
        .await
        .context("reading simulator_runs")?;
    Ok(row.map(|r| Run {
        run_id: r.get(0),
        order_id_prefix: r.get(1),
        orders_planned: r.get(2),
        orders_published: r.get(3),
        finished: r.get(4),
    }))
}

/// Waits until the inventory handler has processed every event in `event_ids` (its inbox has
/// them), so that orders published next find their SKUs catalogued and stocked. Fails after
/// `timeout` with a message that says what to check.
pub async fn wait_for_inventory(
    db: &impl GenericClient,
    event_ids: &[String],
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let want = event_ids.len() as i64;
    loop {
        let done = inbox::count_processed(db, "inventory", event_ids).await?;
        if done >= want {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the inventory handler processed {done} of {want} catalogue events within {}s; \
                 is an orderfleet-worker with --handler inventory running on this bus and database?",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
