//! The support desk's audited actions (`operator_actions`, migration 0018): what an operator
//! asked for (`orderfleet order refund`, `order cancel`) and what came of it.
//!
//! An action is written with the event that carries it by [`request`], which calls the
//! database's `operator_request` (SECURITY DEFINER): the operator role can write neither table
//! itself, so every event under `orderfleet.operator` has its audit row and the other way
//! round. The handler that applies the action records the outcome in its own transaction
//! ([`record_outcome`]), so a retried event records it once with its effect.

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;

use crate::domain::outcome::HandlerError;
use crate::store::db::Cached;

/// What an operator can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Give `amount_minor` of the captured payment back.
    Refund { amount_minor: i64 },
    /// Cancel the order (until it ships).
    Cancel,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Refund { .. } => "refund",
            Action::Cancel => "cancel",
        }
    }
}

/// Records `action` on `order_id` and writes its event to the outbox, in one transaction.
/// Returns the action's id.
pub async fn request(
    db: &impl GenericClient,
    order_id: &str,
    action: Action,
    reason: &str,
    operator: &str,
) -> Result<i64> {
    let amount = match action {
        Action::Refund { amount_minor } => Some(amount_minor),
        Action::Cancel => None,
    };
    let row = db
        .query_one(
            "SELECT operator_request($1, $2, $3, $4, $5)",
            &[&order_id, &action.as_str(), &amount, &reason, &operator],
        )
        .await
        .with_context(|| format!("recording the {} of order {order_id}", action.as_str()))?;
    Ok(row.get(0))
}

/// Writes the outcome of action `id` (of `order_id`) in the caller's transaction: `pending`,
/// `applied` or `refused`, with what happened in words. An outcome already `applied` or
/// `refused` is kept: a late event cannot rewrite a decision.
pub async fn record_outcome(
    db: &(impl Cached + Sync),
    id: i64,
    order_id: &str,
    outcome: &str,
    detail: &str,
) -> Result<(), HandlerError> {
    db.execute_cached(
        "UPDATE operator_actions
            SET outcome = $3, outcome_detail = $4, decided_at = now()
          WHERE id = $1 AND order_id = $2 AND outcome IN ('requested', 'pending')",
        &[&id, &order_id, &outcome, &detail],
    )
    .await
    .map_err(|e| HandlerError::from_db("recording the operator action's outcome", &e))?;
    Ok(())
}

/// Records `outcome` for every cancellation of `order_id` still `pending` (waiting for the
/// parcel to be stopped), in the caller's transaction.
pub async fn settle_pending_cancellations(
    db: &(impl Cached + Sync),
    order_id: &str,
    outcome: &str,
    detail: &str,
) -> Result<(), HandlerError> {
    db.execute_cached(
        "UPDATE operator_actions
            SET outcome = $2, outcome_detail = $3, decided_at = now()
          WHERE order_id = $1 AND action = 'cancel' AND outcome = 'pending'",
        &[&order_id, &outcome, &detail],
    )
    .await
    .map_err(|e| HandlerError::from_db("recording the operator cancellation's outcome", &e))?;
    Ok(())
}

/// One audited action, as `order show` prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OperatorAction {
    pub id: i64,
    pub action: String,
    pub amount_minor: Option<i64>,
    pub currency: Option<String>,
    pub reason: String,
    pub operator: String,
    pub db_user: String,
    pub requested_at: DateTime<Utc>,
    pub outcome: String,
    pub outcome_detail: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
}

/// The actions on `order_id`, oldest first.
pub async fn of_order(db: &impl GenericClient, order_id: &str) -> Result<Vec<OperatorAction>> {
    let rows = db
        .query(
            "SELECT id, action, amount_minor, currency::text, reason, operator, db_user,
                    requested_at, outcome, outcome_detail, decided_at
               FROM operator_actions WHERE order_id = $1 ORDER BY id",
            &[&order_id],
        )
        .await
        .context("reading the operator actions")?;
    Ok(rows
        .iter()
        .map(|r| OperatorAction {
            id: r.get(0),
            action: r.get(1),
            amount_minor: r.get(2),
            currency: r.get(3),
            reason: r.get(4),
            operator: r.get(5),
            db_user: r.get(6),
            requested_at: r.get(7),
            outcome: r.get(8),
            outcome_detail: r.get(9),
            decided_at: r.get(10),
        })
        .collect())
}
