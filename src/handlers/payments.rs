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
//!
//! A retry is not enough when a compensation overtakes it: the payment row (or its
//! `authorized` state) may have rolled back while the provider kept the hold or the capture.
//! So before each provider call the handler commits a record of the request in
//! `payment_attempts`, in a short transaction of its own ([`Payments::with_attempt_log`]).
//! Before voiding or refunding, [`Payments::settle`] replays any authorize or capture recorded
//! there that our row does not reflect (same key, same outcome at the provider), brings the row
//! up to date, and then releases the hold or refunds the capture.

use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::Pool;

use crate::db::{Cached, Tx};
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
    /// Where provider calls are recorded before they are made, outside the handler's
    /// transaction. `None` records nothing, and a compensation that overtakes a rolled-back
    /// authorize or capture cannot see it.
    attempts: Option<Pool>,
}

impl Payments {
    /// A handler that does not record its provider calls outside its transaction. Prefer
    /// [`Payments::with_attempt_log`].
    pub fn new(provider: Arc<dyn PaymentProvider>) -> Self {
        Payments {
            provider,
            attempts: None,
        }
    }

    /// A handler that commits a record of each provider call to `payment_attempts` through
    /// `pool` before making it. Each call holds a second connection of `pool` briefly while
    /// the handler's transaction holds one.
    pub fn with_attempt_log(provider: Arc<dyn PaymentProvider>, pool: Pool) -> Self {
        Payments {
            provider,
            attempts: Some(pool),
        }
    }

    /// Commits a record of `req` for `operation` before it is sent, so that it survives a
    /// rollback of the handler's transaction. The first record of a key wins.
    async fn record_attempt(
        &self,
        order_id: &str,
        operation: &str,
        req: &ProviderRequest,
    ) -> Result<(), HandlerError> {
        let Some(pool) = &self.attempts else {
            return Ok(());
        };
        let client = pool.get().await.map_err(|e| {
            HandlerError::retry(format!(
                "recording the {operation} attempt for order {order_id}: {e}"
            ))
        })?;
        client
            .execute_cached(
                "INSERT INTO payment_attempts (idempotency_key, order_id, operation,
                     payment_token, amount_minor, currency, authorization_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (idempotency_key) DO NOTHING",
                &[
                    &req.idempotency_key,
                    &order_id,
                    &operation,
                    &req.payment_token,
                    &req.amount.amount_minor,
                    &req.amount.currency.as_str(),
                    &req.authorization_id,
                ],
            )
            .await
            .map_err(|e| HandlerError::from_db("recording the provider attempt", &e))?;
        Ok(())
    }
}

