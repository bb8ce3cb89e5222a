//! `orderfleet customer forget ID`: honouring a customer's erasure request.
//!
//! What the fleet holds about a customer, and what forgetting does to it, in one transaction:
//!
//! | table | holds | after |
//! |---|---|---|
//! | `customers` | email, name | both emptied; the id stays (the store's opaque key) |
//! | `orders` | shipping address | cut to country and postal prefix, as in the lake |
//! | `payment_methods` | the storefront's token | deleted |
//! | `payments`, `payment_attempts` | the token | emptied |
//! | `outbox_dead_letters` | events that never reached the bus | shown as `dlq peek` shows them ([`crate::domain::redaction::for_display`]) |
//! | `customer_erasures` | that it happened | one row: when, how many orders |
//!
//! Orders keep their lines, money and states, so the ledger and every report invariant hold
//! afterwards. Emails are recorded with masked addresses only, and the lake never held the
//! identifiers (see [`crate::domain::redaction`]). A customer with an order still in progress
//! is refused: its address and token are needed until it settles. Forgetting twice changes
//! nothing the second time. Rejected orders keep no address at all.
//!
//! Outside the fleet's database, erasure is the providers' business: the payment provider and
//! the carrier (their sandboxes here) keep what they were sent under their own policies.

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::domain::redaction::{for_display, POSTAL_PREFIX_CHARS};
use crate::operator::report::TERMINAL_STATUSES;

/// What forgetting a customer did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Forgotten {
    pub customer_id: String,
    /// The customer's orders (all settled).
    pub orders: u64,
    /// Rows changed, per table: all zero when the customer was forgotten already.
    pub customers: u64,
    pub addresses: u64,
    pub payment_methods: u64,
    pub payment_tokens: u64,
    pub dead_letters: u64,
    /// Whether this run recorded the erasure (false: it was recorded before).
    pub recorded: bool,
}

/// Forgets `customer_id` in one transaction (see the module doc).
pub async fn forget(db: &mut deadpool_postgres::Client, customer_id: &str) -> Result<Forgotten> {
    let tx = db.transaction().await.context("beginning the erasure")?;
    let known = tx
        .query_opt(
            "SELECT 1 FROM customers WHERE id = $1 FOR UPDATE",
            &[&customer_id],
        )
        .await
        .context("reading the customer")?;
    if known.is_none() {
        bail!("no customer {customer_id:?} in this database");
    }
    let terminal: Vec<&str> = TERMINAL_STATUSES.to_vec();
    let rows = tx
        .query(
            "SELECT id, status FROM orders WHERE customer_id = $1 ORDER BY id FOR UPDATE",
            &[&customer_id],
        )
        .await
        .context("reading the customer's orders")?;
    let open: Vec<String> = rows
        .iter()
        .filter(|r| !terminal.contains(&r.get::<_, &str>(1)))
        .map(|r| format!("{} ({})", r.get::<_, &str>(0), r.get::<_, &str>(1)))
        .collect();
    if !open.is_empty() {
        bail!(
            "customer {customer_id} has {} order(s) still in progress: {}; their address and \
             payment token are needed until they settle. Forget the customer once they have \
             (`orderfleet report` lists open orders)",
            open.len(),
            open.join(", ")
        );
    }
    let orders: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let mut done = Forgotten {
        customer_id: customer_id.to_string(),
        orders: orders.len() as u64,
        ..Forgotten::default()
    };
    done.customers = tx
        .execute(
            "UPDATE customers SET email = '', name = '', updated_at = now()
              WHERE id = $1 AND (email <> '' OR name <> '')",
            &[&customer_id],
        )
        .await
        .context("forgetting the customer's email and name")?;
    done.addresses = tx
        .execute(
            "UPDATE orders
                SET shipping_address = jsonb_build_object(
                        'country', shipping_address->>'country',
                        'postal_prefix',
                        upper(left(regexp_replace(coalesce(shipping_address->>'postal_code', ''),
                                                  '\\s', '', 'g'), $2))),
                    payment_token = ''
              WHERE id = ANY($1) AND shipping_address IS NOT NULL
                AND NOT shipping_address ? 'postal_prefix'",
            &[&orders, &(POSTAL_PREFIX_CHARS as i32)],
        )
        .await
        .context("cutting the orders' addresses")?;
    done.payment_methods = tx
        .execute(
            "DELETE FROM payment_methods WHERE order_id = ANY($1)",
            &[&orders],
        )
        .await
        .context("deleting the payment methods")?;
    done.payment_tokens = tx
        .execute(
            "UPDATE payments SET payment_token = ''
              WHERE order_id = ANY($1) AND payment_token <> ''",
            &[&orders],
        )
        .await
        .context("emptying the payments' tokens")?
        + tx.execute(
            "UPDATE payment_attempts SET payment_token = ''
              WHERE order_id = ANY($1) AND payment_token <> ''",
            &[&orders],
        )
        .await
        .context("emptying the provider attempts' tokens")?;
    let dead = tx
        .query(
            "SELECT id, detail FROM outbox_dead_letters
              WHERE detail->>'order_id' = ANY($1) FOR UPDATE",
            &[&orders],
        )
        .await
        .context("reading the outbox dead letters")?;
    for row in &dead {
        let detail: serde_json::Value = row.get(1);
        let shown = for_display(&detail);
        if shown != detail {
            tx.execute(
                "UPDATE outbox_dead_letters SET detail = $2 WHERE id = $1",
                &[&row.get::<_, i64>(0), &shown],
            )
            .await
            .context("masking an outbox dead letter")?;
            done.dead_letters += 1;
        }
    }
    let changed = done.customers
        + done.addresses
        + done.payment_methods
        + done.payment_tokens
        + done.dead_letters
        > 0;
    // Once per customer; again only if there was something new to forget (a customer who
    // ordered again after an erasure).
    done.recorded = tx
        .execute(
            "INSERT INTO customer_erasures (customer_id, orders) VALUES ($1, $2)
             ON CONFLICT (customer_id) DO UPDATE
                SET erased_at = now(), orders = EXCLUDED.orders WHERE $3",
            &[&customer_id, &(orders.len() as i32), &changed],
        )
        .await
        .context("recording the erasure")?
        == 1;
    tx.commit().await.context("committing the erasure")?;
    Ok(done)
}
