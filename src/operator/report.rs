//! What `orderfleet report` shows: orders by status, stock per SKU, ledger totals, emails sent,
//! and the invariants that must hold whatever the fleet went through, each with examples of
//! what breaks it.
//!
//! The money invariants read the ledger (the postings on `payments_clearing`, i.e. what the
//! provider owes us per order) and the payments table side by side, so a movement recorded in
//! one but not the other shows up. They judge orders whose money is settled: completed,
//! cancelled, rejected and returned orders, and shipped orders whose capture is recorded (a
//! shipped order waiting for its capture is in flight, not wrong). Run the report after
//! `orderfleet wait` to judge every order.
//!
//! One invariant reads the provider's side instead: every authorization the provider approved
//! for a cancelled or rejected order was voided there (or captured and refunded). Our tables
//! can say `voided` while the provider still holds the customer's money (a hold placed by a
//! transaction that then lost its row), so only the provider's records can show it. Locally
//! those are the sandbox's `sandbox_provider_calls`, keyed `auth:<order>`, `void:<order>`, ...;
//! with a real provider that table is empty and the check must be made against its records.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use deadpool_postgres::GenericClient;
use serde::Serialize;

/// Statuses where money and stock are settled.
pub const TERMINAL_STATUSES: [&str; 4] = ["completed", "cancelled", "returned", "rejected"];

/// Violations listed per invariant, at most.
const EXAMPLES: i64 = 10;

/// One SKU's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StockLine {
    pub sku: String,
    /// The product's name from its catalogue document, when it has one.
    pub name: Option<String>,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
}

/// The balance of one ledger account in one currency (positive: debit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerTotal {
    pub account: String,
    pub currency: String,
    pub amount_minor: i64,
}

/// Everything the report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// status → number of orders.
    pub orders_by_status: BTreeMap<String, i64>,
    pub orders_total: i64,
    /// Orders not yet in a terminal status.
    pub orders_in_flight: i64,
    pub stock: Vec<StockLine>,
    pub ledger: Vec<LedgerTotal>,
    /// invariant name → holds.
    pub invariants: BTreeMap<String, bool>,
    /// invariant name → up to ten examples of what breaks it (only for broken ones).
    pub violations: BTreeMap<String, Vec<String>>,
    /// email kind → number sent (or refused for good); empty when the notifications schema
    /// is not there. Skipped emails are not counted here.
    pub emails_by_kind: BTreeMap<String, i64>,
    /// Why emails were not sent (a suppressed address, a marketing opt-out) → how many.
    pub emails_skipped: BTreeMap<String, i64>,
    /// What a person must look at: kind of trouble → the orders in it. Not an invariant: the
    /// fleet did the right thing, but it cannot finish these orders alone. Only kinds with
    /// orders in them are listed.
    pub needs_attention: BTreeMap<String, Attention>,
    /// Events in `outbox_dead_letters`: emitted, but never published, because EventBridge
    /// will not accept them (see [`crate::store::outbox`]).
    pub outbox_dead_letters: i64,
}

/// Orders in one kind of trouble.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attention {
    /// How many orders.
    pub orders: i64,
    /// Up to ten of them, described.
    pub examples: Vec<String>,
    /// The `orderfleet` command that lists them all, to act on them one by one.
    pub command: String,
}

impl Report {
    /// Whether every invariant holds.
    pub fn holds(&self) -> bool {
        self.invariants.values().all(|&ok| ok)
    }
}

/// Orders by status, and how many are settled or still moving: what `report`, `wait` and
/// `watch` count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OrderCounts {
    /// status → number of orders.
    pub by_status: BTreeMap<String, i64>,
    pub total: i64,
    /// Orders in one of the [`TERMINAL_STATUSES`].
    pub terminal: i64,
    /// Orders not yet in a terminal status.
    pub in_flight: i64,
}

impl OrderCounts {
    /// The totals of `by_status`.
    pub fn new(by_status: BTreeMap<String, i64>) -> Self {
        let total = by_status.values().sum();
        let terminal = by_status
            .iter()
            .filter(|(s, _)| TERMINAL_STATUSES.contains(&s.as_str()))
            .map(|(_, n)| n)
            .sum();
        OrderCounts {
            by_status,
            total,
            terminal,
            in_flight: total - terminal,
        }
    }

    /// Orders in `status` (0 when there are none).
    pub fn status(&self, status: &str) -> i64 {
        self.by_status.get(status).copied().unwrap_or(0)
    }
}