/// The request recorded for `key` in `payment_attempts`, if one was ever about to be sent.
async fn attempted(tx: &Tx, key: &str) -> Result<Option<ProviderRequest>, HandlerError> {
    let row = tx
        .query_opt_cached(
            "SELECT payment_token, amount_minor, currency::text, authorization_id
               FROM payment_attempts WHERE idempotency_key = $1",
            &[&key],
        )
        .await
        .map_err(|e| HandlerError::from_db("reading the provider attempts", &e))?;
    let Some(r) = row else { return Ok(None) };
    let currency: String = r.get(2);
    let currency = Currency::new(&currency)
        .map_err(|e| HandlerError::permanent(format!("provider attempt {key}: {e}")))?;
    Ok(Some(ProviderRequest {
        idempotency_key: key.to_string(),
        payment_token: r.get(0),
        amount: Money::new(r.get(1), currency),
        authorization_id: r.get(3),
    }))
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
    tx: &Tx,
    order_id: &str,
    seed: Option<(Money, &str)>,
) -> Result<Option<Payment>, HandlerError> {
    if let Some((amount, token)) = seed {
        tx.execute_cached(
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
        .query_opt_cached(
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

async fn lock_existing(tx: &Tx, order_id: &str) -> Result<Payment, HandlerError> {
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
    tx: &Tx,
    order_id: &str,
    set: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(), HandlerError> {
    let sql = format!("UPDATE payments SET {set}, updated_at = now() WHERE order_id = $1");
    let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&order_id];
    all.extend_from_slice(params);
    tx.execute_cached(&sql, &all)
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
        let req = p.request(key.clone(), p.amount);
        self.record_attempt(&d.order_id, "authorize", &req).await?;
        let outcome = self
            .provider
            .authorize(&req)
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
        let req = p.request(key.clone(), p.amount);
        self.record_attempt(&d.order_id, "capture", &req).await?;
        let outcome = self
            .provider
            .capture(&req)
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
        let p = self.reconcile(cx.tx, p).await?;
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
                let req = p.request(key.clone(), p.amount);
                self.record_attempt(&order_id, "void", &req).await?;
                match self
                    .provider
                    .void(&req)
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
                let req = p.request(key.clone(), amount);
                self.record_attempt(&order_id, "refund", &req).await?;
                let reference = match self
                    .provider
                    .refund(&req)
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

    /// Brings a payment about to be compensated up to what the provider did: an authorize or
    /// capture recorded in `payment_attempts` whose transaction rolled back is replayed with its
    /// key (the provider returns the outcome it already decided, or decides now, once), and its
    /// outcome is written to the row, so that `settle` voids a hold nobody recorded and refunds
    /// a capture nobody recorded. A replay emits nothing: `settle` confirms with its one event.
    async fn reconcile(&self, tx: &Tx, mut p: Payment) -> Result<Payment, HandlerError> {
        let order_id = p.order_id.clone();
        if p.state == State::Pending {
            let key = format!("auth:{order_id}");
            if let Some(req) = attempted(tx, &key).await? {
                match self
                    .provider
                    .authorize(&req)
                    .await
                    .map_err(|e| provider_error("authorize (replay)", &order_id, e))?
                {
                    ProviderOutcome::Approved { reference } => {
                        tracing::warn!(order_id = %order_id, authorization_id = %reference,
                            "found an authorization whose transaction rolled back");
                        update(
                            tx,
                            &order_id,
                            "state = 'authorized', authorization_id = $2, authorize_key = $3,
                             payment_token = $4",
                            &[&reference, &key, &req.payment_token],
                        )
                        .await?;
                        p.state = State::Authorized;
                        p.authorization_id = Some(reference);
                        p.token = req.payment_token;
                    }
                    ProviderOutcome::Declined { code, message } => {
                        update(
                            tx,
                            &order_id,
                            "state = 'failed', failure_code = $2, failure_message = $3,
                             authorize_key = $4",
                            &[&code, &message, &key],
                        )
                        .await?;
                        p.state = State::Failed;
                    }
                }
            }
        }
        if p.state == State::Authorized {
            let key = format!("capture:{order_id}");
            if let Some(req) = attempted(tx, &key).await? {
                match self
                    .provider
                    .capture(&req)
                    .await
                    .map_err(|e| provider_error("capture (replay)", &order_id, e))?
                {
                    ProviderOutcome::Approved { reference } => {
                        tracing::warn!(order_id = %order_id, capture_id = %reference,
                            "found a capture whose transaction rolled back");
                        update(
                            tx,
                            &order_id,
                            "state = 'captured', capture_id = $2, capture_key = $3,
                             captured_minor = $4",
                            &[&reference, &key, &req.amount.amount_minor],
                        )
                        .await?;
                        if req.amount.amount_minor > 0 {
                            ledger::capture(tx, &order_id, req.amount).await?;
                        }
                        p.state = State::Captured;
                        p.captured_minor = req.amount.amount_minor;
                    }
                    // Nothing was taken: the hold is still there, and settle voids it.
                    ProviderOutcome::Declined { .. } => {}
                }
            }
        }
        Ok(p)
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

    fn group_commit(&self) -> bool {
        self.provider.answers_locally()
    }

    /// The order-id locks, then the payment rows, each in order-id order. The locks cover
    /// the orders whose payment row an event of the group is about to create.
    async fn lock_group(
        &self,
        tx: &Tx,
        events: &[&Envelope],
        _state: &mut crate::handlers::GroupState,
    ) -> Result<(), HandlerError> {
        let ids = crate::handlers::sorted_order_ids(events);
        crate::handlers::lock_order_ids(tx, "payments", &ids).await?;
        tx.execute_cached(
            "SELECT 1 FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
            &[&ids],
        )
        .await
        .map_err(|e| HandlerError::from_db("locking the payments", &e))?;
        Ok(())
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
