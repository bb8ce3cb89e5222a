//! The payments tables as a transaction sees them: the `payment_attempts` log written before
//! each provider call, and the payment rows a transaction locked, cached for the rest of the
//! transaction and written back in one statement per kind before the commit ([`write_back`]).

use std::collections::{BTreeSet, HashMap, HashSet};

use deadpool_postgres::Pool;

use crate::domain::events::{Currency, Money};
use crate::domain::outcome::HandlerError;
use crate::handlers::{lock_order_once, Context};
use crate::providers::payment::ProviderRequest;
use crate::store::db::{Cached, Tx};
use crate::store::ledger::{self, CaptureParts, Movement};

/// Commits a record of `req` for `operation` through `pool` before it is sent, so that it survives a
/// rollback of the handler's transaction. The first record of a key wins.
pub(super) async fn record_attempt(
    pool: &Pool,
    order_id: &str,
    operation: &str,
    req: &ProviderRequest,
) -> Result<(), HandlerError> {
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

/// The request recorded for `key` in `payment_attempts`, if one was ever about to be sent.
pub(super) async fn attempted(tx: &Tx, key: &str) -> Result<Option<ProviderRequest>, HandlerError> {
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
    pub(super) State in "payment state" {
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
pub(super) struct Payment {
    pub(super) order_id: String,
    pub(super) state: State,
    pub(super) amount: Money,
    pub(super) captured_minor: i64,
    pub(super) refunded_minor: i64,
    pub(super) token: String,
    pub(super) authorization_id: Option<String>,
    pub(super) capture_id: Option<String>,
    pub(super) refund_id: Option<String>,
    pub(super) authorize_key: Option<String>,
    pub(super) capture_key: Option<String>,
    pub(super) void_key: Option<String>,
    pub(super) refund_key: Option<String>,
    pub(super) failure_code: Option<String>,
    pub(super) failure_message: Option<String>,
    /// Discount, shipping and tax of the order's total, which the capture posts apart.
    pub(super) parts: CaptureParts,
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
    pub(super) rows: HashMap<String, Payment>,
    /// Orders whose advisory lock this transaction holds and whose row it read (or knows to
    /// be missing).
    pub(super) locked: HashSet<String>,
    /// Rows to insert, and rows to update, by order id.
    pub(super) new: BTreeSet<String>,
    pub(super) changed: BTreeSet<String>,
    /// Money movements to post, in the order they happened.
    pub(super) ledger: Vec<Movement>,
    /// The tokens orders handed over for the group's `OrderAccepted` events, read up front.
    pub(super) methods: HashMap<String, String>,
}

/// The storefront's payment tokens that orders handed over for `ids` (`payment_methods`,
/// migration 0013): the only way a token reaches payments since `OrderAccepted` version 2.
pub(super) async fn payment_methods(
    tx: &Tx,
    ids: &[&str],
) -> Result<HashMap<String, String>, HandlerError> {
    let rows = tx
        .query_cached(
            "SELECT order_id, payment_token FROM payment_methods WHERE order_id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(|e| HandlerError::from_db("reading the payment methods", &e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The token to authorize `order_id` with: from a version-1 event, else the one orders handed
/// over. None on file is permanent: orders writes it in the transaction that emits the event,
/// so only an erasure can have removed it.
pub(super) async fn payment_token(
    cx: &mut Context<'_, Rows>,
    order_id: &str,
    in_event: Option<String>,
) -> Result<String, HandlerError> {
    if let Some(token) = in_event.or_else(|| cx.batch.methods.get(order_id).cloned()) {
        return Ok(token);
    }
    payment_methods(cx.tx, &[order_id])
        .await?
        .remove(order_id)
        .ok_or_else(|| {
            HandlerError::permanent(format!(
                "order {order_id} has no payment method on file; orders hands it over when it \
                 accepts the order, so it was erased since"
            ))
        })
}

/// Locks and reads the payment rows of `ids`, in order-id order.
pub(super) async fn select_locked(tx: &Tx, ids: &[&str]) -> Result<Vec<Payment>, HandlerError> {
    let rows = tx
        .query_cached(
            "SELECT order_id, state, amount_minor, currency::text, payment_token,
                    authorization_id, capture_id, refund_id, authorize_key, capture_key,
                    void_key, refund_key, captured_minor, refunded_minor, failure_code,
                    failure_message, discount_minor, shipping_minor, tax_minor
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
                parts: CaptureParts {
                    discount_minor: r.get(16),
                    shipping_minor: r.get(17),
                    tax_minor: r.get(18),
                },
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
pub(super) async fn lock(
    cx: &mut Context<'_, Rows>,
    order_id: &str,
    seed: Option<(Money, &str, CaptureParts)>,
) -> Result<Option<Payment>, HandlerError> {
    let tx = cx.tx;
    let rows = &mut cx.batch;
    if let Some(p) = rows.rows.get(order_id) {
        return Ok(Some(p.clone()));
    }
    if rows.locked.contains(order_id) {
        // The group holds the order's lock and read no row: nobody else can create it now.
        let Some((amount, token, parts)) = seed else {
            return Ok(None);
        };
        let p = Payment::pending(order_id, amount, token, parts);
        rows.new.insert(order_id.to_string());
        rows.rows.insert(order_id.to_string(), p.clone());
        return Ok(Some(p));
    }
    // An event run alone: the same lock a group takes, before anything is read.
    lock_order_once(tx, &mut rows.locked, "payments", order_id).await?;
    if let Some((amount, token, parts)) = seed {
        cx.tx
            .execute_cached(
                "INSERT INTO payments (order_id, state, amount_minor, currency, payment_token,
                                       discount_minor, shipping_minor, tax_minor)
                 VALUES ($1, 'pending', $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (order_id) DO NOTHING",
                &[
                    &order_id,
                    &amount.amount_minor,
                    &amount.currency.as_str(),
                    &token,
                    &parts.discount_minor,
                    &parts.shipping_minor,
                    &parts.tax_minor,
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

pub(super) async fn lock_existing(
    cx: &mut Context<'_, Rows>,
    order_id: &str,
) -> Result<Payment, HandlerError> {
    lock(cx, order_id, None).await?.ok_or_else(|| {
        HandlerError::permanent(format!("order {order_id} has no payment to act on"))
    })
}

/// Keeps `p` as this transaction's version of the row; [`Handler::finish`] writes it.
pub(super) fn save(cx: &mut Context<'_, Rows>, p: Payment) {
    let rows = &mut cx.batch;
    if !rows.new.contains(&p.order_id) {
        rows.changed.insert(p.order_id.clone());
    }
    rows.rows.insert(p.order_id.clone(), p);
}

/// Writes the new and changed rows of `rows`: one statement each.
pub(super) async fn write_back(tx: &Tx, rows: Rows) -> Result<(), HandlerError> {
    let db = |e: tokio_postgres::Error| HandlerError::from_db("writing the payments", &e);
    let pick = |ids: &BTreeSet<String>| -> Vec<&Payment> {
        ids.iter().filter_map(|id| rows.rows.get(id)).collect()
    };
    let new = pick(&rows.new);
    if !new.is_empty() {
        let c = Columns::of(&new);
        let amounts: Vec<i64> = new.iter().map(|p| p.amount.amount_minor).collect();
        let currencies: Vec<&str> = new.iter().map(|p| p.amount.currency.as_str()).collect();
        let discounts: Vec<i64> = new.iter().map(|p| p.parts.discount_minor).collect();
        let shippings: Vec<i64> = new.iter().map(|p| p.parts.shipping_minor).collect();
        let taxes: Vec<i64> = new.iter().map(|p| p.parts.tax_minor).collect();
        // A plain INSERT: if an event run alone elsewhere created one of these rows meanwhile,
        // the group fails and its events run alone.
        tx.execute_cached(
            "INSERT INTO payments (order_id, state, payment_token, authorization_id, capture_id,
                 refund_id, authorize_key, capture_key, void_key, refund_key, captured_minor,
                 refunded_minor, failure_code, failure_message, amount_minor, currency,
                 discount_minor, shipping_minor, tax_minor)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                 $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[],
                 $12::bigint[], $13::text[], $14::text[], $15::bigint[], $16::text[],
                 $17::bigint[], $18::bigint[], $19::bigint[])",
            &c.params(&[&amounts, &currencies, &discounts, &shippings, &taxes]),
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

pub(super) type Param<'p> = dyn tokio_postgres::types::ToSql + Sync + 'p;

/// The mutable columns of some payment rows, as arrays for `unnest`.
pub(super) struct Columns<'a> {
    pub(super) ids: Vec<&'a str>,
    pub(super) states: Vec<&'static str>,
    pub(super) tokens: Vec<&'a str>,
    pub(super) authorization_ids: Vec<Option<&'a str>>,
    pub(super) capture_ids: Vec<Option<&'a str>>,
    pub(super) refund_ids: Vec<Option<&'a str>>,
    pub(super) authorize_keys: Vec<Option<&'a str>>,
    pub(super) capture_keys: Vec<Option<&'a str>>,
    pub(super) void_keys: Vec<Option<&'a str>>,
    pub(super) refund_keys: Vec<Option<&'a str>>,
    pub(super) captured: Vec<i64>,
    pub(super) refunded: Vec<i64>,
    pub(super) failure_codes: Vec<Option<&'a str>>,
    pub(super) failure_messages: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    /// The arrays as statement parameters `$1` to `$14`, then `more`.
    pub(super) fn params<'p>(&'p self, more: &[&'p Param<'p>]) -> Vec<&'p Param<'p>> {
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

    pub(super) fn of(rows: &[&'a Payment]) -> Self {
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
    pub(super) fn pending(order_id: &str, amount: Money, token: &str, parts: CaptureParts) -> Self {
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
            parts,
        }
    }

    pub(super) fn request(&self, key: String, amount: Money) -> ProviderRequest {
        ProviderRequest {
            idempotency_key: key,
            payment_token: self.token.clone(),
            amount,
            authorization_id: self.authorization_id.clone(),
        }
    }
}

/// An operator refund sent to the provider (its attempt recorded) whose outcome was never
/// written: its transaction rolled back, so the provider may have paid it.
pub(super) struct LostRefund {
    pub action_id: i64,
    pub key: String,
    pub req: ProviderRequest,
}

/// The operator refunds of `order_id` that were sent to the provider and are still
/// `requested` in `operator_actions`.
pub(super) async fn lost_operator_refunds(
    tx: &Tx,
    order_id: &str,
) -> Result<Vec<LostRefund>, HandlerError> {
    let rows = tx
        .query_cached(
            "SELECT o.id, a.idempotency_key
               FROM operator_actions o
               JOIN payment_attempts a ON a.idempotency_key = 'refund:' || o.order_id || ':' || o.id
              WHERE o.order_id = $1 AND o.action = 'refund' AND o.outcome = 'requested'
              ORDER BY o.id",
            &[&order_id],
        )
        .await
        .map_err(|e| HandlerError::from_db("reading the operator refunds under way", &e))?;
    let mut lost = Vec::with_capacity(rows.len());
    for r in rows {
        let key: String = r.get(1);
        if let Some(req) = attempted(tx, &key).await? {
            lost.push(LostRefund {
                action_id: r.get(0),
                key,
                req,
            });
        }
    }
    Ok(lost)
}

/// The outcome of operator action `id` (`requested`, `applied`, ...), if it exists.
pub(super) async fn action_outcome(tx: &Tx, id: i64) -> Result<Option<String>, HandlerError> {
    Ok(tx
        .query_opt_cached("SELECT outcome FROM operator_actions WHERE id = $1", &[&id])
        .await
        .map_err(|e| HandlerError::from_db("reading the operator action", &e))?
        .map(|r| r.get(0)))
}
