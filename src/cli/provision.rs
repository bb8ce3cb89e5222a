//! `orderfleet provision`: applies the topology and prints what changed.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::PrefixArg;
use crate::infra::aws::Clients;
use crate::infra::topology::{Topology, DEFAULT_MAX_RECEIVE_COUNT};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub prefix: PrefixArg,
    /// Receives before SQS moves a failing message to the DLQ.
    #[arg(long, env = "ORDERFLEET_MAX_RECEIVE_COUNT", default_value_t = DEFAULT_MAX_RECEIVE_COUNT,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_receive_count: u32,
    /// The lake's S3 bucket; default: `<prefix>-lake`. S3 bucket names are global: in AWS,
    /// choose one no other account has.
    #[arg(long, env = "ORDERFLEET_LAKE_BUCKET")]
    pub lake_bucket: Option<String>,
    /// A commerce platform's EventBridge partner event source to route into the storefront
    /// queue (`aws.partner/shopify.com/<app id>/<name>` or
    /// `aws.partner/commercetools.com/<project>/<subscription>`); at most one per platform.
    /// Repeat the flag, or separate names with commas in the variable.
    #[arg(
        long = "partner-source",
        env = "ORDERFLEET_PARTNER_SOURCES",
        value_delimiter = ','
    )]
    pub partner_sources: Vec<String>,
    /// The SES configuration set the notifications worker sends with: its bounces and
    /// complaints reach the notifications queue through a rule on the account's default bus
    /// (the set's EventBridge event destination must point at that bus; see
    /// docs/notifications.md). Unset: no such rule.
    #[arg(
        long = "ses-configuration-set",
        env = "ORDERFLEET_SES_CONFIGURATION_SET"
    )]
    pub ses_configuration_set: Option<String>,
    /// Print the changes as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let mut topo = Topology::with_prefix(&args.prefix.prefix);
    topo.max_receive_count = args.max_receive_count;
    topo.lake_bucket_override = args.lake_bucket.filter(|b| !b.is_empty());
    topo.partner_sources = args
        .partner_sources
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    topo.check_partner_sources().map_err(anyhow::Error::msg)?;
    topo.ses_configuration_set = args
        .ses_configuration_set
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let clients = Clients::from_env().await;
    let changes = crate::infra::provision::provision(&clients, &topo).await?;
    if args.json {
        println!("{}", serde_json::json!({ "changes": changes }));
    } else if changes.is_empty() {
        println!("provision: everything is in place; nothing changed");
    } else {
        for c in &changes {
            println!("{:<60} {}", c.resource, c.action);
        }
        println!("provision: {} change(s)", changes.len());
    }
    Ok(ExitCode::SUCCESS)
}
