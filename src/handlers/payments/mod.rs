//! payments: authorizes, captures, voids and refunds through a [`PaymentProvider`], and keeps
//! the double-entry [`ledger`](crate::store::ledger).
//!
//! | event | payment state | provider call (idempotency key) | emits |
//! |---|---|---|---|
//! | `OrderAccepted` | pending → authorized / failed | authorize (`auth:<order>`) | `PaymentAuthorized` / `PaymentFailed` |
//! | `OrderShipped` | authorized → captured | capture (`capture:<order>`) | `PaymentCaptured` |
//! | `OrderCancelled` | authorized → voided; captured → refunded; pending, failed → voided | void (`void:<order>`) / refund (`refund:<order>`) | `PaymentVoided` / `PaymentRefunded` (always one) |
//! | `DeliveryFailed` | captured → refunded; authorized → voided | refund / void | `PaymentRefunded` / `PaymentVoided` |
//! | `RefundRequested` (an operator) | captured → captured (part) or refunded (all) | refund (`refund:<order>:<action>`) | `PaymentRefunded` v2, or nothing when refused |
//!
//! A cancellation or a return refunds what is captured and not refunded yet. An operator's
//! refund is checked under the order's lock against that same figure: two operators who ask at
//! once for more than was captured are served in turn, and the second is refused (recorded in
//! `operator_actions`, with the figures) before any provider call. The CLI checks too, but only
//! this check holds.
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
//!
//! ## Rivals, restarts and crashes
//!
//! - **One lock per order, on every path.** Whether an event runs in a group or alone, and
//!   whatever it is (`OrderAccepted`, `OrderCancelled`, `OrderShipped`, `DeliveryFailed`), its
//!   transaction takes the `payments:<order>` advisory lock before it reads whether the payment
//!   row exists ([`Handler::lock_group`] for a group, `lock` for an event alone), and keeps it
//!   to the end. A rival process handling another event of the order waits for it, then reads
//!   what was committed. Without this, a group could read "no row", a cancellation run alone
//!   elsewhere could insert and close the row without calling the provider, and the group's
//!   authorization would then lose its row and leave a hold nobody releases (issue 12).
//! - **No authorize without the lock.** The provider is asked to authorize only by a
//!   transaction that holds the order's lock and found the row absent or `pending`; so no
//!   other transaction can decide the row while the provider holds the card.
//! - **A hold that lost its row anyway is voided.** A rival that writes the row without the
//!   lock (a worker of an older version during a deploy) can still close it under a group's
//!   authorization: the group's insert fails and its events run alone. An `OrderAccepted` or
//!   `OrderCancelled` that finds a row `voided` without an authorization of ours, while
//!   `payment_attempts` records an authorize for the order, replays that authorize with its
//!   key and voids an approved hold with `void:<order>` (`Payments::release_lost_hold`).
//! - **Restart or crash after a provider call.** The attempt record was committed before the
//!   call; the transaction rolls back with the lock. The redelivered event sends the same key
//!   and gets the same answer; a compensation that comes first replays it and releases it.
//!   `orderfleet report` checks, on the provider's records, that no cancelled or rejected
//!   order kept an approved authorization without a void.

mod store;

use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::Pool;

use crate::domain::envelope::Envelope;
use crate::domain::events::Event;
use crate::domain::events::{
    self, DeliveryFailed, Meta, Money, OrderAccepted, OrderCancelled, OrderShipped,
    PaymentAuthorized, PaymentCaptured, PaymentFailed, PaymentRefunded, PaymentStage,
    PaymentVoided, RefundRequested,
};
use crate::domain::outcome::HandlerError;
use crate::handlers::{Context, Handler};
use crate::providers::email::view::format_money;
use crate::providers::payment::{PaymentProvider, ProviderError, ProviderOutcome, ProviderRequest};
use crate::store::db::Tx;
use crate::store::ledger::CaptureParts;
use crate::store::ledger::Movement;
pub use store::Rows;
use store::*;

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

    /// Commits a record of `req` for `operation` before it is sent (see
    /// [`store::record_attempt`]); records nothing without an attempt log.
    async fn record_attempt(
        &self,
        order_id: &str,
        operation: &str,
        req: &ProviderRequest,
    ) -> Result<(), HandlerError> {
        match &self.attempts {
            Some(pool) => store::record_attempt(pool, order_id, operation, req).await,
            None => Ok(()),
        }
    }
}

