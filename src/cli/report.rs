//! `orderfleet report [--json]`: orders by status, stock per SKU, ledger totals, emails, and
//! the invariant checks of [`crate::operator::report`]. Exits 1 when any invariant is broken.

use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::cli::DatabaseArg;
use crate::domain::events::{Currency, Money};
use crate::operator::report::{self, Report};
use crate::providers::email::view::format_money;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub db: DatabaseArg,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let pool = crate::store::db::pool(&args.db.database_url, 1)?;
    let mut db = pool.get().await.context("connecting to the database")?;
    let r = report::build(&mut db).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&r).context("encoding the report")?
        );
    } else {
        print!("{}", render(&r));
    }
    Ok(if r.holds() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Formats `amount_minor` of `currency` with the decimals of its minor unit (the JSON keeps
/// minor units): `1234.56` EUR, `1200` JPY, `1.250` KWD.
fn money(amount_minor: i64, currency: &str) -> String {
    let Some(code) = Currency::new(currency).ok() else {
        return format!("{amount_minor} (minor units)");
    };
    let text = format_money(Money::new(amount_minor, code));
    // The currency has its own column.
    match text.strip_prefix(currency) {
        Some(amount) => amount.trim_start().to_string(),
        None => text,
    }
}

/// The human-readable report.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "Orders by status");
    for (status, n) in &r.orders_by_status {
        let _ = writeln!(out, "  {status:<16} {n:>8}");
    }
    let _ = writeln!(
        out,
        "  {:<16} {:>8}   ({} in flight)",
        "total", r.orders_total, r.orders_in_flight
    );

    let _ = writeln!(out, "\nStock per SKU");
    let _ = writeln!(
        out,
        "  {:<14} {:<36} {:>8} {:>8} {:>9}",
        "sku", "name", "on hand", "reserved", "available"
    );
    for s in &r.stock {
        let mut name = s.name.clone().unwrap_or_default();
        if name.chars().count() > 36 {
            name = name.chars().take(35).collect::<String>() + "…";
        }
        let _ = writeln!(
            out,
            "  {:<14} {:<36} {:>8} {:>8} {:>9}",
            s.sku, name, s.on_hand, s.reserved, s.available
        );
    }
    if r.stock.is_empty() {
        let _ = writeln!(out, "  (no stock)");
    }

    let _ = writeln!(out, "\nLedger totals (debit positive)");
    for l in &r.ledger {
        let _ = writeln!(
            out,
            "  {:<20} {:<4} {:>14}",
            l.account,
            l.currency,
            money(l.amount_minor, &l.currency)
        );
    }
    if r.ledger.is_empty() {
        let _ = writeln!(out, "  (no postings)");
    }

    if !r.emails_by_kind.is_empty() {
        let _ = writeln!(out, "\nEmails by kind");
        for (kind, n) in &r.emails_by_kind {
            let _ = writeln!(out, "  {kind:<20} {n:>8}");
        }
    }
    if !r.emails_skipped.is_empty() {
        let _ = writeln!(out, "\nEmails skipped");
        for (reason, n) in &r.emails_skipped {
            let _ = writeln!(out, "  {n:>8}  {reason}");
        }
    }

    if !r.needs_attention.is_empty() {
        let _ = writeln!(out, "\nNeeds attention");
        for (kind, a) in &r.needs_attention {
            let _ = writeln!(out, "  {kind}: {} orders", a.orders);
            for e in &a.examples {
                let _ = writeln!(out, "         {e}");
            }
            let _ = writeln!(
                out,
                "         all of them: {}; one: orderfleet order show ID",
                a.command
            );
        }
    }

    if r.outbox_dead_letters > 0 {
        let _ = writeln!(
            out,
            "\nOutbox dead letters: {} event(s) never published (table outbox_dead_letters)",
            r.outbox_dead_letters
        );
    }

    let _ = writeln!(out, "\nInvariants");
    for (name, ok) in &r.invariants {
        let _ = writeln!(out, "  [{}] {name}", if *ok { " ok " } else { "FAIL" });
        for v in r.violations.get(name).into_iter().flatten() {
            let _ = writeln!(out, "         {v}");
        }
    }
    let verdict = if r.holds() {
        "every invariant holds"
    } else {
        "INVARIANTS BROKEN"
    };
    let _ = writeln!(out, "\n{verdict}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_digit_currencies_print_with_two_decimals() {
        assert_eq!(money(123456, "EUR"), "1234.56");
        assert_eq!(money(-5, "USD"), "-0.05");
        assert_eq!(money(0, "GBP"), "0.00");
    }

    #[test]
    fn ledger_totals_print_with_the_decimals_of_their_currency() {
        let total = |currency: &str, amount_minor| crate::operator::report::LedgerTotal {
            account: "revenue".into(),
            currency: currency.into(),
            amount_minor,
        };
        let r = Report {
            orders_by_status: Default::default(),
            orders_total: 0,
            orders_in_flight: 0,
            stock: vec![],
            ledger: vec![
                total("JPY", -1200),
                total("KWD", 1250),
                total("BHD", -5),
                total("EUR", 1250),
            ],
            invariants: Default::default(),
            violations: Default::default(),
            emails_by_kind: Default::default(),
            emails_skipped: Default::default(),
            needs_attention: Default::default(),
            outbox_dead_letters: 0,
        };
        let text = render(&r);
        let line = |code: &str| {
            text.lines()
                .find(|l| l.contains(code))
                .unwrap_or_else(|| panic!("no {code} line in {text}"))
                .split_whitespace()
                .last()
                .unwrap()
                .to_string()
        };
        assert_eq!(line("JPY"), "-1200");
        assert_eq!(line("KWD"), "1.250");
        assert_eq!(line("BHD"), "-0.005");
        assert_eq!(line("EUR"), "12.50");
    }
}
