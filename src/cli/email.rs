//! `orderfleet email`: the deliverability tools of a support desk.
//!
//! - `email suppressions list [--json]`: the addresses no email goes to (permanent bounces
//!   and complaints SES reported), masked, with their keyed hash ([`crate::operator::suppressions`]).
//! - `email suppressions remove ADDRESS|HASH`: lets email reach an address again (the customer
//!   fixed their mailbox). An address is hashed with `ORDERFLEET_EMAIL_HASH_KEY`; the hash shown
//!   by `list` works without the key.
//! - `email unsubscribe ADDRESS|CUSTOMER_ID`: opts a customer out of marketing email, by
//!   publishing `MarketingOptOut` (channel `support`) on the bus as the shop's unsubscribe page
//!   does; the notifications worker records it.

use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use aws_sdk_eventbridge::types::PutEventsRequestEntry;

use crate::cli::{DatabaseArg, PrefixArg};
use crate::domain::catalogue::STOREFRONT_SOURCE;
use crate::domain::deliverability::{is_address_hash, AddressHasher};
use crate::domain::events::{Event, MarketingOptOut, Meta, OptOutChannel, OptOutSubject};
use crate::domain::mask::mask;
use crate::infra::aws::Clients;
use crate::infra::topology::Topology;
use crate::operator::suppressions;
use crate::providers::email::Secret;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The suppression list: addresses SES reported as bouncing for good or complaining.
    Suppressions(SuppressionsArgs),
    /// Opt a customer out of marketing email (publishes MarketingOptOut, channel support).
    /// Transactional email (confirmation, shipped, cancelled, refunded) still goes out.
    Unsubscribe(UnsubscribeArgs),
}

#[derive(Debug, clap::Args)]
pub struct SuppressionsArgs {
    #[command(subcommand)]
    pub command: SuppressionsCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum SuppressionsCommand {
    /// Every suppressed address (masked), why, and when.
    List(ListArgs),
    /// Let email reach an address again.
    Remove(RemoveArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub db: DatabaseArg,
    /// Print the list as one JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// The address, or its hash as `list` shows it (`hmac-sha256:...`).
    pub address: String,
    #[command(flatten)]
    pub db: DatabaseArg,
    /// The key of the address hashes (the notifications worker's); needed for an address,
    /// not for a hash.
    #[arg(
        long = "email-hash-key",
        env = "ORDERFLEET_EMAIL_HASH_KEY",
        hide_env_values = true
    )]
    pub hash_key: Option<Secret>,
}

#[derive(Debug, clap::Args)]
pub struct UnsubscribeArgs {
    /// The customer's address, or their id (the storefront's `customer.id`).
    pub customer: String,
    #[command(flatten)]
    pub prefix: PrefixArg,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Command::Suppressions(SuppressionsArgs {
            command: SuppressionsCommand::List(args),
        }) => list(args).await,
        Command::Suppressions(SuppressionsArgs {
            command: SuppressionsCommand::Remove(args),
        }) => remove(args).await,
        Command::Unsubscribe(args) => unsubscribe(args).await,
    }
}

async fn list(args: ListArgs) -> Result<ExitCode> {
    let pool = crate::store::db::pool(&args.db.database_url, 1)?;
    let db = pool.get().await.context("connecting to the database")?;
    let all = suppressions::list(&db).await?;
    if args.json {
        println!("{}", serde_json::to_string(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!("no suppressed address");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<10} {:<14} {:>6}  {:<20} {:<20} HASH",
        "ADDRESS", "REASON", "DETAIL", "EVENTS", "FIRST SEEN", "LAST SEEN"
    );
    for s in &all {
        println!(
            "{:<28} {:<10} {:<14} {:>6}  {:<20} {:<20} {}",
            s.address_masked,
            s.reason,
            s.detail.as_deref().unwrap_or("-"),
            s.events,
            s.first_seen.format("%Y-%m-%d %H:%M:%S"),
            s.last_seen.format("%Y-%m-%d %H:%M:%S"),
            s.address_hash
        );
    }
    println!("{} suppressed address(es)", all.len());
    Ok(ExitCode::SUCCESS)
}

async fn remove(args: RemoveArgs) -> Result<ExitCode> {
    let given = args.address.trim();
    let (hash, shown) = if is_address_hash(given) {
        (given.to_ascii_lowercase(), given.to_string())
    } else {
        if !given.contains('@') {
            bail!("{given:?} is neither an address nor a hash as `email suppressions list` shows");
        }
        let key = args
            .hash_key
            .as_ref()
            .map(|k| k.0.as_str())
            .filter(|k| !k.is_empty())
            .context(
                "removing by address needs the key of the address hashes: set \
                 ORDERFLEET_EMAIL_HASH_KEY (or --email-hash-key), or give the hash `email \
                 suppressions list` shows",
            )?;
        let hasher = AddressHasher::new(key.as_bytes())?;
        (hasher.hash(given), mask(given))
    };
    let pool = crate::store::db::pool(&args.db.database_url, 1)?;
    let db = pool.get().await.context("connecting to the database")?;
    match suppressions::remove(&db, &hash).await? {
        Some(s) => {
            println!(
                "removed {} from the suppression list (was: {}{}); email reaches it again",
                s.address_masked,
                s.reason,
                s.detail.map(|d| format!(", {d}")).unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("orderfleet: {shown} is not on the suppression list");
            Ok(ExitCode::from(1))
        }
    }
}

async fn unsubscribe(args: UnsubscribeArgs) -> Result<ExitCode> {
    let given = args.customer.trim();
    if given.is_empty() {
        bail!("give the customer's address or id");
    }
    let (subject, shown) = if given.contains('@') {
        let subject = OptOutSubject {
            id: None,
            email: Some(given.to_string()),
        };
        (subject, mask(given))
    } else {
        let subject = OptOutSubject {
            id: Some(given.to_string()),
            email: None,
        };
        (subject, format!("customer {given}"))
    };
    let event_id = uuid::Uuid::new_v4().to_string();
    let event = MarketingOptOut {
        meta: Meta::with_id(&event_id),
        customer: subject,
        channel: OptOutChannel::Support,
    };
    let topo = Topology::with_prefix(&args.prefix.prefix);
    let clients = Clients::from_env().await;
    let entry = PutEventsRequestEntry::builder()
        .event_bus_name(&topo.bus_name)
        .source(STOREFRONT_SOURCE)
        .detail_type(MarketingOptOut::DETAIL_TYPE)
        .detail(serde_json::to_string(&event)?)
        .build();
    let out = clients
        .events
        .put_events()
        .entries(entry)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "PutEvents to bus {:?} failed: {}",
                topo.bus_name,
                crate::domain::outcome::error_chain(&e)
            )
        })?;
    if out.failed_entry_count() > 0 {
        let why = out
            .entries()
            .first()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.error_code().unwrap_or_default(),
                    e.error_message().unwrap_or_default()
                )
            })
            .unwrap_or_default();
        bail!(
            "PutEvents to bus {:?} refused the event: {why}",
            topo.bus_name
        );
    }
    println!(
        "published MarketingOptOut for {shown} (event {event_id}); the notifications worker \
         records it, and no more marketing email goes to that customer"
    );
    Ok(ExitCode::SUCCESS)
}
