//! The `orderfleet` operator CLI: one file per command. The binary only parses arguments.

pub mod customer;
pub mod dlq;
pub mod email;
pub mod lake;
pub mod migrate;
pub mod order;
pub mod provision;
pub mod publish;
pub mod report;
pub mod seed;
pub mod simulator;
pub mod status;
pub mod wait;
pub mod watch;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::telemetry::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "orderfleet",
    version,
    about = "Operate the orderfleet worker fleet"
)]
pub struct Cli {
    /// Log format of diagnostics on stderr.
    #[arg(
        long,
        global = true,
        env = "ORDERFLEET_LOG_FORMAT",
        default_value = "pretty"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update the bus, queues, DLQs, rules and queue policies (idempotent).
    Provision(provision::Args),
    /// Apply the versioned SQL migrations, each in a transaction.
    Migrate(migrate::Args),
    /// Every handler's queue and DLQ, running move tasks, and the live workers.
    Status(status::Args),
    /// Inspect, redrive, export, import and purge dead-letter queues.
    Dlq(dlq::Args),
    /// The S3 data lake: `lake stats` counts records by detail-type and day.
    Lake(lake::Args),
    /// Publish the simulated storefront catalogue and stock (ProductUpserted, StockReceived).
    Seed(seed::Args),
    /// The storefront simulator: publish a reproducible mix of orders to the bus.
    Publish(publish::Args),
    /// Wait until every published order is terminal and the outbox is drained.
    Wait(wait::Args),
    /// Orders by status, stock, ledger totals and invariant checks; exits 1 if one fails.
    Report(report::Args),
    /// Customers' personal data: `customer forget ID` honours an erasure request.
    Customer(customer::Args),
    /// The support desk: `order show`, `refund`, `cancel` and `list`.
    Order(order::Args),
    /// A live summary: orders by outcome, messages per second, queue and DLQ depths, emails.
    Watch(watch::Args),
    /// Email deliverability: `email suppressions list|remove`, `email unsubscribe`.
    Email(email::Args),
}

/// Runs a parsed command. The exit code is the command's verdict (e.g. a failed invariant).
pub async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    match cli.command {
        Command::Provision(args) => provision::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
        Command::Lake(args) => lake::run(args).await,
        Command::Seed(args) => seed::run(args).await,
        Command::Publish(args) => publish::run(args).await,
        Command::Wait(args) => wait::run(args).await,
        Command::Report(args) => report::run(args).await,
        Command::Customer(args) => customer::run(args).await,
        Command::Order(args) => order::run(args).await,
        Command::Watch(args) => watch::run(args).await,
        Command::Email(args) => email::run(args).await,
    }
}

/// `--prefix`, shared by every command that touches AWS resources.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefixArg {
    /// Prefix of every resource name: the bus, queues `<prefix>-<handler>` and DLQs.
    #[arg(long, env = "ORDERFLEET_PREFIX", default_value = "orderfleet")]
    pub prefix: String,
}

/// `--database-url`, shared by every command that reads PostgreSQL.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArg {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}
