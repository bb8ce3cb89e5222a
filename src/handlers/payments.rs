//! payments: authorizes, captures, voids and refunds through a [`PaymentProvider`], and keeps
//! the double-entry [`ledger`](crate::store::ledger).
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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::Pool;

use crate::domain::envelope::Envelope;
use crate::domain::events::Event;
use crate::domain::events::{
    self, Currency, DeliveryFailed, Meta, Money, OrderAccepted, OrderCancelled, OrderShipped,
    PaymentAuthorized, PaymentCaptured, PaymentFailed, PaymentRefunded, PaymentStage,
    PaymentVoided,
};
use crate::domain::outcome::HandlerError;
use crate::handlers::{lock_order_once, Context, Handler};
use crate::providers::payment::{PaymentProvider, ProviderError, ProviderOutcome, ProviderRequest};
use crate::store::db::{Cached, Tx};
use crate::store::ledger::{self, Movement};

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

stored_states!(
    /// A payment row's state.
    State in "payment state" {
        Pending = "pending";
        Authorized = "authorized";
        Failed = "failed";
        Captured = "captured";
        Voided = "voided";
        Refunded = "refunded";
    }
);

/// A payment row, locked for the rest of the transaction, as the transaction last left it.
#[derive(Clone)]
struct Payment {
    order_id: String,
    state: State,
    amount: Money,
    captured_minor: i64,
    refunded_minor: i64,
    token: String,
    authorization_id: Option<String>,
    capture_id: Option<String>,
    refund_id: Option<String>,
    authorize_key: Option<String>,
    capture_key: Option<String>,
    void_key: Option<String>,
    refund_key: Option<String>,
    failure_code: Option<String>,
    failure_message: Option<String>,
}