/// Counts the orders whose id starts with `id_prefix` (`""`: every order) by status.
pub async fn count_orders(db: &impl GenericClient, id_prefix: &str) -> Result<OrderCounts> {
    let by_status = db
        .query(
            "SELECT status, count(*) FROM orders
              WHERE left(id, length($1)) = $1 GROUP BY status ORDER BY status",
            &[&id_prefix],
        )
        .await
        .context("counting orders by status")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(OrderCounts::new(by_status))
}

/// The `emails` table in figures: every row by kind, and the sent ones by transport.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EmailCounts {
    /// kind → emails recorded (sent or failed for good).
    pub by_kind: BTreeMap<String, i64>,
    /// transport (`file`, `smtp`, `ses`) → emails it accepted.
    pub sent_by_transport: BTreeMap<String, i64>,
    pub sent: i64,
    /// Emails no transport will ever deliver (`failed_permanent`).
    pub failed: i64,
}

/// Counts the emails of orders whose id starts with `order_id_prefix` (`""`: every email);
/// all zero when the notifications schema is not there.
pub async fn count_emails(db: &impl GenericClient, order_id_prefix: &str) -> Result<EmailCounts> {
    let exists: bool = db
        .query_one("SELECT to_regclass('emails') IS NOT NULL", &[])
        .await
        .context("looking for the emails table")?
        .get(0);
    let mut counts = EmailCounts::default();
    if !exists {
        return Ok(counts);
    }
    let rows = db
        .query(
            "SELECT kind::text, transport::text, status::text, count(*) FROM emails
              WHERE left(order_id, length($1)) = $1 GROUP BY 1, 2, 3",
            &[&order_id_prefix],
        )
        .await
        .context("counting emails")?;
    for r in rows {
        let (kind, transport, status, n): (String, String, String, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if status != "skipped" {
            *counts.by_kind.entry(kind).or_default() += n;
        }
        match status.as_str() {
            "sent" => {
                counts.sent += n;
                *counts.sent_by_transport.entry(transport).or_default() += n;
            }
            "failed_permanent" => counts.failed += n,
            _ => {}
        }
    }
    Ok(counts)
}

/// Per-order money, shared by the money invariants: the order, what the ledger moved on
/// `payments_clearing` for it, and what the payments table says.
const ORDER_MONEY: &str = "
WITH clearing AS (
    SELECT t.order_id, t.kind, p.amount_minor, p.currency
      FROM ledger_transactions t
      JOIN ledger_postings p ON p.transaction_id = t.id
      JOIN ledger_accounts a ON a.id = p.account_id
     WHERE a.name = 'payments_clearing'
),
money AS (
    SELECT o.id, o.status, o.total_minor, o.currency::text AS currency,
           coalesce(sum(c.amount_minor) FILTER (WHERE c.kind = 'capture'), 0)::bigint AS captured,
           coalesce(sum(c.amount_minor), 0)::bigint AS net,
           count(c.order_id) FILTER (WHERE c.currency <> o.currency) AS foreign_postings,
           pay.state AS payment_state,
           coalesce(pay.captured_minor, 0) AS pay_captured,
           coalesce(pay.refunded_minor, 0) AS pay_refunded
      FROM orders o
      LEFT JOIN clearing c ON c.order_id = o.id
      LEFT JOIN payments pay ON pay.order_id = o.id
     GROUP BY o.id, pay.order_id
)
";

/// An invariant: its name, and a query returning one text row per violation.
struct Check {
    name: &'static str,
    sql: String,
}

fn checks() -> Vec<Check> {
    let money = |filter: &str| {
        format!(
            "{ORDER_MONEY}
             SELECT format('order %s (%s): total %s %s, ledger captured %s and net %s, \
                            payments captured %s refunded %s (%s)',
                           id, status, total_minor, currency, captured, net,
                           pay_captured, pay_refunded, coalesce(payment_state, 'no payment'))
               FROM money WHERE {filter} ORDER BY id LIMIT {EXAMPLES}"
        )
    };
    vec![
        Check {
            name: "every_ledger_transaction_balances",
            sql: format!(
                "SELECT format('transaction %s (%s, order %s): %s %s left over',
                               t.id, t.kind, t.order_id, coalesce(sum(p.amount_minor), 0),
                               coalesce(p.currency::text, 'no postings'))
                   FROM ledger_transactions t
                   LEFT JOIN ledger_postings p ON p.transaction_id = t.id
                  GROUP BY t.id, p.currency
                 HAVING coalesce(sum(p.amount_minor), 0) <> 0 OR count(p.id) = 0
                  ORDER BY t.id LIMIT {EXAMPLES}"
            ),
        },
        Check {
            name: "ledger_sums_to_zero_per_currency",
            sql: "SELECT format('%s sums to %s', currency, sum(amount_minor))
                    FROM ledger_postings GROUP BY currency HAVING sum(amount_minor) <> 0
                   ORDER BY currency"
                .into(),
        },
        Check {
            name: "no_stock_is_negative",
            sql: format!(
                "SELECT format('%s: on hand %s, reserved %s', sku, on_hand, reserved)
                   FROM stock WHERE on_hand < 0 OR reserved < 0 OR reserved > on_hand
                  ORDER BY sku LIMIT {EXAMPLES}"
            ),
        },
        Check {
            name: "reserved_stock_equals_open_reservations",
            sql: format!(
                "SELECT format('%s: stock says %s reserved, open reservations hold %s',
                               coalesce(s.sku, r.sku), coalesce(s.reserved, 0), coalesce(r.open, 0))
                   FROM stock s
                   FULL JOIN (SELECT sku, sum(quantity) AS open FROM reservations
                               WHERE state = 'reserved' GROUP BY sku) r ON r.sku = s.sku
                  WHERE coalesce(s.reserved, 0) <> coalesce(r.open, 0)
                  ORDER BY 1 LIMIT {EXAMPLES}"
            ),
        },
        Check {
            name: "shipped_and_completed_orders_captured_exactly_their_total",
            sql: money(
                "(status = 'completed' OR (status = 'shipped' AND payment_state = 'captured'))
                 AND (captured <> total_minor OR net <> total_minor OR pay_captured <> total_minor
                      OR pay_refunded <> 0 OR foreign_postings > 0)",
            ),
        },
        Check {
            name: "cancelled_and_rejected_orders_moved_no_money",
            sql: money(
                "status IN ('cancelled', 'rejected') AND (net <> 0 OR pay_captured <> pay_refunded)",
            ),
        },
        Check {
            name: "returned_orders_moved_net_zero_money",
            sql: money(
                "status = 'returned' AND (net <> 0 OR pay_captured <> pay_refunded)",
            ),
        },
        Check {
            name: "settled_orders_hold_no_authorization",
            sql: money(
                "status IN ('completed', 'cancelled', 'returned', 'rejected')
                 AND payment_state IN ('pending', 'authorized')",
            ),
        },
        Check {
            // Read from the provider's side: the sandbox's record of every call (with a real
            // provider that table is empty and this holds trivially; check its own records).
            // A hold is released by its void, or consumed by a capture that was refunded.
            name: "cancelled_and_rejected_orders_left_no_hold_at_the_provider",
            sql: format!(
                "WITH approved AS (
                     SELECT idempotency_key, operation, amount_minor, currency::text AS currency,
                            result->>'reference' AS reference
                       FROM sandbox_provider_calls WHERE result->>'outcome' = 'approved'
                 )
                 SELECT format('order %s (%s): authorization %s of %s %s approved at the \
                                provider and never voided',
                               o.id, o.status, a.reference, a.amount_minor, a.currency)
                   FROM orders o
                   JOIN approved a ON a.idempotency_key = 'auth:' || o.id
                                  AND a.operation = 'authorize'
                  WHERE o.status IN ('cancelled', 'rejected')
                    AND NOT EXISTS (SELECT 1 FROM approved v
                                     WHERE v.idempotency_key = 'void:' || o.id
                                       AND v.operation = 'void')
                    AND NOT (EXISTS (SELECT 1 FROM approved c
                                      WHERE c.idempotency_key = 'capture:' || o.id
                                        AND c.operation = 'capture')
                             AND EXISTS (SELECT 1 FROM approved r
                                          WHERE r.idempotency_key = 'refund:' || o.id
                                            AND r.operation = 'refund'))
                  ORDER BY o.id LIMIT {EXAMPLES}"
            ),
        },
        Check {
            name: "settled_orders_hold_no_stock",
            sql: format!(
                "SELECT format('order %s (%s) still reserves %s units of %s',
                               o.id, o.status, r.quantity, r.sku)
                   FROM orders o JOIN reservations r ON r.order_id = o.id
                  WHERE o.status IN ('completed', 'cancelled', 'returned', 'rejected')
                    AND r.state = 'reserved'
                  ORDER BY o.id, r.sku LIMIT {EXAMPLES}"
            ),
        },
    ]
}

