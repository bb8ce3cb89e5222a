//! The support desk's actions and lists: `orderfleet order refund`, `order cancel` and
//! `order list` (issue 15, part 2). `order show` is [`crate::operator::order`].
//!
//! A refund or a cancellation is checked here first, against what the tables say now, so that
//! an operator hears at once why it cannot be done and nothing is published. That check is a
//! courtesy: two operators may act at once, so the handler that applies the action (payments
//! for a refund, orders for a cancellation) checks again under the order's lock, and only that
//! check holds. What passes is recorded with its event in one transaction
//! ([`crate::store::operator_actions::request`]).

use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;

use crate::domain::events::{Currency, Money};
use crate::providers::email::view::format_money;
use crate::store::operator_actions::{self, Action};

/// The order an operator means by `key`: our id, or the platform's order number as the
/// customer quotes it (`#1042` or `1042`). `None` when there is no such order; an error when a
/// number names orders of several platforms.
pub async fn resolve(db: &impl GenericClient, key: &str) -> Result<Option<String>> {
    let key = key.trim();
    if db
        .query_opt("SELECT 1 FROM orders WHERE id = $1", &[&key])
        .await
        .context("looking the order up")?
        .is_some()
    {
        return Ok(Some(key.to_string()));
    }
    let bare = key.trim_start_matches('#');
    if bare.is_empty() {
        return Ok(None);
    }
    let rows = db
        .query(
            "SELECT id, coalesce(platform, '-') FROM orders
              WHERE order_number IN ($1, '#' || $1) ORDER BY id LIMIT 10",
            &[&bare],
        )
        .await
        .context("looking the order number up")?;
    match rows.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.get(0))),
        many => {
            let ids: Vec<String> = many
                .iter()
                .map(|r| format!("{} ({})", r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect();
            bail!(
                "order number {key} names several orders: {}; give the order's id",
                ids.join(", ")
            )
        }
    }
}

/// A refund the desk may request, with the figures it was checked against.
#[derive(Debug, Clone, Serialize)]
pub struct RefundPlan {
    pub order_id: String,
    pub amount: Money,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    /// Refunds requested and not applied or refused yet: counted as gone.
    pub requested_minor: i64,
}

impl RefundPlan {
    /// What the plan does, in one line.
    pub fn describe(&self) -> String {
        let m = |minor| format_money(Money::new(minor, self.amount.currency));
        format!(
            "refund {} of order {} (captured {}, refunded {}{}; {} refundable after this)",
            format_money(self.amount),
            self.order_id,
            m(self.captured_minor),
            m(self.refunded_minor),
            if self.requested_minor > 0 {
                format!(
                    ", {} more requested and not applied yet",
                    m(self.requested_minor)
                )
            } else {
                String::new()
            },
            m(self.captured_minor
                - self.refunded_minor
                - self.requested_minor
                - self.amount.amount_minor)
        )
    }
}

/// Checks a refund of `amount` (a decimal in the order's currency, e.g. `12.50`; all that is
/// left when `None`) of `order_id`. `Err` is the refusal, in words for the operator.
pub async fn plan_refund(
    db: &impl GenericClient,
    order_id: &str,
    amount: Option<&str>,
) -> Result<std::result::Result<RefundPlan, String>> {
    let row = db
        .query_opt(
            "SELECT p.state, p.currency::text, p.captured_minor, p.refunded_minor,
                    (SELECT coalesce(sum(a.amount_minor), 0)::bigint FROM operator_actions a
                      WHERE a.order_id = p.order_id AND a.action = 'refund'
                        AND a.outcome = 'requested')
               FROM payments p WHERE p.order_id = $1",
            &[&order_id],
        )
        .await
        .context("reading the payment")?;
    let Some(row) = row else {
        return Ok(Err(format!(
            "order {order_id} has no payment yet: nothing was captured, so nothing can be refunded"
        )));
    };
    let (state, currency): (String, String) = (row.get(0), row.get(1));
    let (captured, refunded, requested): (i64, i64, i64) = (row.get(2), row.get(3), row.get(4));
    let currency = Currency::new(&currency)
        .map_err(|e| anyhow::anyhow!("payment of {order_id} has a bad currency: {e}"))?;
    let m = |minor| format_money(Money::new(minor, currency));
    if !matches!(state.as_str(), "captured" | "refunded") || captured == 0 {
        return Ok(Err(format!(
            "order {order_id}'s payment is {state}: nothing was captured, so nothing can be \
             refunded{}",
            if state == "authorized" {
                " (cancel the order instead: that releases the hold)"
            } else {
                ""
            }
        )));
    }
    let left = captured - refunded - requested;
    let figures = format!(
        "captured {}, refunded {}{}",
        m(captured),
        m(refunded),
        if requested > 0 {
            format!(", {} more requested and not applied yet", m(requested))
        } else {
            String::new()
        }
    );
    let amount = match amount {
        None if left <= 0 => {
            return Ok(Err(format!(
                "order {order_id} has nothing left to refund ({figures})"
            )))
        }
        None => Money::new(left, currency),
        Some(text) => match Money::parse_decimal(text.trim(), currency) {
            Ok(a) if a.amount_minor > 0 => a,
            Ok(_) => {
                return Ok(Err(format!(
                    "--amount {text}: a refund must be more than zero"
                )))
            }
            Err(e) => {
                return Ok(Err(format!(
                    "--amount {text}: {e} (give it in {currency}, e.g. 12.50)"
                )))
            }
        },
    };
    if amount.amount_minor > left {
        return Ok(Err(format!(
            "refusing to refund {} of order {order_id}: that is more than is left to refund \
             ({figures}; at most {} can be refunded)",
            format_money(amount),
            m(left.max(0))
        )));
    }
    Ok(Ok(RefundPlan {
        order_id: order_id.to_string(),
        amount,
        captured_minor: captured,
        refunded_minor: refunded,
        requested_minor: requested,
    }))
}

