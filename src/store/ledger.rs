//! The double-entry ledger: named accounts, and money movements recorded as balanced sets of
//! immutable postings in minor units per currency.
//!
//! Postings are signed: positive is a debit, negative a credit, so a transaction balances when
//! its postings sum to zero per currency. [`Movement::new`] checks that before writing; the database
//! checks it again at commit (a deferred constraint trigger) and refuses any UPDATE or DELETE
//! of the ledger (see `migrations/0004_payments.sql`).
//!
//! | movement | debit | credit |
//! |---|---|---|
//! | capture | `payments_clearing` (the total), `sales_discounts` (the discount) | `sales_revenue` (the goods, net of tax), `shipping_revenue`, `tax_payable` |
//! | refund (a cancellation's, a return's, or an operator's part) | `refunds` | `payments_clearing` |
//!
//! Authorizations and voids move no money, so they post nothing.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;

use crate::domain::events::{Currency, Money};
use crate::domain::outcome::HandlerError;
use crate::store::db::Cached;

/// A named ledger account (seeded by the migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Account {
    /// What the payment provider owes us for captured payments, net of refunds.
    PaymentsClearing,
    /// Sales, recognised at capture.
    SalesRevenue,
    /// Money given back to customers.
    Refunds,
    /// Discounts given at sale (migration 0017).
    SalesDiscounts,
    /// Shipping charged to customers.
    ShippingRevenue,
    /// Tax collected, owed to the tax authorities.
    TaxPayable,
}

impl Account {
    pub const ALL: [Account; 6] = [
        Account::PaymentsClearing,
        Account::SalesRevenue,
        Account::Refunds,
        Account::SalesDiscounts,
        Account::ShippingRevenue,
        Account::TaxPayable,
    ];

    /// The account's name in `ledger_accounts`.
    pub fn name(self) -> &'static str {
        match self {
            Account::PaymentsClearing => "payments_clearing",
            Account::SalesRevenue => "sales_revenue",
            Account::Refunds => "refunds",
            Account::SalesDiscounts => "sales_discounts",
            Account::ShippingRevenue => "shipping_revenue",
            Account::TaxPayable => "tax_payable",
        }
    }
}

/// The parts of an order's total a capture posts apart, in the total's currency's minor units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureParts {
    pub discount_minor: i64,
    pub shipping_minor: i64,
    pub tax_minor: i64,
}

/// One line of a ledger transaction: a signed amount on an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posting {
    pub account: Account,
    /// Positive: debit; negative: credit.
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Posting {
    pub fn debit(account: Account, money: Money) -> Self {
        Posting {
            account,
            amount_minor: money.amount_minor,
            currency: money.currency,
        }
    }

    /// Fails only for `i64::MIN`, which no order total reaches (totals are non-negative).
    pub fn credit(account: Account, money: Money) -> Option<Self> {
        Some(Posting {
            account,
            amount_minor: money.amount_minor.checked_neg()?,
            currency: money.currency,
        })
    }
}

/// Why a set of postings cannot be a ledger transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unbalanced {
    #[error("a ledger transaction needs at least two postings")]
    TooFewPostings,
    #[error("a posting of zero on {0} carries no money")]
    ZeroPosting(&'static str),
    #[error("postings in {currency} sum to {sum}, not zero")]
    DoesNotBalance { currency: Currency, sum: i128 },
}

/// Checks that `postings` form a balanced transaction: at least two, none zero, summing to
/// zero in each currency.
pub fn check_balanced(postings: &[Posting]) -> Result<(), Unbalanced> {
    if postings.len() < 2 {
        return Err(Unbalanced::TooFewPostings);
    }
    let mut sums: BTreeMap<Currency, i128> = BTreeMap::new();
    for p in postings {
        if p.amount_minor == 0 {
            return Err(Unbalanced::ZeroPosting(p.account.name()));
        }
        // i128 cannot overflow on any realistic number of i64 postings.
        *sums.entry(p.currency).or_default() += i128::from(p.amount_minor);
    }
    match sums.into_iter().find(|(_, sum)| *sum != 0) {
        Some((currency, sum)) => Err(Unbalanced::DoesNotBalance { currency, sum }),
        None => Ok(()),
    }
}

/// A balanced set of postings, ready to be recorded once under its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement {
    pub idempotency_key: String,
    pub order_id: String,
    pub kind: String,
    pub postings: Vec<Posting>,
}

impl Movement {
    /// Checks that `postings` balance.
    pub fn new(
        idempotency_key: &str,
        order_id: &str,
        kind: &str,
        postings: &[Posting],
    ) -> Result<Self, HandlerError> {
        check_balanced(postings)
            .map_err(|e| HandlerError::permanent(format!("ledger {kind} for {order_id}: {e}")))?;
        Ok(Movement {
            idempotency_key: idempotency_key.to_string(),
            order_id: order_id.to_string(),
            kind: kind.to_string(),
            postings: postings.to_vec(),
        })
    }

