//! The saga benchmark of `make bench`: complete orders per second through the whole order saga
//! with real PostgreSQL, and database transactions per order.
//!
//! It runs the four saga handlers in process ([`Fleet`]): the outbox stands in for EventBridge
//! and SQS, so the figure measures the handlers and the database, not the emulator (moto's
//! PutEvents alone takes about 12 ms per event per target). The sandbox payment provider has
//! no latency and its own pool.
//!
//! Each run gets a scratch database (`orderfleet_bench_<id>`, dropped afterwards). The
//! catalogue and N orders are written to the outbox first; the clock runs from the first
//! delivery until the outbox is empty, and every order must then be `completed` with every
//! invariant of [`orderfleet::operator::report`] holding, or the run fails.
//!
//! Transactions are counted two ways: `handler_transactions` are the fleet's calls of
//! [`orderfleet::runtime::execute`] (inbox, effects and outbox in one transaction each);
//! `db_transactions` is PostgreSQL's own count for the scratch database
//! (`pg_stat_database.xact_commit + xact_rollback`), which adds the outbox takes (the relay's
//! work), the sandbox provider's bookkeeping (a real provider is a remote API instead) and the
//! drivers' idle checks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use deadpool_postgres::Pool;
use serde::Serialize;

use orderfleet::cli::simulator::{self, PlanConfig};
use orderfleet::domain::names::HandlerName;
use orderfleet::handlers::fulfillment::Fulfillment;
use orderfleet::providers::carrier::SandboxCarrier;
use orderfleet::runtime::group::GroupConfig;
use orderfleet_testkit::inproc::Fleet;

/// Settings of the saga benchmark.
#[derive(Debug, Clone)]
pub struct SagaConfig {
    /// Admin connection; the scratch database is created next to it.
    pub database_url: String,
    pub orders: usize,
    /// Concurrent delivery tasks (like worker instances sharing the queues).
    pub workers: usize,
    /// Events each task takes from the outbox at once.
    pub batch: usize,
    /// How the grouping handlers commit events together.
    pub group: GroupConfig,
    /// Keep the scratch database for inspection.
    pub keep_database: bool,
}

/// The figures of one saga run.
#[derive(Debug, Clone, Serialize)]
pub struct SagaReport {
    pub orders: usize,
    pub completed: i64,
    pub elapsed_secs: f64,
    pub orders_per_sec: f64,
    /// Events delivered (taken from the outbox) per order.
    pub events_per_order: f64,
    /// Events handed to a handler per order (an event with two consumers counts twice).
    pub handler_deliveries_per_order: f64,
    pub handler_transactions_per_order: f64,
    pub db_transactions_per_order: f64,
    pub workers: usize,
    pub batch: usize,
}

/// The URL of database `name` on the server of `url`.
fn database_url(url: &str, name: &str) -> Result<String> {
    let (base, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => bail!("DATABASE_URL must be a postgres:// URL"),
    };
    let slash = rest
        .find('/')
        .context("DATABASE_URL has no database name")?;
    let query = rest[slash..]
        .find('?')
        .map(|q| &rest[slash + q..])
        .unwrap_or("");
    Ok(format!("{base}{}/{name}{query}", &rest[..slash]))
}

/// Committed plus rolled-back transactions of database `name` so far. Backends publish their
/// counts when they exit, so callers close their pools first.
pub(crate) async fn transactions(admin: &Pool, name: &str) -> Result<i64> {
    let client = admin.get().await.context("admin connection")?;
    let row = client
        .query_one(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
            &[&name],
        )
        .await
        .context("reading pg_stat_database")?;
    Ok(row.get(0))
}

/// Runs the benchmark on a scratch database. `progress` receives human-readable lines.
pub async fn run(cfg: &SagaConfig, progress: impl Fn(String)) -> Result<SagaReport> {
    let progress = &progress;
    with_scratch_database(
        &cfg.database_url,
        ("orderfleet_bench", "saga"),
        cfg.keep_database,
        progress,
        |admin, name, url| async move { run_in(cfg, &admin, &name, &url, &progress).await },
    )
    .await
}

/// Runs `body` on a new database next to `admin_url`'s (`<prefix>_<id>`), given the admin
/// pool, the database's name and its URL; drops it afterwards unless `keep`. `what` names the
/// benchmark in progress lines.
pub(crate) async fn with_scratch_database<T, F, Fut>(
    admin_url: &str,
    (prefix, what): (&str, &str),
    keep: bool,
    progress: &impl Fn(String),
    body: F,
) -> Result<T>
where
    F: FnOnce(Pool, String, String) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let admin = orderfleet::store::db::pool(admin_url, 1)?;
    let name = format!("{prefix}_{}", simulator::new_run_id());
    admin
        .get()
        .await
        .context("connecting to PostgreSQL (is the stack up? `make up`)")?
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| format!("creating the scratch database {name}"))?;
    let url = database_url(admin_url, &name)?;
    let result = body(admin.clone(), name.clone(), url).await;
    if keep {
        progress(format!("{what}: kept database {name}"));
    } else if let Ok(client) = admin.get().await {
        if let Err(e) = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
        {
            progress(format!("{what}: could not drop {name}: {e}"));
        }
    }
    result
}

