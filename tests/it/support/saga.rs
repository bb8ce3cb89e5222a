//! Support for the order saga tests: a fleet on a fresh database, a catalogue with stock, order
//! builders, and readers of what the saga left behind.

use std::collections::BTreeMap;

use crate::support;
use chrono::Utc;
use deadpool_postgres::Pool;
use orderfleet::domain::events::{
    Address, Currency, Customer, Meta, Money, OrderCancellationRequested, OrderPlaced, PlacedLine,
    ProductUpserted, StockReceived,
};
use orderfleet_testkit::inproc::Fleet;
use serde_json::Value;

pub fn eur(amount_minor: i64) -> Money {
    Money::new(amount_minor, Currency::new("EUR").unwrap())
}

/// A fresh database and the four saga handlers on it.
pub async fn fleet() -> Fleet {
    let (pool, url) = support::fresh_db().await;
    sandbox_fleet(pool, &url)
}

/// The saga handlers on `pool`, with the sandbox provider on its own pool of the same database
/// (so that concurrent payments cannot starve it of connections).
pub fn sandbox_fleet(pool: Pool, url: &str) -> Fleet {
    let provider_pool = orderfleet::store::db::pool(url, 16).unwrap();
    Fleet::sandbox_with(pool, provider_pool, std::time::Duration::ZERO)
}

/// Catalogues `sku` at `price` (EUR minor units) with `on_hand` units, and runs to rest.
pub async fn stock_sku(fleet: &Fleet, sku: &str, price: i64, on_hand: i64) {
    fleet
        .publish_event(&ProductUpserted {
            meta: Meta::with_id(support::unique("prod-")),
            sku: sku.into(),
            name: format!("Product {sku}"),
            price: Some(eur(price)),
            extra: Default::default(),
        })
        .await
        .unwrap();
    if on_hand > 0 {
        fleet
            .publish_event(&StockReceived {
                meta: Meta::with_id(support::unique("stock-")),
                sku: sku.into(),
                quantity: on_hand,
            })
            .await
            .unwrap();
    }
    fleet.run_until_quiet().await.unwrap();
}

/// A valid order of `lines` (sku, quantity, unit price in EUR minor units) paid with `token`.
pub fn order(order_id: &str, lines: &[(&str, i64, i64)], token: &str) -> OrderPlaced {
    OrderPlaced {
        meta: Meta::with_id(format!("placed-{order_id}")),
        order_id: order_id.into(),
        customer: Customer {
            id: "cus-1".into(),
            email: Some("ada@example.com".into()),
            name: "Ada Lovelace".into(),
        },
        lines: lines
            .iter()
            .map(|&(sku, quantity, price)| PlacedLine {
                sku: sku.into(),
                quantity,
                unit_price: eur(price),
            })
            .collect(),
        shipping_address: Address {
            name: "Ada Lovelace".into(),
            line1: "12 St James's Square".into(),
            line2: None,
            city: "London".into(),
            postal_code: "SW1Y 4JH".into(),
            country: "GB".into(),
        },
        payment_token: token.into(),
        placed_at: Utc::now(),
        order_number: None,
        platform: None,
        charges: Default::default(),
    }
}

pub fn cancellation(order_id: &str) -> OrderCancellationRequested {
    OrderCancellationRequested {
        meta: Meta::with_id(format!("cancel-{order_id}")),
        order_id: order_id.into(),
        reason: "changed my mind".into(),
    }
}

/// An order's row: status and the three sub-states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRow {
    pub status: String,
    pub reservation: String,
    pub payment: String,
    pub delivery: String,
    pub total_minor: Option<i64>,
    pub tracking_number: Option<String>,
}

pub async fn order_row(pool: &Pool, order_id: &str) -> OrderRow {
    let c = pool.get().await.unwrap();
    let r = c
        .query_one(
            "SELECT status, reservation_state, payment_state, delivery_state, total_minor,
                    tracking_number
               FROM orders WHERE id = $1",
            &[&order_id],
        )
        .await
        .unwrap_or_else(|e| panic!("order {order_id}: {e}"));
    OrderRow {
        status: r.get(0),
        reservation: r.get(1),
        payment: r.get(2),
        delivery: r.get(3),
        total_minor: r.get(4),
        tracking_number: r.get(5),
    }
}

