//! `orderfleet order`: the support desk (issue 15, part 2). `show` reads one order (see
//! [`crate::operator::order`]); `refund` and `cancel` ask the fleet to act, audited; `list`
//! finds the orders that need someone (see [`crate::operator::desk`]).
//!
//! Exit codes: 0 done (or, with `--dry-run`, would be done), 1 no such order or the action is
//! refused (the reason is on stderr, nothing is published), 2 failed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};

use crate::cli::{DatabaseArg, PrefixArg};
use crate::domain::events::{Currency, Money};
use crate::infra::topology::Topology;
use crate::operator::desk::{self, ListFilter};
use crate::operator::order::{self, OrderView};
use crate::providers::email::view::format_money;
use crate::store::operator_actions::Action;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// One order: status, lines and money, the payment and its ledger entries, the shipment,
    /// the emails, the support desk's actions, DLQ messages that mention it, and its timeline.
    /// Reads no personal data (the operator role suffices).
    Show(ShowArgs),
    /// Refund part or all of an order's captured payment (audited; payments applies it).
    Refund(RefundArgs),
    /// Cancel an order that has not shipped (audited; orders applies it).
    Cancel(CancelArgs),
    /// Orders by status, payment state, age, or stuck in flight: the report's "Needs attention".
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The order's id, or the platform's order number (`#1042`).
    pub order_id: String,
    #[command(flatten)]
    pub db: DatabaseArg,
    #[command(flatten)]
    pub prefix: PrefixArg,
    /// Print the order as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Do not read the handlers' DLQs (SQS) for messages that mention the order.
    #[arg(long)]
    pub no_dlq: bool,
    /// How long each DLQ message read stays hidden while `show` reads (it is made visible
    /// again at once after).
    #[arg(long, env = "ORDERFLEET_DLQ_VISIBILITY_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(2..=43_200))]
    pub visibility_timeout_secs: u64,
}

/// Who acts, why, and whether only to see what would happen: shared by `refund` and `cancel`.
#[derive(Debug, clap::Args)]
pub struct ActionArgs {
    /// Why (recorded with the action, and shown by `order show`).
    #[arg(long)]
    pub reason: String,
    /// Who acts, as recorded in the audit; `$USER` when not given. The database login is
    /// recorded as well.
    #[arg(long, env = "ORDERFLEET_OPERATOR")]
    pub operator: Option<String>,
    /// Check and show what would happen; publish and record nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DatabaseArg,
}

#[derive(Debug, clap::Args)]
pub struct RefundArgs {
    /// The order's id, or the platform's order number (`#1042`).
    pub order_id: String,
    /// How much, in the order's currency (`12.50`); all that is left to refund when omitted.
    #[arg(long)]
    pub amount: Option<String>,
    #[command(flatten)]
    pub action: ActionArgs,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The order's id, or the platform's order number (`#1042`).
    pub order_id: String,
    #[command(flatten)]
    pub action: ActionArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only orders in these statuses (comma-separated, e.g. `accepted,ready_to_ship`).
    #[arg(long, value_delimiter = ',')]
    pub status: Vec<String>,
    /// Only orders in these payment states (e.g. `capture_failed`: the capture was declined
    /// after the parcel left).
    #[arg(long, value_delimiter = ',')]
    pub payment_state: Vec<String>,
    /// Only orders placed since then: a time (`2026-12-01T00:00:00Z`) or an age (`30m`, `6h`,
    /// `2d`).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
    /// Only orders in flight (not terminal) that have not changed for N minutes.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub stuck_minutes: Option<i32>,
    /// Orders to show at most.
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
    /// Print the orders as JSON lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DatabaseArg,
}

/// `--since`: an RFC 3339 time, or an age before now (`90s`, `30m`, `6h`, `2d`).
fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    crate::operator::filter::parse_age(s)
        .filter(|secs| *secs >= 0.0 && *secs < 1e10)
        .map(|secs| Utc::now() - chrono::Duration::milliseconds((secs * 1000.0) as i64))
        .ok_or_else(|| {
            format!("{s:?} is neither a time (2026-12-01T00:00:00Z) nor an age (30m, 6h, 2d)")
        })
}

pub async fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Command::Show(args) => show(args).await,
        Command::Refund(args) => refund(args).await,
        Command::Cancel(args) => cancel(args).await,
        Command::List(args) => list(args).await,
    }
}