/// Why a compensation runs.
#[derive(Clone, Copy)]
enum Settle {
    Cancelled,
    Returned,
}

/// The longest a provider call may take; less when the handler's time is shorter (see
/// [`Context::call_timeout`]).
const PROVIDER_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A provider call bounded by the handler's time left, so that its answer can still be recorded
/// and committed; a call cut short is replayed by key on the retry.
async fn bounded_call(
    cx: &Context<'_, Rows>,
    op: &str,
    order_id: &str,
    call: impl std::future::Future<Output = Result<ProviderOutcome, ProviderError>>,
) -> Result<ProviderOutcome, HandlerError> {
    cx.bounded(PROVIDER_CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|limit| {
            Err(ProviderError::Transient(crate::handlers::out_of_time(
                &format!("the provider's {op}"),
                limit,
            )))
        })
        .map_err(|e| provider_error(op, order_id, e))
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

impl Payments {
    async fn authorize(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        let d: OrderAccepted = events::decode(event)?;
        let token = payment_token(cx, &d.order_id, d.payment_token.clone()).await?;
        let Some(mut p) = lock(cx, &d.order_id, Some((d.total, &token, capture_parts(&d)))).await?
        else {
            return Err(HandlerError::permanent("payment row vanished"));
        };
        match p.state {
            State::Pending => {}
            // A cancellation got here first; if an authorization of ours lost the row to it
            // anyway (see the module doc), its hold is released now.
            State::Voided => return self.release_lost_hold(cx, p).await,
            // Decided already.
            _ => return Ok(()),
        }
        if !cx.batch.locked.contains(&d.order_id) {
            // `lock` takes the order's lock on every path; this only guards against a change
            // that would let a rival decide the row while the provider holds the card.
            return Err(HandlerError::retry(format!(
                "refusing to authorize order {} without its payment lock",
                d.order_id
            )));
        }
        let key = format!("auth:{}", d.order_id);
        let req = p.request(key.clone(), p.amount);
        self.record_attempt(&d.order_id, "authorize", &req).await?;
        let outcome =
            bounded_call(cx, "authorize", &d.order_id, self.provider.authorize(&req)).await?;
        p.authorize_key = Some(key);
        match outcome {
            ProviderOutcome::Approved { reference } => {
                p.state = State::Authorized;
                p.authorization_id = Some(reference.clone());
                let amount = p.amount;
                save(cx, p);
                cx.emit_event(&PaymentAuthorized {
                    meta: Meta::default(),
                    order_id: d.order_id,
                    authorization_id: reference,
                    amount,
                })
            }
            ProviderOutcome::Declined { code, message } => {
                p.state = State::Failed;
                p.failure_code = Some(code.clone());
                p.failure_message = Some(message.clone());
                save(cx, p);
                cx.emit_event(&PaymentFailed {
                    meta: Meta::default(),
                    order_id: d.order_id,
                    stage: PaymentStage::Authorize,
                    code,
                    message,
                })
            }
        }
    }

    async fn capture(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        let d: OrderShipped = events::decode(event)?;
        let mut p = lock_existing(cx, &d.order_id).await?;
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
        let outcome = bounded_call(cx, "capture", &d.order_id, self.provider.capture(&req)).await?;
        p.capture_key = Some(key);
        let amount = p.amount;
        let p_parts = p.parts;
        match outcome {
            ProviderOutcome::Approved { reference } => {
                p.state = State::Captured;
                p.capture_id = Some(reference.clone());
                p.captured_minor = amount.amount_minor;
                save(cx, p);
                if amount.amount_minor > 0 {
                    cx.batch
                        .ledger
                        .push(Movement::capture_parts(&d.order_id, amount, p_parts)?);
                }
                cx.emit_event(&PaymentCaptured {
                    meta: Meta::default(),
                    order_id: d.order_id,
                    capture_id: reference,
                    amount,
                })
            }
            ProviderOutcome::Declined { code, message } => {
                p.failure_code = Some(code.clone());
                p.failure_message = Some(message.clone());
                save(cx, p);
                cx.emit_event(&PaymentFailed {
                    meta: Meta::default(),
                    order_id: d.order_id,
                    stage: PaymentStage::Capture,
                    code,
                    message,
                })
            }
        }
    }

    /// Gives the money back, whatever stage the payment reached, and always confirms with one
    /// event so the order can settle: void a hold, refund a capture, or just close a payment
    /// that never held anything.
    async fn settle(
        &self,
        cx: &mut Context<'_, Rows>,
        p: Payment,
        why: Settle,
    ) -> Result<(), HandlerError> {
        let mut p = self.reconcile(cx, p).await?;
        let order_id = p.order_id.clone();
        match p.state {
            State::Voided => self.release_lost_hold(cx, p).await,
            State::Refunded if p.refund_key.as_deref() != Some(&format!("refund:{order_id}")) => {
                // Operators refunded all of it before this compensation: nothing is left to
                // give back, but the order still waits for its one answer. A refund of
                // nothing, once (the key marks it sent).
                let currency = p.amount.currency;
                let refunded_total = Money::new(p.refunded_minor, currency);
                let refund_id = p.refund_id.clone().unwrap_or_default();
                p.refund_key = Some(format!("refund:{order_id}"));
                save(cx, p);
                cx.emit_event(&PaymentRefunded {
                    meta: Meta::default(),
                    order_id,
                    refund_id,
                    amount: Money::new(0, currency),
                    action_id: None,
                    refunded_total: Some(refunded_total),
                    remaining: Some(Money::new(0, currency)),
                })
            }
            State::Refunded => Ok(()),
            State::Pending | State::Failed => {
                p.state = State::Voided;
                save(cx, p);
                cx.emit_event(&PaymentVoided {
                    meta: Meta::default(),
                    order_id,
                    authorization_id: None,
                })
            }
            State::Authorized => {
                let key = format!("void:{order_id}");
                let req = p.request(key.clone(), p.amount);
                self.record_attempt(&order_id, "void", &req).await?;
                match bounded_call(cx, "void", &order_id, self.provider.void(&req)).await? {
                    ProviderOutcome::Approved { .. } => {}
                    ProviderOutcome::Declined { code, message } => {
                        return Err(HandlerError::permanent(format!(
                            "void for order {order_id} declined: {code}: {message}"
                        )))
                    }
                }
                p.state = State::Voided;
                p.void_key = Some(key);
                let authorization_id = p.authorization_id.clone();
                save(cx, p);
                cx.emit_event(&PaymentVoided {
                    meta: Meta::default(),
                    order_id,
                    authorization_id,
                })
            }
            State::Captured => {
                let key = format!("refund:{order_id}");
                // What an operator refunded already stays refunded: the rest goes back.
                let amount = Money::new(p.captured_minor - p.refunded_minor, p.amount.currency);
                let req = p.request(key.clone(), amount);
                self.record_attempt(&order_id, "refund", &req).await?;
                let reference = match bounded_call(
                    cx,
                    "refund",
                    &order_id,
                    self.provider.refund(&req),
                )
                .await?
                {
                    ProviderOutcome::Approved { reference } => reference,
                    ProviderOutcome::Declined { code, message } => {
                        return Err(HandlerError::permanent(format!(
                            "refund for order {order_id} declined: {code}: {message}"
                        )))
                    }
                };
                p.state = State::Refunded;
                p.refund_id = Some(reference.clone());
                p.refund_key = Some(key);
                p.refunded_minor = p.captured_minor;
                let refunded_total = Money::new(p.captured_minor, amount.currency);
                save(cx, p);
                if amount.amount_minor > 0 {
                    cx.batch.ledger.push(Movement::refund(&order_id, amount)?);
                }
                tracing::info!(
                    order_id = %order_id,
                    why = match why { Settle::Cancelled => "cancelled", Settle::Returned => "returned" },
                    "payment refunded"
                );
                cx.emit_event(&PaymentRefunded {
                    meta: Meta::default(),
                    order_id,
                    refund_id: reference,
                    amount,
                    action_id: None,
                    refunded_total: Some(refunded_total),
                    remaining: Some(Money::new(0, amount.currency)),
                })
            }
        }
    }

    /// An operator's refund (`orderfleet order refund`): gives `amount` back if that much is
    /// captured and not refunded yet, under the order's lock, and records the outcome in the
    /// audited action. A refusal is the action's outcome, not the handler's failure: nothing is
    /// retried or dead-lettered, and the operator reads why in `order show`.
    async fn refund_requested(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        let d: RefundRequested = events::decode(event)?;
        let Some(p) = lock(cx, &d.order_id, None).await? else {
            return refuse(cx, &d, "the order has no payment".into()).await;
        };
        // Decided already: applied by `reconcile` replaying it after a rollback, or refused.
        let decided = store::action_outcome(cx.tx, d.action_id).await?;
        if matches!(decided.as_deref(), Some("applied" | "refused")) {
            return Ok(());
        }
        let currency = p.amount.currency;
        let order_id = d.order_id.clone();
        let key = operator_refund_key(&order_id, d.action_id);
        // Sent to the provider before, by a delivery that rolled back: the provider may have
        // paid it, so it is replayed with its key, not judged again.
        let replay = attempted(cx.tx, &key).await?.is_some();
        // Other operator refunds sent to the provider whose transactions rolled back are
        // money that may have gone: not refundable again.
        let in_flight: i64 = store::lost_operator_refunds(cx.tx, &order_id)
            .await?
            .iter()
            .filter(|l| l.action_id != d.action_id)
            .map(|l| l.req.amount.amount_minor)
            .sum();
        let refundable = p.captured_minor - p.refunded_minor - in_flight;
        if d.amount.currency != currency {
            return refuse(
                cx,
                &d,
                format!(
                    "the refund is in {}, the payment in {currency}",
                    d.amount.currency
                ),
            )
            .await;
        }
        if replay && !matches!(p.state, State::Captured) {
            return Err(HandlerError::permanent(format!(
                "operator refund {} of order {order_id} was sent to the provider, but the payment \
                 is now {}: check the provider's records by hand (key {key})",
                d.action_id,
                p.state.as_str()
            )));
        }
        if !replay && (!matches!(p.state, State::Captured) || d.amount.amount_minor > refundable) {
            let why = format!(
                "a refund of {} is more than can be given back (payment {}: captured {}, \
                 refunded {} already{}, so at most {} can be refunded)",
                format_money(d.amount),
                p.state.as_str(),
                format_money(Money::new(p.captured_minor, currency)),
                format_money(Money::new(p.refunded_minor, currency)),
                if in_flight > 0 {
                    format!(
                        ", {} under way",
                        format_money(Money::new(in_flight, currency))
                    )
                } else {
                    String::new()
                },
                format_money(Money::new(refundable.max(0), currency))
            );
            return refuse(cx, &d, why).await;
        }
        let req = p.request(key.clone(), d.amount);
        self.record_attempt(&order_id, "refund", &req).await?;
        match bounded_call(cx, "refund", &order_id, self.provider.refund(&req)).await? {
            ProviderOutcome::Approved { reference } => {
                tracing::info!(order_id = %order_id, action_id = d.action_id,
                    operator = %d.operator, amount_minor = d.amount.amount_minor,
                    "operator refund applied");
                apply_operator_refund(cx, p, d.action_id, &key, d.amount, reference).await?;
                Ok(())
            }
            ProviderOutcome::Declined { code, message } => {
                let why = format!("the provider declined the refund: {code}: {message}");
                refuse(cx, &d, why).await
            }
        }
    }

    /// Brings a payment about to be compensated up to what the provider did: an authorize or
    /// capture recorded in `payment_attempts` whose transaction rolled back is replayed with its
    /// key (the provider returns the outcome it already decided, or decides now, once), and its
    /// outcome is written to the row, so that `settle` voids a hold nobody recorded and refunds
    /// a capture nobody recorded. A replay emits nothing: `settle` confirms with its one event.
    async fn reconcile(
        &self,
        cx: &mut Context<'_, Rows>,
        mut p: Payment,
    ) -> Result<Payment, HandlerError> {
        let order_id = p.order_id.clone();
        if p.state == State::Pending {
            let key = format!("auth:{order_id}");
            if let Some(req) = attempted(cx.tx, &key).await? {
                match bounded_call(
                    cx,
                    "authorize (replay)",
                    &order_id,
                    self.provider.authorize(&req),
                )
                .await?
                {
                    ProviderOutcome::Approved { reference } => {
                        tracing::warn!(order_id = %order_id, authorization_id = %reference,
                            "found an authorization whose transaction rolled back");
                        p.state = State::Authorized;
                        p.authorization_id = Some(reference);
                        p.token = req.payment_token;
                    }
                    ProviderOutcome::Declined { code, message } => {
                        p.state = State::Failed;
                        p.failure_code = Some(code);
                        p.failure_message = Some(message);
                    }
                }
                p.authorize_key = Some(key);
                save(cx, p.clone());
            }
        }
        if p.state == State::Authorized {
            let key = format!("capture:{order_id}");
            if let Some(req) = attempted(cx.tx, &key).await? {
                match bounded_call(
                    cx,
                    "capture (replay)",
                    &order_id,
                    self.provider.capture(&req),
                )
                .await?
                {
                    ProviderOutcome::Approved { reference } => {
                        tracing::warn!(order_id = %order_id, capture_id = %reference,
                            "found a capture whose transaction rolled back");
                        p.state = State::Captured;
                        p.capture_id = Some(reference);
                        p.capture_key = Some(key);
                        p.captured_minor = req.amount.amount_minor;
                        save(cx, p.clone());
                        if req.amount.amount_minor > 0 {
                            cx.batch
                                .ledger
                                .push(Movement::capture_parts(&order_id, req.amount, p.parts)?);
                        }
                    }
                    // Nothing was taken: the hold is still there, and settle voids it.
                    ProviderOutcome::Declined { .. } => {}
                }
            }
        }
        // Operator refunds sent to the provider whose transactions rolled back: replayed and
        // applied now, so that what `settle` gives back is only what is left.
        if p.state == State::Captured {
            for lost in store::lost_operator_refunds(cx.tx, &order_id).await? {
                let outcome = bounded_call(
                    cx,
                    "refund (replay)",
                    &order_id,
                    self.provider.refund(&lost.req),
                )
                .await?;
                match outcome {
                    ProviderOutcome::Approved { reference } => {
                        tracing::warn!(order_id = %order_id, action_id = lost.action_id,
                            refund_id = %reference,
                            "found an operator refund whose transaction rolled back");
                        p = apply_operator_refund(
                            cx,
                            p,
                            lost.action_id,
                            &lost.key,
                            lost.req.amount,
                            reference,
                        )
                        .await?;
                    }
                    ProviderOutcome::Declined { code, message } => {
                        crate::store::operator_actions::record_outcome(
                            cx.tx,
                            lost.action_id,
                            &order_id,
                            "refused",
                            &format!("the provider declined the refund: {code}: {message}"),
                        )
                        .await?;
                    }
                }
            }
        }
        Ok(p)
    }

    /// Voids, at the provider, a hold placed for a payment that was closed without one: a
    /// `voided` row with no authorization of ours, while `payment_attempts` records an
    /// authorize for the order. That is an authorization whose transaction lost the row to a
    /// cancellation (a rival that did not take the order's lock, e.g. a worker of an older
    /// version during a deploy, or a crash between the provider's answer and our commit
    /// followed by the cancellation). The authorize is replayed with its key (the provider
    /// returns what it decided, or decides now, once) and an approved one is voided with
    /// `void:<order>`, which a payment closed without a hold never used. Emits nothing: the
    /// order already has its `PaymentVoided`.
    async fn release_lost_hold(
        &self,
        cx: &mut Context<'_, Rows>,
        mut p: Payment,
    ) -> Result<(), HandlerError> {
        if p.state != State::Voided || p.authorize_key.is_some() {
            return Ok(());
        }
        let order_id = p.order_id.clone();
        let key = format!("auth:{order_id}");
        let Some(auth) = attempted(cx.tx, &key).await? else {
            return Ok(());
        };
        let outcome = bounded_call(
            cx,
            "authorize (replay)",
            &order_id,
            self.provider.authorize(&auth),
        )
        .await?;
        p.authorize_key = Some(key);
        match outcome {
            ProviderOutcome::Approved { reference } => {
                tracing::warn!(order_id = %order_id, authorization_id = %reference,
                    "voiding a hold whose payment was closed without it");
                let void_key = format!("void:{order_id}");
                let req = ProviderRequest {
                    idempotency_key: void_key.clone(),
                    payment_token: auth.payment_token.clone(),
                    amount: auth.amount,
                    authorization_id: Some(reference.clone()),
                };
                self.record_attempt(&order_id, "void", &req).await?;
                match bounded_call(cx, "void", &order_id, self.provider.void(&req)).await? {
                    ProviderOutcome::Approved { .. } => {}
                    ProviderOutcome::Declined { code, message } => {
                        return Err(HandlerError::permanent(format!(
                            "void of the lost hold {reference} for order {order_id} declined: \
                             {code}: {message}"
                        )))
                    }
                }
                p.token = auth.payment_token;
                p.authorization_id = Some(reference);
                p.void_key = Some(void_key);
            }
            ProviderOutcome::Declined { code, message } => {
                p.failure_code = Some(code);
                p.failure_message = Some(message);
            }
        }
        save(cx, p);
        Ok(())
    }

    async fn cancelled(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        let d: OrderCancelled = events::decode(event)?;
        // Seeded from the event: a cancellation that overtakes the acceptance leaves a voided
        // payment behind, and the late OrderAccepted then authorizes nothing.
        let Some(p) = lock(
            cx,
            &d.order_id,
            Some((d.total, "", CaptureParts::default())),
        )
        .await?
        else {
            return Err(HandlerError::permanent("payment row vanished"));
        };
        self.settle(cx, p, Settle::Cancelled).await
    }

    async fn returned(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        let d: DeliveryFailed = events::decode(event)?;
        let p = lock_existing(cx, &d.order_id).await?;
        self.settle(cx, p, Settle::Returned).await
    }
}

#[async_trait]
impl Handler for Payments {
    type Batch = Rows;

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
        batch: &mut Rows,
    ) -> Result<(), HandlerError> {
        let ids = crate::handlers::sorted_order_ids(events);
        crate::handlers::lock_order_ids(tx, "payments", &ids).await?;
        let found = select_locked(tx, &ids).await?;
        let accepted: Vec<&str> = events
            .iter()
            .filter(|e| e.detail_type == OrderAccepted::DETAIL_TYPE)
            .filter_map(|e| e.detail.get("order_id").and_then(|v| v.as_str()))
            .collect();
        if !accepted.is_empty() {
            batch.methods = payment_methods(tx, &accepted).await?;
        }
        let rows = batch;
        rows.locked.extend(ids.iter().map(|id| id.to_string()));
        rows.rows
            .extend(found.into_iter().map(|p| (p.order_id.clone(), p)));
        Ok(())
    }

    /// Writes back the payment rows this transaction created or changed.
    async fn finish(&self, tx: &Tx, rows: Rows) -> Result<(), HandlerError> {
        write_back(tx, rows).await
    }

    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Rows>,
    ) -> Result<(), HandlerError> {
        match event.detail_type.as_str() {
            OrderAccepted::DETAIL_TYPE => self.authorize(event, cx).await,
            OrderShipped::DETAIL_TYPE => self.capture(event, cx).await,
            OrderCancelled::DETAIL_TYPE => self.cancelled(event, cx).await,
            DeliveryFailed::DETAIL_TYPE => self.returned(event, cx).await,
            RefundRequested::DETAIL_TYPE => self.refund_requested(event, cx).await,
            other => Err(HandlerError::permanent(format!(
                "payments does not handle {other}"
            ))),
        }
    }
}

