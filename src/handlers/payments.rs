//! payments: authorizes, captures, voids and refunds through a [`PaymentProvider`], and keeps
//! the double-entry [`ledger`](crate::ledger).
//!
//! | event | payment state | provider call (idempotency key) | emits |
//! |---|---|---|---|
//! | `OrderAccepted` | pending → authorized / failed | authorize (`auth:<order>`) | `PaymentAuthorized` / `PaymentFailed` |
//! | `OrderShipped` | authorized → captured | capture (`capture:<order>`) | `PaymentCaptured` |
//! | `OrderCancelled` | authorized → voided; captured → refunded; pending, failed → voided | void (`void:<order>`) / refund (`refund:<order>`) | `PaymentVoided` / `PaymentRefunded` (always one) |
//! | `DeliveryFailed` | captured → refunded; authorized → voided | refund / void | `PaymentRefunded` / `PaymentVoided` |
//!
//! The payment row is locked `FOR UPDATE` for the whole handler, so events of one order apply
//! one at a time. The provider is called inside that transaction but is not part of it: if the
//! provider acts and the transaction then rolls back, the retry sends the same key and gets
//! the same answer, so nobody is charged twice. Transient provider errors are retried; declines
//! are business outcomes (`PaymentFailed`).

use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::Transaction;

use crate::envelope::Envelope;
use crate::events::{
    self, Currency, DeliveryFailed, Meta, Money, OrderAccepted, OrderCancelled, OrderShipped,
    PaymentAuthorized, PaymentCaptured, PaymentFailed, PaymentRefunded, PaymentStage,
    PaymentVoided,
};
use crate::handlers::{Context, Handler};
use crate::ledger;
use crate::outcome::HandlerError;
use crate::payment_provider::{PaymentProvider, ProviderError, ProviderOutcome, ProviderRequest};

/// The payments handler.
pub struct Payments {
    provider: Arc<dyn PaymentProvider>,
}

impl Payments {
    pub fn new(provider: Arc<dyn PaymentProvider>) -> Self {
        Payments { provider }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Authorized,
    Failed,
    Captured,
    Voided,
    Refunded,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Authorized => "authorized",
            State::Failed => "failed",
            State::Captured => "captured",
            State::Voided => "voided",
            State::Refunded => "refunded",
        }
    }

    fn parse(s: &str) -> Result<Self, HandlerError> {
        Ok(match s {
            "pending" => State::Pending,
            "authorized" => State::Authorized,
            "failed" => State::Failed,
            "captured" => State::Captured,
            "voided" => State::Voided,
            "refunded" => State::Refunded,
            other => {
                return Err(HandlerError::permanent(format!(
                    "unknown payment state {other:?}"
                )))
            }
        })
    }
}

/// A payment row, locked for the rest of the transaction.
struct Payment {
    order_id: String,
    state: State,
    amount: Money,
    captured_minor: i64,
    token: String,
    authorization_id: Option<String>,
}

/// Why a compensation runs.
#[derive(Clone, Copy)]
enum Settle {
    Cancelled,
    Returned,
}

fn provider_error(op: &str, order_id: &str, e: ProviderError) -> HandlerError {
    match e {
        ProviderError::Transient(reason) => {
            HandlerError::retry(format!("{op} for order {order_id}: {reason}"))
        }
        ProviderError::Invalid(reason) => {
            HandlerError::permanent(format!("{op} for order {order_id}: {reason}"))
        }
    }
}

/// Locks the order's payment row, creating it as `pending` with `seed` when it does not exist
/// yet (a cancellation may arrive before the acceptance).
async fn lock(
    tx: &Transaction<'_>,
    order_id: &str,
    seed: Option<(Money, &str)>,
) -> Result<Option<Payment>, HandlerError> {
    if let Some((amount, token)) = seed {
        tx.execute(
            "INSERT INTO payments (order_id, state, amount_minor, currency, payment_token)
             VALUES ($1, 'pending', $2, $3, $4) ON CONFLICT (order_id) DO NOTHING",
            &[
                &order_id,
                &amount.amount_minor,
                &amount.currency.as_str(),
                &token,
            ],
        )
        .await
        .map_err(|e| HandlerError::from_db("creating the payment", &e))?;
    }
    let row = tx
        .query_opt(
            "SELECT state, amount_minor, currency::text, payment_token, authorization_id,
                    captured_minor
               FROM payments WHERE order_id = $1 FOR UPDATE",
            &[&order_id],
        )
        .await
        .map_err(|e| HandlerError::from_db("locking the payment", &e))?;
    let Some(r) = row else { return Ok(None) };
    let currency: String = r.get(2);
    let currency = Currency::new(&currency)
        .map_err(|e| HandlerError::permanent(format!("payment of {order_id}: {e}")))?;
    Ok(Some(Payment {
        order_id: order_id.to_string(),
        state: State::parse(r.get(0))?,
        amount: Money::new(r.get(1), currency),
        token: r.get(3),
        authorization_id: r.get(4),
        captured_minor: r.get(5),
    }))
}