/// Orders the fleet cannot finish alone: kind, and a query returning one row per order with
/// its description and the number of orders of that kind.
/// Orders in flight that have not changed for this long are listed as stuck.
pub const STUCK_MINUTES: i32 = 60;

/// The `order list` command that lists the orders of attention check `name`.
fn attention_command(name: &str) -> String {
    match name {
        "capture_declined_after_shipment" => {
            "orderfleet order list --payment-state capture_failed".into()
        }
        _ => format!("orderfleet order list --stuck-minutes {STUCK_MINUTES}"),
    }
}

fn attention_checks() -> Vec<Check> {
    vec![
        Check {
            // In flight and unchanged for an hour: an event lost or dead-lettered, a worker down.
            // `order show` tells what it waits for.
            name: "stuck_in_flight",
            sql: format!(
                "SELECT format('order %s (%s): unchanged since %s', id, status,
                           to_char(updated_at, 'YYYY-MM-DD HH24:MI:SS')),
                    count(*) OVER ()
               FROM orders
              WHERE status NOT IN ('completed', 'cancelled', 'returned', 'rejected')
                AND updated_at < now() - make_interval(mins => {STUCK_MINUTES})
              ORDER BY updated_at LIMIT {EXAMPLES}"
            ),
        },
        Check {
            // The parcel left, then the provider refused the capture: the order stays shipped with
            // its authorization open, and someone must collect the money or write it off.
            name: "capture_declined_after_shipment",
            sql: format!(
                "SELECT format('order %s (%s): %s %s, tracking %s, capture declined',
                           id, status, total_minor, currency, coalesce(tracking_number, 'none')),
                    count(*) OVER ()
               FROM orders WHERE payment_state = 'capture_failed'
              ORDER BY id LIMIT {EXAMPLES}"
            ),
        },
    ]
}