async fn show(args: ShowArgs) -> Result<ExitCode> {
    let pool = crate::store::db::pool(&args.db.database_url, 1)?;
    let db = pool.get().await.context("connecting to the database")?;
    let Some(mut view) = order::show(&db, &args.order_id).await? else {
        eprintln!("orderfleet: no order {:?}", args.order_id);
        return Ok(ExitCode::from(1));
    };
    if !args.no_dlq {
        let clients = crate::infra::aws::Clients::from_env().await;
        let topo = Topology::with_prefix(&args.prefix.prefix);
        let visibility = Duration::from_secs(args.visibility_timeout_secs);
        match order::dead_letters(&clients.sqs, &topo, &view.id, visibility).await {
            Ok(found) => view.add_dead_letters(found),
            // The order is worth showing without them; say what is missing.
            Err(e) => eprintln!("orderfleet: the DLQs were not read: {e:#}"),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        print!("{}", render(&view));
    }
    Ok(ExitCode::SUCCESS)
}

/// The operator's name: `--operator` / `ORDERFLEET_OPERATOR`, else `$USER`.
fn operator_name(args: &ActionArgs) -> Result<String> {
    let name = args
        .operator
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default();
    if name.trim().is_empty() {
        anyhow::bail!("who is acting? Give --operator NAME (or set ORDERFLEET_OPERATOR)");
    }
    Ok(name.trim().to_string())
}

/// Checks the shared arguments and finds the order. `Err(code)` ends the command.
async fn prepare(
    args: &ActionArgs,
    key: &str,
) -> Result<std::result::Result<(deadpool_postgres::Client, String, String), ExitCode>> {
    if args.reason.trim().is_empty() {
        anyhow::bail!("--reason must say why (it is recorded with the action)");
    }
    let operator = operator_name(args)?;
    let pool = crate::store::db::pool(&args.db.database_url, 1)?;
    let db = pool.get().await.context("connecting to the database")?;
    let Some(order_id) = desk::resolve(&db, key).await? else {
        eprintln!("orderfleet: no order {key:?}");
        return Ok(Err(ExitCode::from(1)));
    };
    Ok(Ok((db, order_id, operator)))
}

/// Prints the outcome of an action (or a refusal) and returns its exit code.
fn outcome(json: bool, value: serde_json::Value, text: &str, ok: bool) -> ExitCode {
    if json {
        println!("{value}");
    }
    if ok {
        if !json {
            println!("{text}");
        }
        ExitCode::SUCCESS
    } else {
        eprintln!("orderfleet: {text}");
        ExitCode::from(1)
    }
}

async fn refund(args: RefundArgs) -> Result<ExitCode> {
    let a = &args.action;
    let (db, order_id, operator) = match prepare(a, &args.order_id).await? {
        Ok(found) => found,
        Err(code) => return Ok(code),
    };
    let plan = match desk::plan_refund(&db, &order_id, args.amount.as_deref()).await? {
        Ok(plan) => plan,
        Err(why) => {
            let value = serde_json::json!({"order_id": order_id, "action": "refund",
                                           "refused": why});
            return Ok(outcome(a.json, value, &why, false));
        }
    };
    if a.dry_run {
        let text = format!(
            "dry run: would {}, as {operator} because {:?}; nothing was published or recorded",
            plan.describe(),
            a.reason
        );
        let value = serde_json::json!({"dry_run": true, "action": "refund", "plan": plan,
                                       "operator": operator, "reason": a.reason});
        return Ok(outcome(a.json, value, &text, true));
    }
    let action = Action::Refund {
        amount_minor: plan.amount.amount_minor,
    };
    let id = desk::request(&db, &order_id, action, a.reason.trim(), &operator).await?;
    tracing::info!(order_id = %order_id, action_id = id, operator = %operator,
        amount_minor = plan.amount.amount_minor, "refund requested");
    let text = format!(
        "requested (action {id}): {}; payments applies it, see `orderfleet order show {order_id}`",
        plan.describe()
    );
    let value = serde_json::json!({"action_id": id, "action": "refund", "plan": plan,
                                   "operator": operator, "reason": a.reason});
    Ok(outcome(a.json, value, &text, true))
}

async fn cancel(args: CancelArgs) -> Result<ExitCode> {
    let a = &args.action;
    let (db, order_id, operator) = match prepare(a, &args.order_id).await? {
        Ok(found) => found,
        Err(code) => return Ok(code),
    };
    let plan = match desk::plan_cancel(&db, &order_id).await? {
        Ok(plan) => plan,
        Err(why) => {
            let value = serde_json::json!({"order_id": order_id, "action": "cancel",
                                           "refused": why});
            return Ok(outcome(a.json, value, &why, false));
        }
    };
    if a.dry_run {
        let text = format!(
            "dry run: order {order_id} is {}: would {}, as {operator} because {:?}; nothing was \
             published or recorded",
            plan.status, plan.effect, a.reason
        );
        let value = serde_json::json!({"dry_run": true, "action": "cancel", "plan": plan,
                                       "operator": operator, "reason": a.reason});
        return Ok(outcome(a.json, value, &text, true));
    }
    let id = desk::request(&db, &order_id, Action::Cancel, a.reason.trim(), &operator).await?;
    tracing::info!(order_id = %order_id, action_id = id, operator = %operator, "cancellation requested");
    let text = format!(
        "requested (action {id}): order {order_id} is {}: orders will {}; see `orderfleet order \
         show {order_id}`",
        plan.status, plan.effect
    );
    let value = serde_json::json!({"action_id": id, "action": "cancel", "plan": plan,
                                   "operator": operator, "reason": a.reason});
    Ok(outcome(a.json, value, &text, true))
}

async fn list(args: ListArgs) -> Result<ExitCode> {
    let pool = crate::store::db::pool(&args.db.database_url, 1)?;
    let db = pool.get().await.context("connecting to the database")?;
    let filter = ListFilter {
        statuses: args.status,
        payment_states: args.payment_state,
        since: args.since,
        stuck_minutes: args.stuck_minutes,
        limit: args.limit,
    };
    let orders = desk::list(&db, &filter).await?;
    if args.json {
        for o in &orders {
            println!("{}", serde_json::to_string(o)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<10} {:<14} {:<15} {:<10} {:>14}  {:<20} UNCHANGED",
        "ORDER", "NUMBER", "STATUS", "PAYMENT", "DELIVERY", "TOTAL", "PLACED"
    );
    let now = Utc::now();
    for o in &orders {
        let total = match (o.total_minor, o.currency.as_deref().map(Currency::new)) {
            (Some(minor), Some(Ok(c))) => format_money(Money::new(minor, c)),
            _ => "-".into(),
        };
        println!(
            "{:<24} {:<10} {:<14} {:<15} {:<10} {:>14}  {:<20} {}",
            o.id,
            o.order_number.as_deref().unwrap_or("-"),
            o.status,
            o.payment_state,
            o.delivery_state,
            total,
            o.placed_at.format("%Y-%m-%d %H:%M:%S"),
            crate::operator::message::format_age((now - o.updated_at).num_seconds().max(0)),
        );
    }
    eprintln!("{} order(s)", orders.len());
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
    if let Some(number) = &o.order_number {
        out += &format!(
            "  {} order {number} ({})\n",
            o.platform.as_deref().unwrap_or("platform"),
            o.platform_order_id.as_deref().unwrap_or("-")
        );
    }
    if o.discount_minor + o.shipping_minor + o.tax_minor > 0 {
        out += &format!(
            "  discount {}  shipping {}  tax {}{}\n",
            money(Some(o.discount_minor)),
            money(Some(o.shipping_minor)),
            money(Some(o.tax_minor)),
            if o.tax_included {
                " (included in the prices)"
            } else {
                ""
            }
        );
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
    if !o.operator_actions.is_empty() {
        out += "\nSUPPORT DESK\n";
        for a in &o.operator_actions {
            let amount = match (a.amount_minor, a.currency.as_deref().map(Currency::new)) {
                (Some(minor), Some(Ok(c))) => format!(" {}", format_money(Money::new(minor, c))),
                _ => String::new(),
            };
            out += &format!(
                "  #{} {}{amount} by {} ({}) at {}: {:?}\n      -> {}{}\n",
                a.id,
                a.action,
                a.operator,
                a.db_user,
                a.requested_at.format("%Y-%m-%d %H:%M:%S"),
                a.reason,
                a.outcome,
                a.outcome_detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
    }
    match &o.dead_letters {
        Some(found) if !found.is_empty() => {
            out += "\nDEAD-LETTERED\n";
            for d in found {
                out += &format!(
                    "  {:<14} {:<28} {:<9} {} ({})\n",
                    d.handler,
                    d.detail_type.as_deref().unwrap_or("(not an event)"),
                    d.kind.as_deref().unwrap_or("-"),
                    d.reason
                        .as_deref()
                        .map(crate::domain::mask::emails_in)
                        .unwrap_or_default(),
                    d.message_id
                );
            }
            out +=
                "  (redrive with `orderfleet dlq redrive HANDLER --filter detail.order_id=...`)\n";
        }
        Some(_) => out += "\nDEAD-LETTERED\n  none\n",
        None => {}
    }
    out += "\nTIMELINE\n";
    for s in &o.timeline {
        out += &format!("  {}  {}\n", s.at.format("%Y-%m-%d %H:%M:%S%.3f"), s.what);
    }
    out
}
