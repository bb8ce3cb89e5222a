//! `orderfleet seed [--skus N]`: puts the simulated catalogue and its stock on the bus as the
//! storefront would (`ProductUpserted` and `StockReceived` through PutEvents), then waits until
//! the inventory handler has taken them in.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use crate::cli::simulator::{self, DEFAULT_SKUS};
use crate::cli::PrefixArg;
use crate::infra::aws::Clients;
use crate::infra::topology::Topology;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub prefix: PrefixArg,
    /// PostgreSQL connection URL: used only to wait for the inventory handler.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Products in the catalogue (the same SKUs, names and prices every time).
    #[arg(long, env = "ORDERFLEET_SEED_SKUS", default_value_t = DEFAULT_SKUS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=10_000))]
    pub skus: usize,
    /// Units received per regular SKU (scarce SKUs always get 3).
    #[arg(long, env = "ORDERFLEET_SEED_UNITS", default_value_t = 500,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub units: i64,
    /// Return once the events are on the bus, without waiting for the inventory handler.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the inventory handler.
    #[arg(long, env = "ORDERFLEET_SEED_TIMEOUT_SECS", default_value_t = 60)]
    pub timeout_secs: u64,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What a seeding did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Seeded {
    pub run_id: String,
    pub products: usize,
    pub scarce_products: usize,
    pub units_per_regular_sku: i64,
    pub events: usize,
}

/// Publishes the catalogue for `run_id` and, given a database, waits for inventory. Shared
/// with `orderfleet publish`, which seeds first.
pub async fn seed(
    clients: &Clients,
    topo: &Topology,
    database_url: Option<&str>,
    run_id: &str,
    skus: usize,
    units: i64,
    timeout: Option<Duration>,
) -> Result<Seeded> {
    let products = simulator::catalogue(skus);
    let events = simulator::seed_events(run_id, &products, units)?;
    simulator::put_events(&clients.events, &topo.bus_name, &events)
        .await
        .context("publishing the catalogue")?;
    if let Some(timeout) = timeout {
        let Some(url) = database_url else {
            bail!("waiting for the inventory handler needs --database-url (or DATABASE_URL); pass --no-wait to skip it");
        };
        let pool = crate::store::db::pool(url, 1)?;
        let db = pool.get().await.context("connecting to the database")?;
        let ids: Vec<String> = events
            .iter()
            .filter_map(|e| e.event_id().map(str::to_string))
            .collect();
        eprintln!(
            "seed: {} catalogue events on bus {}; waiting for the inventory handler",
            events.len(),
            topo.bus_name
        );
        simulator::wait_for_inventory(&db, &ids, timeout).await?;
    }
    Ok(Seeded {
        run_id: run_id.to_string(),
        products: products.len(),
        scarce_products: products.iter().filter(|p| p.scarce).count(),
        units_per_regular_sku: units,
        events: events.len(),
    })
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let clients = Clients::from_env().await;
    let topo = Topology::with_prefix(&args.prefix.prefix);
    let run_id = simulator::new_run_id();
    let timeout = (!args.no_wait).then(|| Duration::from_secs(args.timeout_secs));
    let s = seed(
        &clients,
        &topo,
        args.database_url.as_deref(),
        &run_id,
        args.skus,
        args.units,
        timeout,
    )
    .await?;
    if args.json {
        println!("{}", json!(s));
    } else {
        println!(
            "seed: {} products ({} scarce, {} units each otherwise) published as {} events, run {}{}",
            s.products,
            s.scarce_products,
            s.units_per_regular_sku,
            s.events,
            s.run_id,
            if args.no_wait { "" } else { "; inventory has them" }
        );
    }
    Ok(ExitCode::SUCCESS)
}
