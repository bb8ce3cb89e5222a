//! `orderfleet order show ID`: one order as a support desk needs it, read from the tables the
//! fleet already keeps: its status and money, its lines, the payment and its ledger entries, the
//! reservation, the shipment, the emails, and a timeline built from the times those rows record.
//!
//! It reads nothing personal (no customer, address or token), so the read-only operator role
//! (migrations 0015 and 0016) is enough.
//!
//! The timeline also tells what arrived at each handler (the inbox remembers the order of each
//! event since migration 0018, for as long as the inbox keeps its rows), what was emitted and
//! waits in the outbox or never got out (`outbox_dead_letters`), and the support desk's
//! actions and their outcomes (`operator_actions`). Messages in the handlers' DLQs that mention
//! the order live in SQS: [`dead_letters`] reads them without consuming them, and
//! [`OrderView::add_dead_letters`] puts them in the view.

use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::domain::catalogue;
use crate::domain::events::{Currency, Money};
use crate::domain::names::HandlerName;
use crate::infra::topology::Topology;
use crate::providers::email::view::format_money;
use crate::store::operator_actions::{self, OperatorAction};

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
    /// The platform's order number for humans (`#1042`), for orders from a platform.
    pub order_number: Option<String>,
    pub platform: Option<String>,
    pub platform_order_id: Option<String>,
    /// Discount, shipping and tax in the order's currency (zero when none).
    pub discount_minor: i64,
    pub shipping_minor: i64,
    pub tax_minor: i64,
    pub tax_included: bool,
    pub lines: Vec<Line>,
    pub payment: Option<Payment>,
    pub ledger: Vec<Posting>,
    pub shipment: Option<Shipment>,
    pub emails: Vec<Email>,
    /// The support desk's refunds and cancellations, oldest first.
    pub operator_actions: Vec<OperatorAction>,
    /// Events about the order and the handlers that applied them, from the inbox.
    pub events: Vec<EventSeen>,
    /// Messages about the order in the handlers' DLQs; `None` when the DLQs were not read.
    pub dead_letters: Option<Vec<DeadLetter>>,
    /// What happened to the order, oldest first.
    pub timeline: Vec<Step>,
}

/// One event about the order: who emitted it, and which handlers applied it when.
#[derive(Debug, Clone, Serialize)]
pub struct EventSeen {
    pub detail_type: String,
    /// The producer in the catalogue (`orders`, `storefront`, `operator`, ...).
    pub from: String,
    /// `applied` (some handler applied it), `waiting` (in the outbox, not published yet) or
    /// `never_published` (in `outbox_dead_letters`).
    pub state: String,
    pub at: DateTime<Utc>,
    pub applied_by: Vec<String>,
    /// Why it was never published, or the relay's last error.
    pub error: Option<String>,
}

/// A message about the order in a handler's DLQ.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub handler: String,
    pub message_id: String,
    pub detail_type: Option<String>,
    pub kind: Option<String>,
    pub reason: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub receive_count: u32,
}

impl OrderView {
    /// Adds the DLQ messages that mention the order, to the view and its timeline.
    pub fn add_dead_letters(&mut self, found: Vec<DeadLetter>) {
        for d in &found {
            if let Some(at) = d.sent_at {
                self.timeline.push(Step {
                    at,
                    what: format!(
                        "dead-lettered by {}: {} ({})",
                        d.handler,
                        d.detail_type.as_deref().unwrap_or("(not an event)"),
                        d.reason.as_deref().unwrap_or("no reason recorded")
                    ),
                });
            }
        }
        self.timeline.sort_by_key(|s| s.at);
        self.dead_letters = Some(found);
    }
}

/// Reads every handler's DLQ in `topo` and returns the messages whose body mentions
/// `order_id` (as a JSON string, e.g. `"order_id":"ord-1"`), leaving every message in its DLQ:
/// each is received with a short visibility timeout and made visible again at once, as `dlq
/// peek` does (its receive count goes up by one). A DLQ that cannot be read is an error.
pub async fn dead_letters(
    sqs: &aws_sdk_sqs::Client,
    topo: &Topology,
    order_id: &str,
    visibility: Duration,
) -> Result<Vec<DeadLetter>> {
    let needle = serde_json::to_string(order_id).context("encoding the order id")?;
    let stop = CancellationToken::new();
    let mut found = Vec::new();
    for handler in HandlerName::ALL {
        let name = topo.dlq_name(handler);
        let url = match sqs.get_queue_url().queue_name(&name).send().await {
            Ok(out) => out.queue_url().unwrap_or_default().to_string(),
            Err(e) => {
                let e = crate::domain::outcome::error_chain(&e);
                if e.contains("NonExistentQueue") || e.contains("QueueDoesNotExist") {
                    continue; // a fleet without this handler
                }
                anyhow::bail!("finding DLQ {name}: {e}");
            }
        };
        let (messages, _) = crate::operator::plan::peek(sqs, &url, visibility, &[], None, &stop)
            .await
            .with_context(|| format!("reading DLQ {name}"))?;
        for m in messages.into_iter().filter(|m| m.body().contains(&needle)) {
            found.push(DeadLetter {
                handler: handler.as_str().to_string(),
                message_id: m.id().to_string(),
                detail_type: m.detail_type().map(str::to_string),
                kind: m.kind().map(str::to_string),
                reason: m.reason().map(str::to_string),
                sent_at: m.sent_at(),
                receive_count: m.receive_count(),
            });
        }
    }
    Ok(found)
}

