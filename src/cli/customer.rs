//! `orderfleet customer forget ID`: honour a customer's erasure request (see
//! [`crate::operator::erasure`] for what is forgotten and what is kept).

use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::cli::DatabaseArg;
use crate::operator::erasure;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Forget a customer's personal data in every table that holds it: email and name,
    /// addresses (cut to country and postal prefix), payment tokens, dead-lettered events.
    /// Orders keep their money and lines. Refused while an order is still in progress;
    /// running it again changes nothing.
    Forget(ForgetArgs),
}

#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    /// The customer's id (the storefront's `customer.id`).
    pub customer_id: String,
    #[command(flatten)]
    pub db: DatabaseArg,
    /// Print what was done as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Command::Forget(args) => forget(args).await,
    }
}

async fn forget(args: ForgetArgs) -> Result<ExitCode> {
    let pool = crate::store::db::pool(&args.db.database_url, 1)?;
    let mut db = pool.get().await.context("connecting to the database")?;
    let done = erasure::forget(&mut db, &args.customer_id).await?;
    if args.json {
        println!("{}", serde_json::to_string(&done)?);
    } else if done.recorded {
        println!(
            "forgot customer {}: {} order(s); changed {} customer row(s), {} address(es), \
             {} payment method(s), {} payment token(s), {} dead-lettered event(s)",
            done.customer_id,
            done.orders,
            done.customers,
            done.addresses,
            done.payment_methods,
            done.payment_tokens,
            done.dead_letters
        );
    } else {
        println!(
            "customer {} was forgotten already; nothing changed",
            done.customer_id
        );
    }
    Ok(ExitCode::SUCCESS)
}
