//! Privacy: the storefront's payment token stays with payments. Orders validates it and hands
//! it over through `payment_methods`; no event after `OrderPlaced` carries it (OrderAccepted
//! version 2), while a version-1 `OrderAccepted` from a worker not yet upgraded still
//! authorizes during a deploy.

use orderfleet::domain::events::{Event, OrderAccepted};
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::runtime::Executed;

use crate::support;
use crate::support::saga::*;

const TOKEN: &str = "tok_visa";

#[tokio::test]
async fn no_event_after_order_placed_carries_the_payment_token_and_the_order_still_completes() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1250, 10).await;
    fleet
        .publish_event(&order("ord-p1", &[("TEA-1", 2, 1250)], TOKEN))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-p1").await, "completed");

    let carrying = support::scalar(
        &pool,
        &format!(
            "SELECT count(*) FROM outbox
              WHERE detail_type <> 'OrderPlaced' AND detail::text LIKE '%{TOKEN}%'"
        ),
    )
    .await;
    assert_eq!(carrying, 0, "an event after OrderPlaced carried the token");
    let emitted_events = support::scalar(
        &pool,
        "SELECT count(*) FROM outbox WHERE detail_type <> 'OrderPlaced'",
    )
    .await;
    assert!(
        emitted_events >= 8,
        "the saga emitted {emitted_events} events"
    );

    let accepted = emitted(&pool, "OrderAccepted", Some("ord-p1")).await;
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0]["version"], OrderAccepted::VERSION);
    assert!(accepted[0].get("payment_token").is_none());

    // Orders keeps no copy; payments has the token it authorized and captured with.
    let kept_by_orders = support::scalar(
        &pool,
        "SELECT count(*) FROM orders WHERE id = 'ord-p1' AND payment_token <> ''",
    )
    .await;
    assert_eq!(kept_by_orders, 0);
    let c = pool.get().await.unwrap();
    let token: String = c
        .query_one(
            "SELECT payment_token FROM payments WHERE order_id = 'ord-p1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(token, TOKEN);
    assert_eq!(payment(&pool, "ord-p1").await.0, "captured");
}

/// The `OrderAccepted` of `order_id` as a worker of the previous version emits it: version 1,
/// with the token in the event.
async fn version_1_accepted(
    fleet: &orderfleet_testkit::inproc::Fleet,
    order_id: &str,
) -> orderfleet::domain::envelope::Envelope {
    fleet
        .publish_event(&order(order_id, &[("TEA-1", 1, 1250)], TOKEN))
        .await
        .unwrap();
    let mut accepted = fleet.deliver_until("OrderAccepted").await.unwrap();
    // As orders of the previous version sent it, before payment_methods existed.
    accepted.detail["version"] = 1.into();
    accepted.detail["payment_token"] = TOKEN.into();
    fleet
        .pool()
        .get()
        .await
        .unwrap()
        .execute(
            "DELETE FROM payment_methods WHERE order_id = $1",
            &[&order_id],
        )
        .await
        .unwrap();
    accepted
}

#[tokio::test]
async fn payments_still_authorizes_a_version_1_order_accepted_with_its_token_during_a_deploy() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1250, 10).await;
    let accepted = version_1_accepted(&fleet, "ord-p2").await;
    let answer = fleet.deliver_to(HandlerName::Payments, &accepted, 1).await;
    assert!(matches!(answer, Ok(Executed::Applied { .. })), "{answer:?}");
    assert_eq!(payment(&pool, "ord-p2").await.0, "authorized");
}

