//! `orderfleet publish --orders N [--rate R] [--seed S]`: the storefront simulator. Seeds the
//! catalogue (unless `--no-seed`), then puts a reproducible mix of `OrderPlaced` and
//! `OrderCancellationRequested` events on the bus with PutEvents, ten per call, and records the
//! run in `simulator_runs` so that `orderfleet wait` knows how many orders to wait for.
//!
//! Stdout carries only the summary (or, with `--json`, one JSON object); progress goes to
//! stderr.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use crate::cli::simulator::{self, Plan, PlanConfig, StorefrontEvent, DEFAULT_SKUS};
use crate::cli::{DatabaseArg, PrefixArg};
use crate::infra::aws::Clients;
use crate::infra::topology::Topology;
use crate::operator::rate::TokenBucket;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub prefix: PrefixArg,
    #[command(flatten)]
    pub db: DatabaseArg,
    /// Orders to place.
    #[arg(long, env = "ORDERFLEET_ORDERS", default_value_t = 100,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub orders: usize,
    /// Orders per second (a token bucket with bursts of up to 10); unlimited when absent.
    #[arg(long, env = "ORDERFLEET_RATE")]
    pub rate: Option<f64>,
    /// Seed of the simulation: the same seed gives the same customers, lines and mix.
    #[arg(long, env = "ORDERFLEET_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Identity of this run in order ids (`ord-<run>-00001`) and event ids; random by default.
    /// Must be new: the fleet would take a reused id's orders for duplicates.
    #[arg(long, env = "ORDERFLEET_RUN_ID", value_parser = parse_run_id)]
    pub run_id: Option<String>,
    /// Do not publish the catalogue and stock first (`orderfleet seed` did, or a previous run).
    #[arg(long)]
    pub no_seed: bool,
    /// Products in the catalogue (must match the seeding when --no-seed).
    #[arg(long, env = "ORDERFLEET_SEED_SKUS", default_value_t = DEFAULT_SKUS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=10_000))]
    pub skus: usize,
    /// Units received per regular SKU when seeding; default: enough that only scarce SKUs run
    /// out during this run.
    #[arg(long, env = "ORDERFLEET_SEED_UNITS", value_parser = clap::value_parser!(i64).range(1..))]
    pub units: Option<i64>,
    /// How long to wait for the inventory handler to take the catalogue in.
    #[arg(long, env = "ORDERFLEET_SEED_TIMEOUT_SECS", default_value_t = 60)]
    pub seed_timeout_secs: u64,
    /// Speak a commerce platform's dialect: each order becomes the platform's event (a
    /// Shopify `orders/create` webhook, a commercetools `OrderCreated` Message) on its partner
    /// event bus, for the storefront handler to translate. Orders are paid on the platform, so
    /// only regular orders are planned. The catalogue is still seeded on the fleet's bus.
    #[arg(long, requires = "partner_sources")]
    pub platform: Option<crate::domain::platform::Platform>,
    /// The platform's partner event source (its bus has the same name), as given to
    /// `orderfleet provision --partner-source`; the one of `--platform` is used.
    #[arg(
        long = "partner-source",
        env = "ORDERFLEET_PARTNER_SOURCES",
        value_delimiter = ','
    )]
    pub partner_sources: Vec<String>,
    /// The shop on the platform: Shopify's shop domain or commercetools' project key.
    #[arg(
        long,
        env = "ORDERFLEET_SIMULATED_SHOP",
        default_value = "orderfleet-demo"
    )]
    pub shop: String,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_run_id(s: &str) -> Result<String, String> {
    let ok =
        !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err("a run id is 1 to 32 ASCII letters, digits or underscores".into())
    }
}