    /// A capture of `amount` for `order_id`: debit clearing, credit revenue.
    pub fn capture(order_id: &str, amount: Money) -> Result<Self, HandlerError> {
        Movement::capture_parts(order_id, amount, CaptureParts::default())
    }

    /// A capture of `amount` (the order's total) for `order_id`, posted by its parts: debit
    /// clearing with the total and discounts with the discount; credit shipping and tax with
    /// theirs, and sales with the rest (the goods net of tax, whether the prices included it
    /// or not: total + discount - shipping - tax is the lines' net value either way).
    pub fn capture_parts(
        order_id: &str,
        amount: Money,
        parts: CaptureParts,
    ) -> Result<Self, HandlerError> {
        let in_currency = |minor: i64| Money::new(minor, amount.currency);
        let sales = amount
            .amount_minor
            .checked_add(parts.discount_minor)
            .and_then(|x| x.checked_sub(parts.shipping_minor))
            .and_then(|x| x.checked_sub(parts.tax_minor))
            .filter(|x| *x >= 0)
            .ok_or_else(|| {
                HandlerError::permanent(format!(
                    "ledger capture for {order_id}: the total {amount} cannot hold shipping {} \
                     and tax {} after a discount of {}",
                    parts.shipping_minor, parts.tax_minor, parts.discount_minor
                ))
            })?;
        let mut postings = vec![Posting::debit(Account::PaymentsClearing, amount)];
        let mut credit = |account: Account, minor: i64| -> Result<(), HandlerError> {
            if minor != 0 {
                postings.push(Posting::credit(account, in_currency(minor)).ok_or_else(|| {
                    HandlerError::permanent(format!("amount {minor} cannot be negated"))
                })?);
            }
            Ok(())
        };
        credit(Account::SalesRevenue, sales)?;
        credit(Account::ShippingRevenue, parts.shipping_minor)?;
        credit(Account::TaxPayable, parts.tax_minor)?;
        if parts.discount_minor != 0 {
            postings.push(Posting::debit(
                Account::SalesDiscounts,
                in_currency(parts.discount_minor),
            ));
        }
        Movement::new(
            &format!("capture:{order_id}"),
            order_id,
            "capture",
            &postings,
        )
    }

    /// A refund of `amount` for `order_id`: debit refunds, credit clearing.
    pub fn refund(order_id: &str, amount: Money) -> Result<Self, HandlerError> {
        Movement::refund_keyed(&format!("refund:{order_id}"), order_id, amount)
    }

    /// A refund of `amount` for `order_id` under its own key: an operator's partial refunds
    /// (`refund:<order>:<action>`) are each posted once, beside the cancellation's or the
    /// return's refund of the rest.
    pub fn refund_keyed(key: &str, order_id: &str, amount: Money) -> Result<Self, HandlerError> {
        let postings = movement(Account::Refunds, Account::PaymentsClearing, amount)?;
        Movement::new(key, order_id, "refund", &postings)
    }
}

/// Records a balanced transaction under `idempotency_key`, in the caller's database
/// transaction. Returns false, writing nothing, when a transaction with that key exists: a
/// retried movement never posts twice.
pub async fn record(
    db: &impl GenericClient,
    idempotency_key: &str,
    order_id: &str,
    kind: &str,
    postings: &[Posting],
) -> Result<bool, HandlerError> {
    let m = Movement::new(idempotency_key, order_id, kind, postings)?;
    Ok(record_all(db, std::slice::from_ref(&m)).await? == 1)
}

