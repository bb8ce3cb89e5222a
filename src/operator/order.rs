//! `orderfleet order show ID`: one order as a support desk needs it, read from the tables the
//! fleet already keeps: its status and money, its lines, the payment and its ledger entries, the
//! reservation, the shipment, the emails, and a timeline built from the times those rows record.
//!
//! It reads nothing personal (no customer, address or token), so the read-only operator role
//! (migrations 0015 and 0016) is enough. Not shown yet: dead-lettered messages that mention
//! the order (they live in SQS; `orderfleet dlq peek --filter order_id=...` finds them).

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;

/// What `order show` prints.
#[derive(Debug, Clone, Serialize)]
pub struct OrderView {
    pub id: String,
    pub customer_id: Option<String>,
    pub status: String,
    pub reservation_state: String,
    pub payment_state: String,
    pub delivery_state: String,
    pub total_minor: Option<i64>,
    pub currency: Option<String>,
    pub placed_at: DateTime<Utc>,
    pub terminal_at: Option<DateTime<Utc>>,
    pub cancel_reason: Option<String>,
    pub rejection_reasons: Option<serde_json::Value>,
    pub lines: Vec<Line>,
    pub payment: Option<Payment>,
    pub ledger: Vec<Posting>,
    pub shipment: Option<Shipment>,
    pub emails: Vec<Email>,
    /// What happened to the order, oldest first.
    pub timeline: Vec<Step>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_minor: i64,
    /// The reservation's state for this SKU, once inventory decided.
    pub reservation: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Payment {
    pub state: String,
    pub amount_minor: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    pub failure_code: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Posting {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub account: String,
    pub amount_minor: i64,
    pub currency: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Shipment {
    pub state: String,
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
    pub delivery_state: Option<String>,
    pub failure_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Email {
    pub kind: String,
    pub status: String,
    pub recipient_masked: String,
    pub sent_at: Option<DateTime<Utc>>,
    /// Why a `skipped` email was not sent (a suppressed address, a marketing opt-out).
    pub skip_reason: Option<String>,
}

/// One moment of the order's life.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Step {
    pub at: DateTime<Utc>,
    pub what: String,
}

/// The order `id`, or `None` when there is no such order.
pub async fn show(db: &impl GenericClient, id: &str) -> Result<Option<OrderView>> {
    let Some(o) = db
        .query_opt(
            "SELECT id, customer_id, status, reservation_state, payment_state, delivery_state,
                    total_minor, currency::text, placed_at, terminal_at, cancel_reason,
                    rejection_reasons
               FROM orders WHERE id = $1",
            &[&id],
        )
        .await
        .context("reading the order")?
    else {
        return Ok(None);
    };
    let reservations = db
        .query(
            "SELECT sku, state, created_at, updated_at FROM reservations WHERE order_id = $1",
            &[&id],
        )
        .await
        .context("reading the reservation")?;
    let reservation_of = |sku: &str| {
        reservations
            .iter()
            .find(|r| r.get::<_, &str>(0) == sku)
            .map(|r| r.get::<_, String>(1))
    };
    let lines = db
        .query(
            "SELECT sku, quantity, unit_price_minor FROM order_lines
              WHERE order_id = $1 ORDER BY line_no",
            &[&id],
        )
        .await
        .context("reading the lines")?
        .iter()
        .map(|r| Line {
            reservation: reservation_of(r.get(0)),
            sku: r.get(0),
            quantity: r.get(1),
            unit_price_minor: r.get(2),
        })
        .collect();
    let payment_row = db
        .query_opt(
            "SELECT state, amount_minor, captured_minor, refunded_minor, failure_code,
                    created_at, updated_at
               FROM payments WHERE order_id = $1",
            &[&id],
        )
        .await
        .context("reading the payment")?;
    let ledger: Vec<Posting> = db
        .query(
            "SELECT t.created_at, t.kind, a.name, p.amount_minor, p.currency::text
               FROM ledger_transactions t
               JOIN ledger_postings p ON p.transaction_id = t.id
               JOIN ledger_accounts a ON a.id = p.account_id
              WHERE t.order_id = $1 ORDER BY t.id, p.id",
            &[&id],
        )
        .await
        .context("reading the ledger")?
        .iter()
        .map(|r| Posting {
            at: r.get(0),
            kind: r.get(1),
            account: r.get(2),
            amount_minor: r.get(3),
            currency: r.get(4),
        })
        .collect();
    let shipment_row = db
        .query_opt(
            "SELECT state, carrier, tracking_number, delivery_state, failure_reason,
                    created_at, updated_at
               FROM shipments WHERE order_id = $1",
            &[&id],
        )
        .await
        .context("reading the shipment")?;
    let emails: Vec<Email> = db
        .query(
            "SELECT kind, status, recipient_masked, sent_at, skip_reason FROM emails
              WHERE order_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .context("reading the emails")?
        .iter()
        .map(|r| Email {
            kind: r.get(0),
            status: r.get(1),
            recipient_masked: r.get(2),
            sent_at: r.get(3),
            skip_reason: r.get(4),
        })
        .collect();

    let status: String = o.get(2);
    let placed_at: DateTime<Utc> = o.get(8);
    let terminal_at: Option<DateTime<Utc>> = o.get(9);
    let mut timeline = vec![Step {
        at: placed_at,
        what: "placed".into(),
    }];
    let mut step = |at: Option<DateTime<Utc>>, what: String| {
        if let Some(at) = at {
            timeline.push(Step { at, what });
        }
    };
    if let Some(first) = reservations.first() {
        step(Some(first.get(2)), "inventory decided".into());
        let last: DateTime<Utc> = first.get(3);
        if last != first.get::<_, DateTime<Utc>>(2) {
            step(
                Some(last),
                format!("reservation {}", first.get::<_, String>(1)),
            );
        }
    }
    if let Some(p) = &payment_row {
        step(Some(p.get(5)), "payment opened".into());
        step(Some(p.get(6)), format!("payment {}", p.get::<_, String>(0)));
    }
    let mut last_kind = String::new();
    for posting in &ledger {
        // One step per ledger transaction, not per posting.
        if posting.kind != last_kind {
            step(Some(posting.at), format!("ledger: {}", posting.kind));
            last_kind = posting.kind.clone();
        }
    }
    if let Some(s) = &shipment_row {
        step(Some(s.get(5)), "shipment started".into());
        step(
            Some(s.get(6)),
            format!("shipment {}", s.get::<_, String>(0)),
        );
    }
    for email in &emails {
        step(email.sent_at, format!("email: {}", email.kind));
    }
    step(terminal_at, format!("{status} (terminal)"));
    timeline.sort_by_key(|s| s.at);
    timeline.dedup();

    Ok(Some(OrderView {
        id: o.get(0),
        customer_id: o.get(1),
        status,
        reservation_state: o.get(3),
        payment_state: o.get(4),
        delivery_state: o.get(5),
        total_minor: o.get(6),
        currency: o.get(7),
        placed_at,
        terminal_at,
        cancel_reason: o.get(10),
        rejection_reasons: o.get(11),
        lines,
        payment: payment_row.map(|p| Payment {
            state: p.get(0),
            amount_minor: p.get(1),
            captured_minor: p.get(2),
            refunded_minor: p.get(3),
            failure_code: p.get(4),
        }),
        ledger,
        shipment: shipment_row.map(|s| Shipment {
            state: s.get(0),
            carrier: s.get(1),
            tracking_number: s.get(2),
            delivery_state: s.get(3),
            failure_reason: s.get(4),
        }),
        emails,
        timeline,
    }))
}