async fn lock_existing(tx: &Transaction<'_>, order_id: &str) -> Result<Payment, HandlerError> {
    lock(tx, order_id, None).await?.ok_or_else(|| {
        HandlerError::permanent(format!("order {order_id} has no payment to act on"))
    })
}

impl Payment {
    fn request(&self, key: String, amount: Money) -> ProviderRequest {
        ProviderRequest {
            idempotency_key: key,
            payment_token: self.token.clone(),
            amount,
            authorization_id: self.authorization_id.clone(),
        }
    }
}

async fn update(
    tx: &Transaction<'_>,
    order_id: &str,
    set: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(), HandlerError> {
    let sql = format!("UPDATE payments SET {set}, updated_at = now() WHERE order_id = $1");
    let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&order_id];
    all.extend_from_slice(params);
    tx.execute(&sql, &all)
        .await
        .map_err(|e| HandlerError::from_db("updating the payment", &e))?;
    Ok(())
}

impl Payments {
    async fn authorize(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: OrderAccepted = events::decode(event)?;
        let Some(p) = lock(cx.tx, &d.order_id, Some((d.total, &d.payment_token))).await? else {
            return Err(HandlerError::permanent("payment row vanished"));
        };
        if p.state != State::Pending {
            // Decided already, or a cancellation got here first.
            return Ok(());
        }
        let key = format!("auth:{}", d.order_id);
        let outcome = self
            .provider
            .authorize(&p.request(key.clone(), p.amount))
            .await
            .map_err(|e| provider_error("authorize", &d.order_id, e))?;
        match outcome {
            ProviderOutcome::Approved { reference } => {
                update(
                    cx.tx,
                    &d.order_id,
                    "state = 'authorized', authorization_id = $2, authorize_key = $3",
                    &[&reference, &key],
                )
                .await?;
                events::emit(
                    cx,
                    &PaymentAuthorized {
                        meta: Meta::default(),
                        order_id: d.order_id,
                        authorization_id: reference,
                        amount: p.amount,
                    },
                )
            }
            ProviderOutcome::Declined { code, message } => {
                update(
                    cx.tx,
                    &d.order_id,
                    "state = 'failed', failure_code = $2, failure_message = $3, authorize_key = $4",
                    &[&code, &message, &key],
                )
                .await?;
                events::emit(
                    cx,
                    &PaymentFailed {
                        meta: Meta::default(),
                        order_id: d.order_id,
                        stage: PaymentStage::Authorize,
                        code,
                        message,
                    },
                )
            }
        }
    }

    async fn capture(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: OrderShipped = events::decode(event)?;
        let p = lock_existing(cx.tx, &d.order_id).await?;
        match p.state {
            State::Authorized => {}
            // Captured already, or the return overtook the shipment and voided the hold.
            State::Captured | State::Refunded | State::Voided => return Ok(()),
            State::Pending | State::Failed => {
                return Err(HandlerError::permanent(format!(
                    "order {} shipped without an authorization (payment {})",
                    d.order_id,
                    p.state.as_str()
                )))
            }
        }
        let key = format!("capture:{}", d.order_id);
        let outcome = self
            .provider
            .capture(&p.request(key.clone(), p.amount))
            .await
            .map_err(|e| provider_error("capture", &d.order_id, e))?;
        match outcome {
            ProviderOutcome::Approved { reference } => {
                update(
                    cx.tx,
                    &d.order_id,
                    "state = 'captured', capture_id = $2, capture_key = $3, captured_minor = amount_minor",
                    &[&reference, &key],
                )
                .await?;
                if p.amount.amount_minor > 0 {
                    ledger::capture(cx.tx, &d.order_id, p.amount).await?;
                }
                events::emit(
                    cx,
                    &PaymentCaptured {
                        meta: Meta::default(),
                        order_id: d.order_id,
                        capture_id: reference,
                        amount: p.amount,
                    },
                )
            }
            ProviderOutcome::Declined { code, message } => {
                update(
                    cx.tx,
                    &d.order_id,
                    "failure_code = $2, failure_message = $3, capture_key = $4",
                    &[&code, &message, &key],
                )
                .await?;
                events::emit(
                    cx,
                    &PaymentFailed {
                        meta: Meta::default(),
                        order_id: d.order_id,
                        stage: PaymentStage::Capture,
                        code,
                        message,
                    },
                )
            }
        }
    }