/// The parts of an accepted order's total the capture posts apart (none before version 3).
fn capture_parts(d: &OrderAccepted) -> CaptureParts {
    let (discount_minor, shipping_minor, tax_minor) = d.charges.minor();
    CaptureParts {
        discount_minor,
        shipping_minor,
        tax_minor,
    }
}

/// Records that the operator's refund `d` was refused, and why; emits nothing.
/// The provider idempotency key of operator action `action_id`'s refund.
fn operator_refund_key(order_id: &str, action_id: i64) -> String {
    format!("refund:{order_id}:{action_id}")
}

/// Books an operator refund the provider approved: the payment's refunded total, the ledger,
/// the action's outcome, and `PaymentRefunded`. Returns the payment as saved.
async fn apply_operator_refund(
    cx: &mut Context<'_, Rows>,
    mut p: Payment,
    action_id: i64,
    key: &str,
    amount: Money,
    reference: String,
) -> Result<Payment, HandlerError> {
    let order_id = p.order_id.clone();
    let currency = p.amount.currency;
    p.refunded_minor += amount.amount_minor;
    if p.refunded_minor == p.captured_minor {
        p.state = State::Refunded;
    }
    p.refund_id = Some(reference.clone());
    p.refund_key = Some(key.to_string());
    let refunded_total = Money::new(p.refunded_minor, currency);
    let remaining = Money::new(p.captured_minor - p.refunded_minor, currency);
    save(cx, p.clone());
    cx.batch
        .ledger
        .push(Movement::refund_keyed(key, &order_id, amount)?);
    crate::store::operator_actions::record_outcome(
        cx.tx,
        action_id,
        &order_id,
        "applied",
        &format!(
            "refunded {} ({reference}); {} left to refund",
            format_money(amount),
            format_money(remaining)
        ),
    )
    .await?;
    cx.emit_event(&PaymentRefunded {
        meta: Meta::default(),
        order_id,
        refund_id: reference,
        amount,
        action_id: Some(action_id),
        refunded_total: Some(refunded_total),
        remaining: Some(remaining),
    })?;
    Ok(p)
}

async fn refuse(
    cx: &mut Context<'_, Rows>,
    d: &RefundRequested,
    why: String,
) -> Result<(), HandlerError> {
    tracing::warn!(order_id = %d.order_id, action_id = d.action_id, operator = %d.operator,
        reason = %why, "operator refund refused");
    record_outcome(cx, d, "refused", &why).await
}

/// Writes the outcome of the operator's action `d` (migration 0018), in the handler's
/// transaction.
async fn record_outcome(
    cx: &mut Context<'_, Rows>,
    d: &RefundRequested,
    outcome: &str,
    detail: &str,
) -> Result<(), HandlerError> {
    crate::store::operator_actions::record_outcome(cx.tx, d.action_id, &d.order_id, outcome, detail)
        .await
}