/// The payment rows a transaction locked, as its events last left them.
///
/// A group locks the `payments:<id>` advisory lock of each of its orders and reads their rows
/// in [`Handler::lock_group`]; its events read and change the rows here, and
/// [`Handler::finish`] writes them back: new rows in one `INSERT`, changed ones in one
/// `UPDATE`, and the money movements of all its events in one [`ledger::record_all`]. For an
/// order whose lock the group took up front, a missing row is created in memory. An event
/// run alone takes its order's lock in `lock`, then creates the row in the table.
#[derive(Default)]
pub struct Rows {
    rows: HashMap<String, Payment>,
    /// Orders whose advisory lock this transaction holds and whose row it read (or knows to
    /// be missing).
    locked: HashSet<String>,
    /// Rows to insert, and rows to update, by order id.
    new: BTreeSet<String>,
    changed: BTreeSet<String>,
    /// Money movements to post, in the order they happened.
    ledger: Vec<Movement>,
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

/// Locks and reads the payment rows of `ids`, in order-id order.
async fn select_locked(tx: &Tx, ids: &[&str]) -> Result<Vec<Payment>, HandlerError> {
    let rows = tx
        .query_cached(
            "SELECT order_id, state, amount_minor, currency::text, payment_token,
                    authorization_id, capture_id, refund_id, authorize_key, capture_key,
                    void_key, refund_key, captured_minor, refunded_minor, failure_code,
                    failure_message
               FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
            &[&ids],
        )
        .await
        .map_err(|e| HandlerError::from_db("locking the payment", &e))?;
    rows.iter()
        .map(|r| {
            let order_id: String = r.get(0);
            let currency: String = r.get(3);
            let currency = Currency::new(&currency)
                .map_err(|e| HandlerError::permanent(format!("payment of {order_id}: {e}")))?;
            Ok(Payment {
                state: State::parse(r.get(1))?,
                amount: Money::new(r.get(2), currency),
                token: r.get(4),
                authorization_id: r.get(5),
                capture_id: r.get(6),
                refund_id: r.get(7),
                authorize_key: r.get(8),
                capture_key: r.get(9),
                void_key: r.get(10),
                refund_key: r.get(11),
                captured_minor: r.get(12),
                refunded_minor: r.get(13),
                failure_code: r.get(14),
                failure_message: r.get(15),
                order_id,
            })
        })
        .collect()
}

/// Locks the order's payment row, creating it as `pending` with `seed` when it does not exist
/// yet (a cancellation may arrive before the acceptance).
///
/// Every path takes the order's `payments:<id>` advisory lock before it reads whether the row
/// exists: a group in [`Handler::lock_group`], an event run alone here. So between that read
/// and the transaction's end no other transaction can create or decide the row, and a
/// decision taken on "no row yet" (authorize, or close without calling the provider) is not
/// undone by a rival that read the same absence.
async fn lock(
    cx: &mut Context<'_, Rows>,
    order_id: &str,
    seed: Option<(Money, &str)>,
) -> Result<Option<Payment>, HandlerError> {
    let tx = cx.tx;
    let rows = &mut cx.batch;
    if let Some(p) = rows.rows.get(order_id) {
        return Ok(Some(p.clone()));
    }
    if rows.locked.contains(order_id) {
        // The group holds the order's lock and read no row: nobody else can create it now.
        let Some((amount, token)) = seed else {
            return Ok(None);
        };
        let p = Payment::pending(order_id, amount, token);
        rows.new.insert(order_id.to_string());
        rows.rows.insert(order_id.to_string(), p.clone());
        return Ok(Some(p));
    }
    // An event run alone: the same lock a group takes, before anything is read.
    lock_order_once(tx, &mut rows.locked, "payments", order_id).await?;
    if let Some((amount, token)) = seed {
        cx.tx
            .execute_cached(
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
    let Some(p) = select_locked(cx.tx, &[order_id]).await?.into_iter().next() else {
        return Ok(None);
    };
    cx.batch.rows.insert(order_id.to_string(), p.clone());
    Ok(Some(p))
}

async fn lock_existing(
    cx: &mut Context<'_, Rows>,
    order_id: &str,
) -> Result<Payment, HandlerError> {
    lock(cx, order_id, None).await?.ok_or_else(|| {
        HandlerError::permanent(format!("order {order_id} has no payment to act on"))
    })
}

/// Keeps `p` as this transaction's version of the row; [`Handler::finish`] writes it.
fn save(cx: &mut Context<'_, Rows>, p: Payment) {
    let rows = &mut cx.batch;
    if !rows.new.contains(&p.order_id) {
        rows.changed.insert(p.order_id.clone());
    }
    rows.rows.insert(p.order_id.clone(), p);
}

/// Writes the new and changed rows of `rows`: one statement each.
async fn write_back(tx: &Tx, rows: Rows) -> Result<(), HandlerError> {
    let db = |e: tokio_postgres::Error| HandlerError::from_db("writing the payments", &e);
    let pick = |ids: &BTreeSet<String>| -> Vec<&Payment> {
        ids.iter().filter_map(|id| rows.rows.get(id)).collect()
    };
    let new = pick(&rows.new);
    if !new.is_empty() {
        let c = Columns::of(&new);
        let amounts: Vec<i64> = new.iter().map(|p| p.amount.amount_minor).collect();
        let currencies: Vec<&str> = new.iter().map(|p| p.amount.currency.as_str()).collect();
        // A plain INSERT: if an event run alone elsewhere created one of these rows meanwhile,
        // the group fails and its events run alone.
        tx.execute_cached(
            "INSERT INTO payments (order_id, state, payment_token, authorization_id, capture_id,
                 refund_id, authorize_key, capture_key, void_key, refund_key, captured_minor,
                 refunded_minor, failure_code, failure_message, amount_minor, currency)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                 $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[],
                 $12::bigint[], $13::text[], $14::text[], $15::bigint[], $16::text[])",
            &c.params(&[&amounts, &currencies]),
        )
        .await
        .map_err(db)?;
    }
    let changed = pick(&rows.changed);
    if !changed.is_empty() {
        let c = Columns::of(&changed);
        let n = tx
            .execute_cached(
                "UPDATE payments p SET state = u.state, payment_token = u.payment_token,
                        authorization_id = u.authorization_id, capture_id = u.capture_id,
                        refund_id = u.refund_id, authorize_key = u.authorize_key,
                        capture_key = u.capture_key, void_key = u.void_key,
                        refund_key = u.refund_key, captured_minor = u.captured_minor,
                        refunded_minor = u.refunded_minor, failure_code = u.failure_code,
                        failure_message = u.failure_message, updated_at = now()
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                               $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                               $11::bigint[], $12::bigint[], $13::text[], $14::text[])
                        AS u(order_id, state, payment_token, authorization_id, capture_id,
                             refund_id, authorize_key, capture_key, void_key, refund_key,
                             captured_minor, refunded_minor, failure_code, failure_message)
                  WHERE p.order_id = u.order_id",
                &c.params(&[]),
            )
            .await
            .map_err(db)?;
        if n != changed.len() as u64 {
            return Err(HandlerError::retry(format!(
                "updated {n} of {} locked payments",
                changed.len()
            )));
        }
    }
    ledger::record_all(tx, &rows.ledger).await?;
    Ok(())
}