/// Reads everything and checks every invariant, in one repeatable-read snapshot so that the
/// figures agree with each other while the fleet keeps running.
pub async fn build(db: &mut deadpool_postgres::Client) -> Result<Report> {
    let tx = db
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .context("starting the report's snapshot")?;
    let report = read(&tx).await?;
    tx.commit().await.context("ending the report's snapshot")?;
    Ok(report)
}

async fn read(db: &impl GenericClient) -> Result<Report> {
    let orders = count_orders(db, "").await?;
    let stock = db
        .query(
            "SELECT s.sku, p.doc->>'name', s.on_hand, s.reserved
               FROM stock s LEFT JOIN products p ON p.sku = s.sku ORDER BY s.sku",
            &[],
        )
        .await
        .context("reading stock")?
        .iter()
        .map(|r| {
            let (on_hand, reserved): (i64, i64) = (r.get(2), r.get(3));
            StockLine {
                sku: r.get(0),
                name: r.get(1),
                on_hand,
                reserved,
                available: on_hand - reserved,
            }
        })
        .collect();
    let ledger = crate::store::ledger::balances(db)
        .await
        .context("reading ledger balances")?
        .into_iter()
        .map(|b| LedgerTotal {
            account: b.account,
            currency: b.currency,
            amount_minor: b.amount_minor,
        })
        .collect();
    let mut invariants = BTreeMap::new();
    let mut violations = BTreeMap::new();
    for check in checks() {
        let found: Vec<String> = db
            .query(&check.sql, &[])
            .await
            .with_context(|| format!("checking {}", check.name))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        invariants.insert(check.name.to_string(), found.is_empty());
        if !found.is_empty() {
            violations.insert(check.name.to_string(), found);
        }
    }
    let mut needs_attention = BTreeMap::new();
    for check in attention_checks() {
        let rows = db
            .query(&check.sql, &[])
            .await
            .with_context(|| format!("looking for orders with {}", check.name))?;
        if let Some(first) = rows.first() {
            needs_attention.insert(
                check.name.to_string(),
                Attention {
                    orders: first.get(1),
                    examples: rows.iter().map(|r| r.get(0)).collect(),
                    command: attention_command(check.name),
                },
            );
        }
    }
    Ok(Report {
        orders_by_status: orders.by_status,
        orders_total: orders.total,
        orders_in_flight: orders.in_flight,
        stock,
        ledger,
        invariants,
        violations,
        emails_by_kind: count_emails(db, "").await?.by_kind,
        emails_skipped: emails_skipped(db).await?,
        needs_attention,
        outbox_dead_letters: db
            .query_one("SELECT count(*) FROM outbox_dead_letters", &[])
            .await
            .context("counting the outbox dead letters")?
            .get(0),
    })
}

/// Skipped emails per reason, once migration 0019 added the column.
async fn emails_skipped(db: &impl GenericClient) -> Result<BTreeMap<String, i64>> {
    let exists: bool = db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                             WHERE table_name = 'emails' AND column_name = 'skip_reason')",
            &[],
        )
        .await
        .context("looking for emails.skip_reason")?
        .get(0);
    if !exists {
        return Ok(BTreeMap::new());
    }
    Ok(db
        .query(
            "SELECT skip_reason, count(*) FROM emails WHERE status = 'skipped'
              GROUP BY skip_reason ORDER BY skip_reason",
            &[],
        )
        .await
        .context("counting skipped emails")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