/// The producer of `detail_type` as `order show` names it.
fn producer_of(detail_type: &str) -> String {
    match catalogue::spec(detail_type).map(|s| s.producer) {
        Some(catalogue::Producer::Storefront) => "storefront".into(),
        Some(catalogue::Producer::Handler(h)) => h.as_str().into(),
        Some(catalogue::Producer::Operator) => "operator".into(),
        None => "?".into(),
    }
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

/// The order `key` (our id, or the platform's order number, see
/// [`crate::operator::desk::resolve`]), or `None` when there is no such order.
pub async fn show(db: &impl GenericClient, key: &str) -> Result<Option<OrderView>> {
    let Some(id) = crate::operator::desk::resolve(db, key).await? else {
        return Ok(None);
    };
    let id = id.as_str();
    let Some(o) = db
        .query_opt(
            "SELECT id, customer_id, status, reservation_state, payment_state, delivery_state,
                    total_minor, currency::text, placed_at, terminal_at, cancel_reason,
                    rejection_reasons, order_number, platform, platform_order_id,
                    discount_minor, shipping_minor, tax_minor, tax_included
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

    let actions = operator_actions::of_order(db, id).await?;
    let events = events_of(db, id).await?;

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
    let mut last: Option<(&str, DateTime<Utc>)> = None;
    for posting in &ledger {
        // One step per ledger transaction, not per posting (an operator's refunds are several
        // transactions of one kind).
        if last != Some((posting.kind.as_str(), posting.at)) {
            step(Some(posting.at), format!("ledger: {}", posting.kind));
            last = Some((posting.kind.as_str(), posting.at));
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
    for e in &events {
        let what = match e.state.as_str() {
            "applied" => format!(
                "{} (from {}) applied by {}",
                e.detail_type,
                e.from,
                e.applied_by.join(", ")
            ),
            "waiting" => format!(
                "{} (from {}) emitted, waiting to be published{}",
                e.detail_type,
                e.from,
                e.error
                    .as_deref()
                    .map(|x| format!(" (last error: {x})"))
                    .unwrap_or_default()
            ),
            _ => format!(
                "{} (from {}) NEVER PUBLISHED: {}",
                e.detail_type,
                e.from,
                e.error.as_deref().unwrap_or("")
            ),
        };
        step(Some(e.at), what);
    }
    for a in &actions {
        let amount = match (a.amount_minor, a.currency.as_deref().map(Currency::new)) {
            (Some(minor), Some(Ok(c))) => format!(" {}", format_money(Money::new(minor, c))),
            _ => String::new(),
        };
        step(
            Some(a.requested_at),
            format!(
                "operator {} asked to {}{amount}: {}",
                a.operator, a.action, a.reason
            ),
        );
        step(
            a.decided_at,
            format!(
                "operator {} {}: {}",
                a.action,
                a.outcome,
                a.outcome_detail.as_deref().unwrap_or("")
            ),
        );
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
        order_number: o.get(12),
        platform: o.get(13),
        platform_order_id: o.get(14),
        discount_minor: o.get(15),
        shipping_minor: o.get(16),
        tax_minor: o.get(17),
        tax_included: o.get(18),
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
        operator_actions: actions,
        events,
        dead_letters: None,
        timeline,
    }))
}

/// The events about order `id`: applied (from the inbox), waiting in the outbox, or never
/// published (the outbox's dead letters), oldest first.
async fn events_of(db: &impl GenericClient, id: &str) -> Result<Vec<EventSeen>> {
    let applied = db
        .query(
            "SELECT detail_type, min(processed_at), array_agg(handler ORDER BY processed_at)
               FROM processed_messages WHERE order_id = $1
              GROUP BY event_key, detail_type ORDER BY min(processed_at)",
            &[&id],
        )
        .await
        .context("reading the inbox")?;
    let mut events: Vec<EventSeen> = applied
        .iter()
        .map(|r| {
            let detail_type: String = r.get(0);
            EventSeen {
                from: producer_of(&detail_type),
                detail_type,
                state: "applied".into(),
                at: r.get(1),
                applied_by: r.get(2),
                error: None,
            }
        })
        .collect();
    let unsent = db
        .query(
            "SELECT detail_type, created_at, 'waiting', last_error FROM outbox
              WHERE detail->>'order_id' = $1 AND published_at IS NULL
             UNION ALL
             SELECT detail_type, created_at, 'never_published', reason FROM outbox_dead_letters
              WHERE detail->>'order_id' = $1",
            &[&id],
        )
        .await
        .context("reading the outbox")?;
    events.extend(unsent.iter().map(|r| {
        let detail_type: String = r.get(0);
        EventSeen {
            from: producer_of(&detail_type),
            detail_type,
            state: r.get(2),
            at: r.get(1),
            applied_by: Vec::new(),
            error: r.get(3),
        }
    }));
    events.sort_by_key(|e| e.at);
    Ok(events)
}