type Param<'p> = dyn tokio_postgres::types::ToSql + Sync + 'p;

/// The mutable columns of some payment rows, as arrays for `unnest`.
struct Columns<'a> {
    ids: Vec<&'a str>,
    states: Vec<&'static str>,
    tokens: Vec<&'a str>,
    authorization_ids: Vec<Option<&'a str>>,
    capture_ids: Vec<Option<&'a str>>,
    refund_ids: Vec<Option<&'a str>>,
    authorize_keys: Vec<Option<&'a str>>,
    capture_keys: Vec<Option<&'a str>>,
    void_keys: Vec<Option<&'a str>>,
    refund_keys: Vec<Option<&'a str>>,
    captured: Vec<i64>,
    refunded: Vec<i64>,
    failure_codes: Vec<Option<&'a str>>,
    failure_messages: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    /// The arrays as statement parameters `$1` to `$14`, then `more`.
    fn params<'p>(&'p self, more: &[&'p Param<'p>]) -> Vec<&'p Param<'p>> {
        let mut all: Vec<&'p Param<'p>> = vec![
            &self.ids,
            &self.states,
            &self.tokens,
            &self.authorization_ids,
            &self.capture_ids,
            &self.refund_ids,
            &self.authorize_keys,
            &self.capture_keys,
            &self.void_keys,
            &self.refund_keys,
            &self.captured,
            &self.refunded,
            &self.failure_codes,
            &self.failure_messages,
        ];
        all.extend_from_slice(more);
        all
    }

    fn of(rows: &[&'a Payment]) -> Self {
        let text = |f: fn(&'a Payment) -> &'a Option<String>| -> Vec<Option<&'a str>> {
            rows.iter().map(|p| f(p).as_deref()).collect()
        };
        Columns {
            ids: rows.iter().map(|p| p.order_id.as_str()).collect(),
            states: rows.iter().map(|p| p.state.as_str()).collect(),
            tokens: rows.iter().map(|p| p.token.as_str()).collect(),
            authorization_ids: text(|p| &p.authorization_id),
            capture_ids: text(|p| &p.capture_id),
            refund_ids: text(|p| &p.refund_id),
            authorize_keys: text(|p| &p.authorize_key),
            capture_keys: text(|p| &p.capture_key),
            void_keys: text(|p| &p.void_key),
            refund_keys: text(|p| &p.refund_key),
            captured: rows.iter().map(|p| p.captured_minor).collect(),
            refunded: rows.iter().map(|p| p.refunded_minor).collect(),
            failure_codes: text(|p| &p.failure_code),
            failure_messages: text(|p| &p.failure_message),
        }
    }
}

impl Payment {
    fn pending(order_id: &str, amount: Money, token: &str) -> Self {
        Payment {
            order_id: order_id.to_string(),
            state: State::Pending,
            amount,
            captured_minor: 0,
            refunded_minor: 0,
            token: token.to_string(),
            authorization_id: None,
            capture_id: None,
            refund_id: None,
            authorize_key: None,
            capture_key: None,
            void_key: None,
            refund_key: None,
            failure_code: None,
            failure_message: None,
        }
    }

    fn request(&self, key: String, amount: Money) -> ProviderRequest {
        ProviderRequest {
            idempotency_key: key,
            payment_token: self.token.clone(),
            amount,
            authorization_id: self.authorization_id.clone(),
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
        let Some(mut p) = lock(cx, &d.order_id, Some((d.total, &d.payment_token))).await? else {
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
        match outcome {
            ProviderOutcome::Approved { reference } => {
                p.state = State::Captured;
                p.capture_id = Some(reference.clone());
                p.captured_minor = amount.amount_minor;
                save(cx, p);
                if amount.amount_minor > 0 {
                    cx.batch
                        .ledger
                        .push(Movement::capture(&d.order_id, amount)?);
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
                let amount = Money::new(p.captured_minor, p.amount.currency);
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
                })
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
                                .push(Movement::capture(&order_id, req.amount)?);
                        }
                    }
                    // Nothing was taken: the hold is still there, and settle voids it.
                    ProviderOutcome::Declined { .. } => {}
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
        let Some(p) = lock(cx, &d.order_id, Some((d.total, ""))).await? else {
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
            other => Err(HandlerError::permanent(format!(
                "payments does not handle {other}"
            ))),
        }
    }
}
