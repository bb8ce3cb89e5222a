//! `orderfleet order show ID`: one order for a support desk (see [`crate::operator::order`]).

use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::cli::DatabaseArg;
use crate::operator::order::{self, OrderView};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// One order: status, lines and money, the payment and its ledger entries, the shipment,
    /// the emails, and its timeline. Reads no personal data (the operator role suffices).
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The order's id.
    pub order_id: String,
    #[command(flatten)]
    pub db: DatabaseArg,
    /// Print the order as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Command::Show(args) => show(args).await,
    }
}

async fn show(args: ShowArgs) -> Result<ExitCode> {
    let pool = crate::store::db::pool(&args.db.database_url, 1)?;
    let db = pool.get().await.context("connecting to the database")?;
    let Some(view) = order::show(&db, &args.order_id).await? else {
        eprintln!("orderfleet: no order {:?}", args.order_id);
        return Ok(ExitCode::from(1));
    };
    if args.json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        print!("{}", render(&view));
    }
    Ok(ExitCode::SUCCESS)
}

/// The order as a few aligned sections.
fn render(o: &OrderView) -> String {
    let money = |minor: Option<i64>| {
        minor.map_or("-".to_string(), |m| {
            format!("{m} {} (minor units)", o.currency.as_deref().unwrap_or(""))
        })
    };
    let mut out = format!(
        "order {}  {}\n  customer {}  total {}\n  reservation {}  payment {}  delivery {}\n",
        o.id,
        o.status,
        o.customer_id.as_deref().unwrap_or("-"),
        money(o.total_minor),
        o.reservation_state,
        o.payment_state,
        o.delivery_state,
    );
    if let Some(reason) = &o.cancel_reason {
        out += &format!("  cancelled: {reason}\n");
    }
    if let Some(reasons) = &o.rejection_reasons {
        out += &format!("  rejected: {reasons}\n");
    }
    out += "\nLINES\n";
    for l in &o.lines {
        out += &format!(
            "  {:<16} x{:<4} at {:>8}  reservation {}\n",
            l.sku,
            l.quantity,
            l.unit_price_minor,
            l.reservation.as_deref().unwrap_or("-")
        );
    }
    if let Some(p) = &o.payment {
        out += &format!(
            "\nPAYMENT {}  amount {}  captured {}  refunded {}{}\n",
            p.state,
            p.amount_minor,
            p.captured_minor,
            p.refunded_minor,
            p.failure_code
                .as_deref()
                .map(|c| format!("  failure {c}"))
                .unwrap_or_default()
        );
    }
    if !o.ledger.is_empty() {
        out += "\nLEDGER\n";
        for p in &o.ledger {
            out += &format!(
                "  {}  {:<10} {:<28} {:>10} {}\n",
                p.at.format("%Y-%m-%d %H:%M:%S"),
                p.kind,
                p.account,
                p.amount_minor,
                p.currency
            );
        }
    }
    if let Some(s) = &o.shipment {
        out += &format!(
            "\nSHIPMENT {}  {} {}  delivery {}{}\n",
            s.state,
            s.carrier.as_deref().unwrap_or("-"),
            s.tracking_number.as_deref().unwrap_or("-"),
            s.delivery_state.as_deref().unwrap_or("-"),
            s.failure_reason
                .as_deref()
                .map(|r| format!("  ({r})"))
                .unwrap_or_default()
        );
    }
    if !o.emails.is_empty() {
        out += "\nEMAILS\n";
        for e in &o.emails {
            out += &format!(
                "  {:<15} {:<18} to {}{}\n",
                e.kind,
                e.status,
                e.recipient_masked,
                e.skip_reason
                    .as_deref()
                    .map(|r| format!("  ({r})"))
                    .unwrap_or_default()
            );
        }
    }
    out += "\nTIMELINE\n";
    for s in &o.timeline {
        out += &format!("  {}  {}\n", s.at.format("%Y-%m-%d %H:%M:%S%.3f"), s.what);
    }
    out
}