/// A fleet on `url` with pools sized for its transactions: each of the four handlers runs up
/// to `group.transactions` at once, plus a provider connection while a payment runs and a
/// carrier connection while a ship runs. Payments and fulfillment get a side pool each, as
/// their worker processes would have.
fn fleet(url: &str, group: GroupConfig) -> Result<Fleet> {
    let size = 4 * group.transactions + 2;
    let pool = orderfleet::store::db::pool(url, size)?;
    let provider_pool = orderfleet::store::db::pool(url, group.transactions + 2)?;
    let carrier_pool = orderfleet::store::db::pool(url, group.transactions + 1)?;
    let fulfillment = Fulfillment::new(
        Arc::new(SandboxCarrier::new(carrier_pool.clone())),
        carrier_pool,
    );
    Ok(Fleet::sandbox_with(pool, provider_pool, Duration::ZERO)
        .with_handler(HandlerName::Fulfillment, Arc::new(fulfillment))
        .with_group_commit(group)
        .with_published_kept(false)
        .with_max_events(u64::MAX / 2))
}

async fn run_in(
    cfg: &SagaConfig,
    admin: &Pool,
    name: &str,
    url: &str,
    progress: &impl Fn(String),
) -> Result<SagaReport> {
    let workers = cfg.workers.max(1);
    // Setup: migrate, take the catalogue in, queue the orders. Not timed.
    {
        let setup = fleet(url, cfg.group)?;
        orderfleet::store::db::migrate(setup.pool()).await?;
        let products = simulator::catalogue(simulator::DEFAULT_SKUS);
        let units = simulator::units_for(cfg.orders, products.len());
        for e in simulator::seed_events("bench", &products, units)? {
            setup.publish(e.detail_type, &e.detail).await?;
        }
        setup
            .run_until_quiet_concurrently(workers, cfg.batch)
            .await?;
        let plan = simulator::plan_orders(
            &PlanConfig {
                orders: cfg.orders,
                seed: 1,
                run_id: "bench".into(),
                regular_only: true,
            },
            &products,
        )?;
        for e in &plan.events {
            setup.publish(e.detail_type, &e.detail).await?;
        }
        setup.pool().close();
    }
    // Let the closed backends exit and publish their counts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = transactions(admin, name).await?;
    progress(format!(
        "saga: {} orders queued; delivering with {workers} tasks taking {} events each",
        cfg.orders, cfg.batch
    ));

    let fleet = fleet(url, cfg.group)?;
    let started = Instant::now();
    fleet
        .run_until_quiet_concurrently(workers, cfg.batch)
        .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let stats = fleet.stats();
    if stats.dead_lettered > 0 {
        let first = fleet.dead_letters().into_iter().next();
        bail!(
            "{} deliveries were dead-lettered, e.g. {:?}",
            stats.dead_lettered,
            first.map(|d| (d.handler, d.kind, d.reason))
        );
    }
    fleet.pool().close();
    drop(fleet);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = transactions(admin, name).await?;

    // Judge the result on a fresh connection: every order completed, every invariant holds.
    let check = orderfleet::store::db::pool(url, 1)?;
    let mut client = check
        .get()
        .await
        .context("connecting to the scratch database")?;
    let report = orderfleet::operator::report::build(&mut client).await?;
    let completed = report
        .orders_by_status
        .get("completed")
        .copied()
        .unwrap_or(0);
    if completed != cfg.orders as i64 {
        bail!(
            "only {completed} of {} orders completed: {:?}",
            cfg.orders,
            report.orders_by_status
        );
    }
    if !report.holds() {
        bail!("invariants broken after the run: {:?}", report.violations);
    }
    drop(client);
    check.close();

    let per_order = |n: f64| n / cfg.orders as f64;
    Ok(SagaReport {
        orders: cfg.orders,
        completed,
        elapsed_secs: elapsed,
        orders_per_sec: cfg.orders as f64 / elapsed,
        events_per_order: per_order(stats.events as f64),
        handler_deliveries_per_order: per_order((stats.applied + stats.duplicates) as f64),
        handler_transactions_per_order: per_order(stats.executions as f64),
        db_transactions_per_order: per_order((after - before) as f64),
        workers,
        batch: cfg.batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scratch_database_sits_next_to_the_admin_one() {
        assert_eq!(
            database_url("postgres://u@127.0.0.1:55433/orderfleet", "b1").unwrap(),
            "postgres://u@127.0.0.1:55433/b1"
        );
        assert_eq!(
            database_url("postgresql://u:p@h/db?sslmode=disable", "b2").unwrap(),
            "postgresql://u:p@h/b2?sslmode=disable"
        );
        assert!(database_url("host=x dbname=y", "b").is_err());
    }
}