pub async fn run(args: Args) -> Result<ExitCode> {
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate must be a positive number of orders per second, got {rate}");
        }
    }
    // Where the orders go: the fleet's bus as the storefront, or a platform's partner bus.
    let (bus_source, platform) = match args.platform {
        None => (None, None),
        Some(platform) => {
            let source = args
                .partner_sources
                .iter()
                .map(|s| s.trim())
                .find(|s| crate::domain::platform::Platform::of_source(s) == Some(platform))
                .with_context(|| {
                    format!(
                        "--platform {platform} needs its partner event source in --partner-source \
                         (ORDERFLEET_PARTNER_SOURCES), starting with {}",
                        platform.source_prefix()
                    )
                })?;
            (Some(source.to_string()), Some(platform))
        }
    };
    let clients = Clients::from_env().await;
    let topo = Topology::with_prefix(&args.prefix.prefix);
    let pool = crate::store::db::pool(&args.db.database_url, 1)?;
    let db = pool.get().await.context("connecting to the database")?;
    simulator::ensure_runs_table(&db).await?;
    let run_id = args.run_id.clone().unwrap_or_else(simulator::new_run_id);
    if simulator::find_run(&db, Some(&run_id)).await?.is_some() {
        bail!("run id {run_id:?} was used before; its orders would be taken for duplicates. Pick another --run-id");
    }

    let started = Instant::now();
    if !args.no_seed {
        let units = args
            .units
            .unwrap_or_else(|| simulator::units_for(args.orders, args.skus));
        let seeded = super::seed::seed(
            &clients,
            &topo,
            Some(&args.db.database_url),
            &run_id,
            args.skus,
            units,
            Some(Duration::from_secs(args.seed_timeout_secs)),
        )
        .await?;
        eprintln!(
            "publish: catalogue seeded: {} products, {units} units per regular SKU",
            seeded.products
        );
    }

    let products = simulator::catalogue(args.skus);
    let mut plan = simulator::plan_orders(
        &PlanConfig {
            orders: args.orders,
            seed: args.seed,
            run_id: run_id.clone(),
            regular_only: platform.is_some(),
        },
        &products,
    )?;
    let mut prefix = Plan::order_id_prefix(&run_id);
    if let Some(platform) = platform {
        prefix = simulator::platforms::order_ids(platform, &run_id, 0).1;
        let mut events = Vec::with_capacity(plan.events.len());
        for (n, event) in plan.events.iter().enumerate() {
            let order: crate::domain::events::OrderPlaced =
                serde_json::from_value(event.detail.clone()).context("a planned order")?;
            let (id, _) = simulator::platforms::order_ids(platform, &run_id, n + 1);
            events.push(simulator::platforms::placed(
                platform, &order, &id, &args.shop,
            )?);
        }
        plan.events = events;
    }
    let counts: BTreeMap<&str, usize> = plan
        .counts()
        .into_iter()
        .map(|(k, n)| (k.as_str(), n))
        .collect();
    db.execute(
        "INSERT INTO simulator_runs (run_id, seed, order_id_prefix, orders_planned, kinds)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &run_id,
            // Stored as the same 64 bits: PostgreSQL has no unsigned bigint.
            &(args.seed as i64),
            &prefix,
            &(args.orders as i32),
            &json!(counts),
        ],
    )
    .await
    .context("recording the run in simulator_runs")?;

    let bus = bus_source.as_deref().unwrap_or(&topo.bus_name);
    let source = bus_source
        .as_deref()
        .unwrap_or(crate::domain::catalogue::STOREFRONT_SOURCE);
    let published = publish_plan(&clients, (bus, source), &plan, args.rate, |n| {
        let db = &db;
        let run_id = &run_id;
        async move {
            db.execute(
                "UPDATE simulator_runs SET orders_published = $2 WHERE run_id = $1",
                &[run_id, &(n as i32)],
            )
            .await
            .map(|_| ())
            .context("recording progress in simulator_runs")
        }
    })
    .await?;
    db.execute(
        "UPDATE simulator_runs SET orders_published = $2, finished_at = now() WHERE run_id = $1",
        &[&run_id, &(published as i32)],
    )
    .await
    .context("recording the end of the run")?;
    let elapsed = started.elapsed().as_secs_f64();

    let cancellations = plan
        .events
        .iter()
        .filter(|e| e.detail_type == "OrderCancellationRequested")
        .count();
    if args.json {
        println!(
            "{}",
            json!({
                "run_id": run_id,
                "bus": bus,
                "platform": platform.map(|p| p.as_str()),
                "seed": args.seed,
                "orders": published,
                "cancellation_requests": cancellations,
                "order_id_prefix": prefix,
                "kinds": counts,
                "seeded": !args.no_seed,
                "elapsed_secs": (elapsed * 100.0).round() / 100.0,
            })
        );
    } else {
        println!(
            "publish: {published} orders and {cancellations} cancellation requests on bus {} \
             in {elapsed:.1}s (run {run_id}, seed {}, order ids {prefix}*)",
            bus, args.seed
        );
        for (kind, n) in &counts {
            println!("  {kind:<20} {n:>7}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Puts the plan's events on the bus in order, ten per PutEvents call, pacing `OrderPlaced`
/// at `rate` per second. Calls `progress` with the number of orders on the bus about once a
/// second, and prints a progress line on stderr. Returns the number of orders published.
async fn publish_plan<F, Fut>(
    clients: &Clients,
    (bus, source): (&str, &str),
    plan: &Plan,
    rate: Option<f64>,
    progress: F,
) -> Result<usize>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut bucket = rate.map(TokenBucket::new);
    let mut batch: Vec<StorefrontEvent> = Vec::with_capacity(simulator::PUT_EVENTS_BATCH);
    let mut orders_in_batch = 0;
    let mut published = 0;
    let mut last_report = Instant::now();
    let total = plan.orders.len();
    for event in &plan.events {
        // A platform's events are all orders (platform runs plan no cancellations).
        let is_order = event.detail_type != "OrderCancellationRequested";
        if is_order {
            let wait = bucket.as_mut().map_or(Duration::ZERO, |b| b.take(1));
            if !wait.is_zero() {
                // Do not hold finished orders back while waiting for the next token.
                if !batch.is_empty() {
                    simulator::put_events_from(&clients.events, bus, source, &batch).await?;
                    batch.clear();
                    published += std::mem::take(&mut orders_in_batch);
                }
                tokio::time::sleep(wait).await;
            }
            orders_in_batch += 1;
        }
        batch.push(event.clone());
        if batch.len() == simulator::PUT_EVENTS_BATCH {
            simulator::put_events_from(&clients.events, bus, source, &batch).await?;
            batch.clear();
            published += std::mem::take(&mut orders_in_batch);
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!("publish: {published}/{total} orders on the bus");
            progress(published).await?;
        }
    }
    if !batch.is_empty() {
        simulator::put_events_from(&clients.events, bus, source, &batch).await?;
        published += orders_in_batch;
    }
    Ok(published)
}