#[tokio::test]
async fn an_order_accepted_without_a_token_anywhere_is_refused_with_the_reason() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1250, 10).await;
    let mut accepted = version_1_accepted(&fleet, "ord-p3").await;
    accepted.detail["version"] = 2.into();
    accepted
        .detail
        .as_object_mut()
        .unwrap()
        .remove("payment_token");
    match fleet.deliver_to(HandlerName::Payments, &accepted, 1).await {
        Err(HandlerError::Permanent { reason }) => {
            assert!(reason.contains("no payment method on file"), "{reason}")
        }
        other => panic!("an order without a token was not refused: {other:?}"),
    }
    let rows = support::scalar(
        &pool,
        "SELECT count(*) FROM payments WHERE order_id = 'ord-p3'",
    )
    .await;
    assert_eq!(rows, 0, "a payment row was left behind");

    accepted.detail["version"] = 4.into();
    match fleet.deliver_to(HandlerName::Payments, &accepted, 1).await {
        Err(HandlerError::Permanent { reason }) => {
            assert!(reason.contains("versions 1 to 3"), "{reason}")
        }
        other => panic!("a version-4 OrderAccepted was not refused: {other:?}"),
    }
}

/// Runs `orderfleet customer forget` against `db_url`.
fn forget(db_url: &str, customer: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(["customer", "forget", customer, "--json"])
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run orderfleet customer forget")
}

#[tokio::test]
async fn forgetting_a_customer_removes_their_personal_data_keeps_the_money_and_is_idempotent() {
    let (pool, db_url) = support::fresh_db().await;
    let fleet = sandbox_fleet(pool.clone(), &db_url);
    stock_sku(&fleet, "TEA-1", 1250, 10).await;
    fleet
        .publish_event(&order("ord-f1", &[("TEA-1", 2, 1250)], TOKEN))
        .await
        .unwrap();
    fleet
        .publish_event(&order("ord-f2", &[("TEA-1", 1, 1250)], "tok_chargeback"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    // A third order, still in progress, holds the erasure back.
    fleet
        .publish_event(&order("ord-f3", &[("TEA-1", 1, 1250)], TOKEN))
        .await
        .unwrap();
    let accepted = fleet.deliver_until("OrderAccepted").await.unwrap();
    let refused = forget(&db_url, "cus-1");
    assert_eq!(refused.status.code(), Some(2), "an error exits 2");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("ord-f3") && why.contains("in progress"),
        "{why}"
    );
    fleet.deliver(&accepted).await;
    fleet.run_until_quiet().await.unwrap();
    assert_no_dead_letters(&fleet);

    let out = forget(&db_url, "cus-1");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["orders"], 3, "{done}");
    assert_eq!(done["recorded"], true);
    assert_eq!(done["addresses"], 3);

    // No email, name, street or token of the customer anywhere in the fleet's tables.
    let c = pool.get().await.unwrap();
    for (table, query) in [
        (
            "customers",
            "SELECT count(*) FROM customers WHERE email <> '' OR name <> ''",
        ),
        (
            "orders",
            "SELECT count(*) FROM orders
              WHERE shipping_address::text LIKE '%James%' OR payment_token <> ''",
        ),
        ("payment_methods", "SELECT count(*) FROM payment_methods"),
        (
            "payments",
            "SELECT count(*) FROM payments WHERE payment_token <> ''",
        ),
        (
            "payment_attempts",
            "SELECT count(*) FROM payment_attempts WHERE payment_token <> ''",
        ),
    ] {
        let n: i64 = c.query_one(query, &[]).await.unwrap().get(0);
        assert_eq!(n, 0, "{table} still holds personal data");
    }
    let address: serde_json::Value = c
        .query_one(
            "SELECT shipping_address FROM orders WHERE id = 'ord-f1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        address,
        serde_json::json!({"country": "GB", "postal_prefix": "SW1"})
    );
    // The money and every invariant are untouched.
    assert_eq!(status(&pool, "ord-f1").await, "completed");
    assert_ledger_balances(&pool).await;
    let mut db = pool.get().await.unwrap();
    let report = orderfleet::operator::report::build(&mut db).await.unwrap();
    assert!(report.holds(), "{report:?}");

    // Again: nothing left to change.
    let again = forget(&db_url, "cus-1");
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["recorded"], false, "{again}");
    assert_eq!(again["addresses"], 0);
    let erasures = support::scalar(&pool, "SELECT count(*) FROM customer_erasures").await;
    assert_eq!(erasures, 1);

    let unknown = forget(&db_url, "cus-nobody");
    assert_eq!(unknown.status.code(), Some(2));
}