pub async fn status(pool: &Pool, order_id: &str) -> String {
    order_row(pool, order_id).await.status
}

/// (on_hand, reserved) of a SKU.
pub async fn stock(pool: &Pool, sku: &str) -> (i64, i64) {
    let c = pool.get().await.unwrap();
    let r = c
        .query_one(
            "SELECT on_hand, reserved FROM stock WHERE sku = $1",
            &[&sku],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// A payment row: (state, captured_minor, refunded_minor).
pub async fn payment(pool: &Pool, order_id: &str) -> (String, i64, i64) {
    let c = pool.get().await.unwrap();
    let r = c
        .query_one(
            "SELECT state, captured_minor, refunded_minor FROM payments WHERE order_id = $1",
            &[&order_id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// The details of the events of `detail_type` in the outbox, optionally for one order.
pub async fn emitted(pool: &Pool, detail_type: &str, order_id: Option<&str>) -> Vec<Value> {
    let c = pool.get().await.unwrap();
    c.query(
        "SELECT detail FROM outbox WHERE detail_type = $1
            AND ($2::text IS NULL OR detail->>'order_id' = $2) ORDER BY id",
        &[&detail_type, &order_id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Detail-types emitted for one order, in outbox order.
pub async fn history(pool: &Pool, order_id: &str) -> Vec<String> {
    let c = pool.get().await.unwrap();
    c.query(
        "SELECT detail_type FROM outbox WHERE detail->>'order_id' = $1 ORDER BY id",
        &[&order_id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// What the sandbox provider remembers of a key: (attempts, decided result).
pub async fn provider_call(pool: &Pool, key: &str) -> Option<(i32, Option<Value>)> {
    let c = pool.get().await.unwrap();
    c.query_opt(
        "SELECT attempts, result FROM sandbox_provider_calls WHERE idempotency_key = $1",
        &[&key],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1)))
}

/// Sum of postings per (account, currency).
pub async fn ledger(pool: &Pool) -> BTreeMap<String, i64> {
    let c = pool.get().await.unwrap();
    orderfleet::store::ledger::balances(&c)
        .await
        .unwrap()
        .into_iter()
        .map(|b| (format!("{}:{}", b.account, b.currency), b.amount_minor))
        .collect()
}

/// Asserts every ledger transaction balances and the ledger sums to zero per currency.
pub async fn assert_ledger_balances(pool: &Pool) {
    let c = pool.get().await.unwrap();
    let unbalanced = orderfleet::store::ledger::unbalanced_transactions(&c)
        .await
        .unwrap();
    assert!(
        unbalanced.is_empty(),
        "unbalanced transactions {unbalanced:?}"
    );
    let sums = c
        .query(
            "SELECT currency::text, sum(amount_minor)::bigint FROM ledger_postings GROUP BY currency",
            &[],
        )
        .await
        .unwrap();
    for r in sums {
        let (currency, sum): (String, i64) = (r.get(0), r.get(1));
        assert_eq!(sum, 0, "the ledger does not sum to zero in {currency}");
    }
}

/// Net movement on payments_clearing for one order (what the provider owes us for it).
pub async fn net_money(pool: &Pool, order_id: &str) -> i64 {
    let c = pool.get().await.unwrap();
    c.query_one(
        "SELECT coalesce(sum(p.amount_minor), 0)::bigint
           FROM ledger_postings p
           JOIN ledger_transactions t ON t.id = p.transaction_id
           JOIN ledger_accounts a ON a.id = p.account_id
          WHERE t.order_id = $1 AND a.name = 'payments_clearing'",
        &[&order_id],
    )
    .await
    .unwrap()
    .get(0)
}

/// Reserved stock equals the open reservations, per SKU.
pub async fn assert_reservations_match_stock(pool: &Pool) {
    let c = pool.get().await.unwrap();
    let off = c
        .query(
            "SELECT s.sku, s.reserved, coalesce(r.open, 0)::bigint
               FROM stock s LEFT JOIN (SELECT sku, sum(quantity) AS open FROM reservations
                                        WHERE state = 'reserved' GROUP BY sku) r ON r.sku = s.sku
              WHERE s.reserved <> coalesce(r.open, 0)",
            &[],
        )
        .await
        .unwrap();
    assert!(
        off.is_empty(),
        "stock.reserved differs from open reservations for {:?}",
        off.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    );
}

/// The stock movements' log adds up to every stock row: on hand is what was received, less
/// what shipped, plus what came back after shipping; reserved is what was reserved, less what
/// was released, shipped, or returned before it shipped.
pub async fn assert_movements_match_stock(pool: &Pool) {
    let c = pool.get().await.unwrap();
    let off = c
        .query(
            "WITH m AS (
                 SELECT sku, kind, quantity,
                        EXISTS (SELECT 1 FROM stock_movements c
                                 WHERE c.kind = 'committed' AND c.sku = m.sku
                                   AND c.order_id = m.order_id) AS after_shipping
                   FROM stock_movements m
             ), logged AS (
                 SELECT sku,
                        sum(CASE WHEN kind = 'received' THEN quantity
                                 WHEN kind = 'committed' THEN -quantity
                                 WHEN kind = 'returned' AND after_shipping THEN quantity
                                 ELSE 0 END)::bigint AS on_hand,
                        sum(CASE WHEN kind = 'reserved' THEN quantity
                                 WHEN kind IN ('released', 'committed') THEN -quantity
                                 WHEN kind = 'returned' AND NOT after_shipping THEN -quantity
                                 ELSE 0 END)::bigint AS reserved
                   FROM m GROUP BY sku
             )
             SELECT s.sku, s.on_hand, s.reserved, l.on_hand, l.reserved
               FROM stock s LEFT JOIN logged l ON l.sku = s.sku
              WHERE (s.on_hand, s.reserved) IS DISTINCT FROM (l.on_hand, l.reserved)",
            &[],
        )
        .await
        .unwrap();
    assert!(
        off.is_empty(),
        "stock differs from its movements (sku, on_hand, reserved, logged on_hand, logged reserved): {:?}",
        off.iter()
            .map(|r| (
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
                r.get::<_, Option<i64>>(3),
                r.get::<_, Option<i64>>(4)
            ))
            .collect::<Vec<_>>()
    );
}

/// The fleet went through without a dead letter.
pub fn assert_no_dead_letters(fleet: &Fleet) {
    let dead = fleet.dead_letters();
    assert!(
        dead.is_empty(),
        "dead letters: {:#?}",
        dead.iter()
            .map(|d| (d.handler, d.envelope.detail_type.clone(), d.reason.clone()))
            .collect::<Vec<_>>()
    );
}

/// Runs `event` alone through `handler`, with `limit` as the handler's time as the runtime sets
/// it, and asserts that the handler gave up on an outside call that never answered by itself,
/// before its time ran out, with a retry naming `call` (e.g. "the carrier's ship").
pub async fn assert_gives_up_on_a_silent_call(
    handler: &dyn orderfleet::handlers::AnyHandler,
    pool: &Pool,
    event: &orderfleet::domain::envelope::Envelope,
    call: &str,
) {
    use orderfleet::domain::outcome::HandlerError;
    use orderfleet::runtime::group::{execute_group_with, Limits};
    let limit = std::time::Duration::from_secs(4);
    let started = std::time::Instant::now();
    let outcome = execute_group_with(
        handler,
        pool,
        &[(event, 1)],
        &Limits {
            event_timeout: limit,
            ..Limits::default()
        },
    )
    .await;
    // The handler ended the call itself, with time left to roll back and say why; the
    // runtime's own timeout (which would abandon the call mid-flight) never fired.
    assert!(started.elapsed() < limit, "{:?}", started.elapsed());
    match &outcome.results[0] {
        Err(HandlerError::Retry { reason, .. }) => assert!(
            reason.contains(&format!("{call} did not answer within")),
            "{reason}"
        ),
        other => panic!("expected a retry, got {other:?}"),
    }
}