/// A cancellation the desk may request: what it will do.
#[derive(Debug, Clone, Serialize)]
pub struct CancelPlan {
    pub order_id: String,
    pub status: String,
    pub effect: String,
}

/// Checks a cancellation of `order_id`. `Err` is the refusal, in words for the operator.
pub async fn plan_cancel(
    db: &impl GenericClient,
    order_id: &str,
) -> Result<std::result::Result<CancelPlan, String>> {
    let row = db
        .query_one(
            "SELECT status, delivery_state, tracking_number FROM orders WHERE id = $1",
            &[&order_id],
        )
        .await
        .context("reading the order")?;
    let (status, delivery, tracking): (String, String, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    let effect = match status.as_str() {
        "accepted" => "cancel it at once: the reservation is released and the payment voided",
        "ready_to_ship" => {
            "ask fulfillment to stop the parcel, then cancel it; if the parcel has left by \
             then, the cancellation is refused (see `order show`)"
        }
        "cancelling" | "cancelled" => {
            return Ok(Err(format!("order {order_id} is {status} already")))
        }
        "rejected" => {
            return Ok(Err(format!(
                "order {order_id} was rejected: there is nothing to cancel"
            )))
        }
        _ => {
            return Ok(Err(format!(
                "order {order_id} has shipped ({status}, delivery {delivery}, tracking {}): it \
                 can no longer be cancelled; refund it instead with `orderfleet order refund`",
                tracking.as_deref().unwrap_or("none")
            )))
        }
    };
    if delivery != "pending" {
        return Ok(Err(format!(
            "order {order_id} has shipped (delivery {delivery}): refund it instead"
        )));
    }
    Ok(Ok(CancelPlan {
        order_id: order_id.to_string(),
        status,
        effect: effect.to_string(),
    }))
}

/// Records `action` of `order_id` with its event (see [`operator_actions::request`]).
pub async fn request(
    db: &impl GenericClient,
    order_id: &str,
    action: Action,
    reason: &str,
    operator: &str,
) -> Result<i64> {
    operator_actions::request(db, order_id, action, reason, operator).await
}

/// Which orders `order list` shows.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Any of these statuses (all when empty).
    pub statuses: Vec<String>,
    /// Any of these payment states, e.g. `capture_failed` (all when empty).
    pub payment_states: Vec<String>,
    /// Placed at or after.
    pub since: Option<DateTime<Utc>>,
    /// Not terminal, and unchanged for at least this many minutes.
    pub stuck_minutes: Option<i32>,
    pub limit: i64,
}

/// One order in a list.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub id: String,
    pub order_number: Option<String>,
    pub status: String,
    pub payment_state: String,
    pub delivery_state: String,
    pub total_minor: Option<i64>,
    pub currency: Option<String>,
    pub placed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The orders matching `f`, oldest first.
pub async fn list(db: &impl GenericClient, f: &ListFilter) -> Result<Vec<Listed>> {
    let rows = db
        .query(
            "SELECT id, order_number, status, payment_state, delivery_state, total_minor,
                    currency::text, placed_at, updated_at
               FROM orders
              WHERE (cardinality($1::text[]) = 0 OR status = ANY($1))
                AND (cardinality($2::text[]) = 0 OR payment_state = ANY($2))
                AND ($3::timestamptz IS NULL OR placed_at >= $3)
                AND ($4::int IS NULL
                     OR (status <> ALL($6) AND updated_at < now() - make_interval(mins => $4)))
              ORDER BY placed_at, id LIMIT $5",
            &[
                &f.statuses,
                &f.payment_states,
                &f.since,
                &f.stuck_minutes,
                &f.limit,
                &crate::operator::report::TERMINAL_STATUSES.as_slice(),
            ],
        )
        .await
        .context("listing orders")?;
    Ok(rows
        .iter()
        .map(|r| Listed {
            id: r.get(0),
            order_number: r.get(1),
            status: r.get(2),
            payment_state: r.get(3),
            delivery_state: r.get(4),
            total_minor: r.get(5),
            currency: r.get(6),
            placed_at: r.get(7),
            updated_at: r.get(8),
        })
        .collect())
}