/// Records `movements` in the caller's database transaction, in one statement, each once:
/// a movement whose key was recorded before (or earlier in `movements`) writes nothing.
/// Returns how many were new.
pub async fn record_all(
    db: &impl GenericClient,
    movements: &[Movement],
) -> Result<usize, HandlerError> {
    let mut seen = std::collections::HashSet::new();
    let movements: Vec<&Movement> = movements
        .iter()
        .filter(|m| seen.insert(m.idempotency_key.as_str()))
        .collect();
    if movements.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = movements
        .iter()
        .map(|m| m.idempotency_key.as_str())
        .collect();
    let orders: Vec<&str> = movements.iter().map(|m| m.order_id.as_str()).collect();
    let kinds: Vec<&str> = movements.iter().map(|m| m.kind.as_str()).collect();
    let lines = || {
        movements
            .iter()
            .flat_map(|m| m.postings.iter().map(move |p| (m, p)))
    };
    let posting_keys: Vec<&str> = lines().map(|(m, _)| m.idempotency_key.as_str()).collect();
    let accounts: Vec<&str> = lines().map(|(_, p)| p.account.name()).collect();
    let amounts: Vec<i64> = lines().map(|(_, p)| p.amount_minor).collect();
    let currencies: Vec<&str> = lines().map(|(_, p)| p.currency.as_str()).collect();
    // The transactions and their postings in one statement. The postings' foreign key and the
    // balance trigger see the transaction rows: both run after the statement.
    let row = db
        .query_one_cached(
            "WITH t AS (
                 INSERT INTO ledger_transactions (idempotency_key, order_id, kind)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
                 ON CONFLICT (idempotency_key) DO NOTHING RETURNING id, idempotency_key
             ), p AS (
                 INSERT INTO ledger_postings (transaction_id, account_id, amount_minor, currency)
                 SELECT t.id, a.id, p.amount, p.currency
                   FROM unnest($4::text[], $5::text[], $6::bigint[], $7::text[]) WITH ORDINALITY
                                AS p(key, account, amount, currency, n)
                   JOIN t ON t.idempotency_key = p.key
                   JOIN ledger_accounts a ON a.name = p.account
                  ORDER BY p.n
                 RETURNING 1
             )
             SELECT ARRAY(SELECT idempotency_key FROM t), (SELECT count(*) FROM p)",
            &[
                &keys,
                &orders,
                &kinds,
                &posting_keys,
                &accounts,
                &amounts,
                &currencies,
            ],
        )
        .await
        .map_err(|e| HandlerError::from_db("recording ledger transactions", &e))?;
    let new: std::collections::HashSet<String> = row.get::<_, Vec<String>>(0).into_iter().collect();
    let expected: usize = movements
        .iter()
        .filter(|m| new.contains(&m.idempotency_key))
        .map(|m| m.postings.len())
        .sum();
    if row.get::<_, i64>(1) != expected as i64 {
        let accounts: std::collections::BTreeSet<&str> = accounts.into_iter().collect();
        return Err(HandlerError::permanent(format!(
            "a ledger account of {accounts:?} is missing; run `orderfleet migrate`"
        )));
    }
    Ok(new.len())
}

/// Posts a capture of `amount` for `order_id`: debit clearing, credit revenue.
pub async fn capture(
    db: &impl GenericClient,
    order_id: &str,
    amount: Money,
) -> Result<bool, HandlerError> {
    let m = Movement::capture(order_id, amount)?;
    Ok(record_all(db, std::slice::from_ref(&m)).await? == 1)
}

/// Posts a refund of `amount` for `order_id`: debit refunds, credit clearing.
pub async fn refund(
    db: &impl GenericClient,
    order_id: &str,
    amount: Money,
) -> Result<bool, HandlerError> {
    let m = Movement::refund(order_id, amount)?;
    Ok(record_all(db, std::slice::from_ref(&m)).await? == 1)
}

fn movement(debit: Account, credit: Account, amount: Money) -> Result<[Posting; 2], HandlerError> {
    let credit = Posting::credit(credit, amount)
        .ok_or_else(|| HandlerError::permanent(format!("amount {amount} cannot be negated")))?;
    Ok([Posting::debit(debit, amount), credit])
}

/// The balance of every account per currency, from the postings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub account: String,
    pub currency: String,
    pub amount_minor: i64,
}

/// Sums the postings per account and currency.
pub async fn balances(db: &impl GenericClient) -> Result<Vec<Balance>, tokio_postgres::Error> {
    let rows = db
        .query_cached(
            "SELECT a.name, p.currency::text, sum(p.amount_minor)::bigint
               FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id
              GROUP BY a.name, p.currency ORDER BY a.name, p.currency",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Balance {
            account: r.get(0),
            currency: r.get(1),
            amount_minor: r.get(2),
        })
        .collect())
}

/// Ledger transactions whose postings do not sum to zero in some currency (the trigger makes
/// this empty; the report checks it anyway).
pub async fn unbalanced_transactions(
    db: &impl GenericClient,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = db
        .query_cached(
            "SELECT t.id FROM ledger_transactions t
               LEFT JOIN ledger_postings p ON p.transaction_id = t.id
              GROUP BY t.id, p.currency
             HAVING coalesce(sum(p.amount_minor), 0) <> 0 OR count(p.id) = 0
              ORDER BY t.id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(n: i64) -> Money {
        Money::new(n, Currency::new("EUR").unwrap())
    }

    #[test]
    fn a_transaction_must_balance_per_currency() {
        let usd = Money::new(100, Currency::new("USD").unwrap());
        let ok = movement(Account::PaymentsClearing, Account::SalesRevenue, eur(100)).unwrap();
        assert_eq!(check_balanced(&ok), Ok(()));
        let mixed = [
            Posting::debit(Account::PaymentsClearing, eur(100)),
            Posting::credit(Account::SalesRevenue, usd).unwrap(),
        ];
        assert!(matches!(
            check_balanced(&mixed),
            Err(Unbalanced::DoesNotBalance { .. })
        ));
        assert_eq!(check_balanced(&ok[..1]), Err(Unbalanced::TooFewPostings));
        let zero = [
            Posting::debit(Account::PaymentsClearing, eur(0)),
            Posting::debit(Account::SalesRevenue, eur(0)),
        ];
        assert!(matches!(
            check_balanced(&zero),
            Err(Unbalanced::ZeroPosting(_))
        ));
    }
}