    /// Gives the money back, whatever stage the payment reached, and always confirms with one
    /// event so the order can settle: void a hold, refund a capture, or just close a payment
    /// that never held anything.
    async fn settle(
        &self,
        cx: &mut Context<'_>,
        p: Payment,
        why: Settle,
    ) -> Result<(), HandlerError> {
        let order_id = p.order_id.clone();
        match p.state {
            State::Voided | State::Refunded => Ok(()),
            State::Pending | State::Failed => {
                update(cx.tx, &order_id, "state = 'voided'", &[]).await?;
                events::emit(
                    cx,
                    &PaymentVoided {
                        meta: Meta::default(),
                        order_id,
                        authorization_id: None,
                    },
                )
            }
            State::Authorized => {
                let key = format!("void:{order_id}");
                match self
                    .provider
                    .void(&p.request(key.clone(), p.amount))
                    .await
                    .map_err(|e| provider_error("void", &order_id, e))?
                {
                    ProviderOutcome::Approved { .. } => {}
                    ProviderOutcome::Declined { code, message } => {
                        return Err(HandlerError::permanent(format!(
                            "void for order {order_id} declined: {code}: {message}"
                        )))
                    }
                }
                update(cx.tx, &order_id, "state = 'voided', void_key = $2", &[&key]).await?;
                events::emit(
                    cx,
                    &PaymentVoided {
                        meta: Meta::default(),
                        order_id,
                        authorization_id: p.authorization_id,
                    },
                )
            }
            State::Captured => {
                let key = format!("refund:{order_id}");
                let amount = Money::new(p.captured_minor, p.amount.currency);
                let reference = match self
                    .provider
                    .refund(&p.request(key.clone(), amount))
                    .await
                    .map_err(|e| provider_error("refund", &order_id, e))?
                {
                    ProviderOutcome::Approved { reference } => reference,
                    ProviderOutcome::Declined { code, message } => {
                        return Err(HandlerError::permanent(format!(
                            "refund for order {order_id} declined: {code}: {message}"
                        )))
                    }
                };
                update(
                    cx.tx,
                    &order_id,
                    "state = 'refunded', refund_id = $2, refund_key = $3, refunded_minor = captured_minor",
                    &[&reference, &key],
                )
                .await?;
                if amount.amount_minor > 0 {
                    ledger::refund(cx.tx, &order_id, amount).await?;
                }
                tracing::info!(
                    order_id = %order_id,
                    why = match why { Settle::Cancelled => "cancelled", Settle::Returned => "returned" },
                    "payment refunded"
                );
                events::emit(
                    cx,
                    &PaymentRefunded {
                        meta: Meta::default(),
                        order_id,
                        refund_id: reference,
                        amount,
                    },
                )
            }
        }
    }

    async fn cancelled(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: OrderCancelled = events::decode(event)?;
        // Seeded from the event: a cancellation that overtakes the acceptance leaves a voided
        // payment behind, and the late OrderAccepted then authorizes nothing.
        let Some(p) = lock(cx.tx, &d.order_id, Some((d.total, ""))).await? else {
            return Err(HandlerError::permanent("payment row vanished"));
        };
        self.settle(cx, p, Settle::Cancelled).await
    }

    async fn returned(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let d: DeliveryFailed = events::decode(event)?;
        let p = lock_existing(cx.tx, &d.order_id).await?;
        self.settle(cx, p, Settle::Returned).await
    }
}

#[async_trait]
impl Handler for Payments {
    fn name(&self) -> &str {
        "payments"
    }

    async fn handle(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        match event.detail_type.as_str() {
            "OrderAccepted" => self.authorize(event, cx).await,
            "OrderShipped" => self.capture(event, cx).await,
            "OrderCancelled" => self.cancelled(event, cx).await,
            "DeliveryFailed" => self.returned(event, cx).await,
            other => Err(HandlerError::permanent(format!(
                "payments does not handle {other}"
            ))),
        }
    }
}
