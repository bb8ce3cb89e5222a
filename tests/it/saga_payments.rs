//! The payment provider and the ledger: idempotency keys, retries, declines, and a ledger that
//! only ever balances and never changes.

use std::sync::Arc;
use std::time::Duration;

use crate::support;
use crate::support::saga::*;
use async_trait::async_trait;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::handlers::payments::Payments;
use orderfleet::handlers::{AnyHandler, Context, Handler};
use orderfleet::providers::payment::{
    PaymentProvider, ProviderError, ProviderOutcome, ProviderRequest, SandboxProvider,
};

fn request(key: &str, token: &str) -> ProviderRequest {
    ProviderRequest {
        idempotency_key: key.into(),
        payment_token: token.into(),
        amount: eur(1500),
        authorization_id: None,
    }
}

#[tokio::test]
async fn a_flaky_provider_is_retried_and_charges_once() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    fleet
        .publish_event(&order("ord-flaky", &[("TEA-1", 1, 1000)], "tok_flaky_2"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-flaky").await, "completed");
    // Two transient failures, then one decision, for each key.
    let (attempts, result) = provider_call(&pool, "auth:ord-flaky").await.unwrap();
    assert_eq!(attempts, 3);
    assert_eq!(result.unwrap()["outcome"], "approved");
    assert_eq!(
        provider_call(&pool, "capture:ord-flaky").await.unwrap().0,
        3
    );
    assert_eq!(fleet.stats().retries, 4);
    assert_eq!(
        emitted(&pool, "PaymentAuthorized", Some("ord-flaky"))
            .await
            .len(),
        1
    );
    assert_eq!(
        emitted(&pool, "PaymentCaptured", Some("ord-flaky"))
            .await
            .len(),
        1
    );
    assert_eq!(net_money(&pool, "ord-flaky").await, 1000);
}

#[tokio::test]
async fn the_sandbox_returns_the_first_outcome_for_a_repeated_key() {
    let (pool, _) = support::fresh_db().await;
    let sandbox = SandboxProvider::new(pool.clone(), Duration::ZERO);

    let first = sandbox
        .authorize(&request("auth:o1", "tok_visa"))
        .await
        .unwrap();
    let again = sandbox
        .authorize(&request("auth:o1", "tok_visa"))
        .await
        .unwrap();
    assert_eq!(first, again);
    assert!(
        matches!(first, ProviderOutcome::Approved { ref reference } if reference.starts_with("auth_"))
    );
    assert_eq!(provider_call(&pool, "auth:o1").await.unwrap().0, 2);

    // Deterministic declines by token.
    for (token, code) in [
        ("tok_decline", "card_declined"),
        ("tok_insufficient_funds", "insufficient_funds"),
    ] {
        let out = sandbox
            .authorize(&request(&format!("auth:{token}"), token))
            .await
            .unwrap();
        assert!(
            matches!(out, ProviderOutcome::Declined { code: ref c, .. } if c == code),
            "{out:?}"
        );
    }

    // A flaky token fails N times per key, then succeeds, and stays succeeded.
    for _ in 0..3 {
        assert!(matches!(
            sandbox.authorize(&request("auth:f", "tok_flaky_3")).await,
            Err(ProviderError::Transient(_))
        ));
    }
    let decided = sandbox
        .authorize(&request("auth:f", "tok_flaky_3"))
        .await
        .unwrap();
    assert_eq!(
        decided,
        sandbox
            .authorize(&request("auth:f", "tok_flaky_3"))
            .await
            .unwrap()
    );

    // Concurrent calls with one key agree.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let sandbox = sandbox.clone();
        tasks.spawn(async move { sandbox.authorize(&request("auth:c", "tok_visa")).await });
    }
    let mut outcomes = Vec::new();
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done.unwrap().unwrap());
    }
    assert!(outcomes.windows(2).all(|w| w[0] == w[1]));
}

/// Runs the real payments handler, then fails as if the process died before the commit: the
/// provider has acted, but the transaction rolls back.
pub(crate) struct CrashBeforeCommit(pub(crate) Payments);

#[async_trait]
impl Handler for CrashBeforeCommit {
    type Batch = <Payments as Handler>::Batch;

    fn name(&self) -> &str {
        "payments"
    }
    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Self::Batch>,
    ) -> Result<(), HandlerError> {
        Handler::handle(&self.0, event, cx).await?;
        Err(HandlerError::retry("simulated crash before commit"))
    }
}

#[tokio::test]
async fn a_charge_whose_transaction_rolled_back_is_not_charged_again_on_retry() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    fleet
        .publish_event(&order("ord-crash", &[("TEA-1", 1, 1000)], "tok_visa"))
        .await
        .unwrap();
    let placed = fleet.take(1).await.unwrap().remove(0);
    fleet.deliver(&placed).await;
    let accepted = fleet.take(1).await.unwrap().remove(0);

    let provider: Arc<dyn PaymentProvider> =
        Arc::new(SandboxProvider::new(pool.clone(), Duration::ZERO));
    let crashing = CrashBeforeCommit(Payments::new(provider));
    let err = orderfleet::runtime::execute(&crashing, &pool, &accepted, 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "retry");
    // The provider authorized; our side remembers nothing.
    let (attempts, first) = provider_call(&pool, "auth:ord-crash").await.unwrap();
    assert_eq!(attempts, 1);
    let c = pool.get().await.unwrap();
    let rows: i64 = c
        .query_one("SELECT count(*) FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);

    // The redelivery reuses the key and gets the same authorization back.
    fleet
        .deliver_to(HandlerName::Payments, &accepted, 2)
        .await
        .unwrap();
    fleet
        .deliver_to(HandlerName::Inventory, &accepted, 1)
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    let (attempts, again) = provider_call(&pool, "auth:ord-crash").await.unwrap();
    assert_eq!((attempts, again.clone()), (2, first.clone()));
    let authorized = emitted(&pool, "PaymentAuthorized", Some("ord-crash")).await;
    assert_eq!(authorized.len(), 1);
    assert_eq!(
        authorized[0]["authorization_id"],
        first.unwrap()["reference"]
    );
    assert_eq!(status(&pool, "ord-crash").await, "completed");
    assert_eq!(net_money(&pool, "ord-crash").await, 1000);
}

#[tokio::test]
async fn the_ledger_refuses_updates_deletes_and_unbalanced_transactions() {
    let (pool, _) = support::fresh_db().await;
    let mut c = pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    assert!(orderfleet::store::ledger::capture(&tx, "o1", eur(700))
        .await
        .unwrap());
    // The same movement again is a no-op.
    assert!(!orderfleet::store::ledger::capture(&tx, "o1", eur(700))
        .await
        .unwrap());
    tx.commit().await.unwrap();

    for sql in [
        "UPDATE ledger_postings SET amount_minor = 1",
        "DELETE FROM ledger_postings",
        "DELETE FROM ledger_transactions",
        "TRUNCATE ledger_postings",
    ] {
        let err = c.batch_execute(sql).await.unwrap_err();
        assert!(
            err.to_string().contains("append-only") || format!("{err:?}").contains("append-only"),
            "{sql}: {err:?}"
        );
    }

    // A one-sided posting is refused at commit by the database itself.
    let tx = c.transaction().await.unwrap();
    tx.batch_execute(
        "INSERT INTO ledger_transactions (idempotency_key, kind) VALUES ('bad', 'test');
         INSERT INTO ledger_postings (transaction_id, account_id, amount_minor, currency)
         SELECT currval('ledger_transactions_id_seq'), id, 5, 'EUR' FROM ledger_accounts WHERE name = 'refunds';",
    )
    .await
    .unwrap();
    let err = tx.commit().await.unwrap_err();
    assert!(format!("{err:?}").contains("does not balance"), "{err:?}");

    assert_ledger_balances(&pool).await;
    assert_eq!(ledger(&pool).await.get("payments_clearing:EUR"), Some(&700));
}

/// A fleet whose payments handler records its provider calls in `payment_attempts` before
/// making them, and a crashing copy of that handler for simulating a rolled-back transaction.
async fn attempt_logging_fleet() -> (orderfleet_testkit::inproc::Fleet, CrashBeforeCommit) {
    let (pool, url) = support::fresh_db().await;
    let provider: Arc<dyn PaymentProvider> = Arc::new(SandboxProvider::new(
        orderfleet::store::db::pool(&url, 8).unwrap(),
        Duration::ZERO,
    ));
    let fleet = sandbox_fleet(pool.clone(), &url).with_handler(
        HandlerName::Payments,
        Arc::new(Payments::with_attempt_log(provider.clone(), pool.clone())),
    );
    let crashing = CrashBeforeCommit(Payments::with_attempt_log(provider, pool));
    (fleet, crashing)
}

fn outcome_of(call: Option<(i32, Option<serde_json::Value>)>) -> String {
    let (_, result) = call.expect("the provider never saw this key");
    result.expect("the provider never decided this key")["outcome"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Scenario A: the authorization is approved but its transaction rolls back (the payment row
/// with it); inventory rejects and the cancellation overtakes the retried OrderAccepted. The
/// hold must still be released.
#[tokio::test]
async fn a_cancellation_that_overtakes_a_rolled_back_authorization_voids_the_hold() {
    let (fleet, crashing) = attempt_logging_fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 1).await;
    fleet
        .publish_event(&order("ord-lost-auth", &[("TEA-1", 2, 1000)], "tok_visa"))
        .await
        .unwrap();
    let placed = fleet.take(1).await.unwrap().remove(0);
    fleet.deliver(&placed).await;
    let accepted = fleet.take(1).await.unwrap().remove(0);
    assert_eq!(accepted.detail_type, "OrderAccepted");

    // The provider authorizes; our transaction (and the payment row it created) rolls back.
    let err = orderfleet::runtime::execute(&crashing, &pool, &accepted, 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "retry");
    assert_eq!(
        outcome_of(provider_call(&pool, "auth:ord-lost-auth").await),
        "approved"
    );

    // Inventory rejects, orders cancels, payments settles: all before the retry.
    fleet
        .deliver_to(HandlerName::Inventory, &accepted, 1)
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    // The retried OrderAccepted finds the payment settled and does nothing.
    fleet
        .deliver_to(HandlerName::Payments, &accepted, 2)
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-lost-auth").await, "cancelled");
    // No live hold: the authorization was voided at the provider.
    assert_eq!(
        outcome_of(provider_call(&pool, "void:ord-lost-auth").await),
        "approved"
    );
    assert_eq!(
        payment(&pool, "ord-lost-auth").await,
        ("voided".into(), 0, 0)
    );
    let voided = emitted(&pool, "PaymentVoided", Some("ord-lost-auth")).await;
    assert_eq!(voided.len(), 1);
    let auth = provider_call(&pool, "auth:ord-lost-auth")
        .await
        .unwrap()
        .1
        .unwrap();
    assert_eq!(voided[0]["authorization_id"], auth["reference"]);
    assert!(emitted(&pool, "PaymentAuthorized", Some("ord-lost-auth"))
        .await
        .is_empty());
    assert_ledger_balances(&pool).await;
    assert_eq!(net_money(&pool, "ord-lost-auth").await, 0);
}

/// Scenario B: the capture is approved but its transaction rolls back; the failed delivery
/// overtakes the retried OrderShipped. The captured money must be refunded, not the (already
/// captured) hold voided.
#[tokio::test]
async fn a_return_that_overtakes_a_rolled_back_capture_refunds_it() {
    let (fleet, crashing) = attempt_logging_fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    let mut placed = order("ord-lost-cap", &[("TEA-1", 2, 1000)], "tok_visa");
    placed.shipping_address.postal_code =
        orderfleet::providers::carrier::UNDELIVERABLE_POSTAL_CODE.into();
    fleet.publish_event(&placed).await.unwrap();

    let (shipped, failed) = loop {
        let event = fleet
            .take(1)
            .await
            .unwrap()
            .first()
            .expect("the saga stalled")
            .clone();
        if event.detail_type == "OrderShipped" {
            let failed = fleet.take(1).await.unwrap().remove(0);
            assert_eq!(failed.detail_type, "DeliveryFailed");
            break (event, failed);
        }
        fleet.deliver(&event).await;
    };

    // The provider captures; our transaction rolls back, so the payment stays `authorized`.
    let err = orderfleet::runtime::execute(&crashing, &pool, &shipped, 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "retry");
    assert_eq!(
        outcome_of(provider_call(&pool, "capture:ord-lost-cap").await),
        "approved"
    );
    assert_eq!(payment(&pool, "ord-lost-cap").await.0, "authorized");
    for h in fleet.consumers("OrderShipped") {
        if h != HandlerName::Payments {
            fleet.deliver_to(h, &shipped, 1).await.unwrap();
        }
    }

    // The failed delivery is settled before the capture's retry arrives.
    fleet.deliver(&failed).await;
    fleet.run_until_quiet().await.unwrap();
    fleet
        .deliver_to(HandlerName::Payments, &shipped, 2)
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-lost-cap").await, "returned");
    // The captured money went back, and nothing tried to void a captured hold.
    assert_eq!(
        outcome_of(provider_call(&pool, "refund:ord-lost-cap").await),
        "approved"
    );
    assert!(provider_call(&pool, "void:ord-lost-cap").await.is_none());
    assert_eq!(
        payment(&pool, "ord-lost-cap").await,
        ("refunded".into(), 2000, 2000)
    );
    assert_eq!(
        emitted(&pool, "PaymentRefunded", Some("ord-lost-cap"))
            .await
            .len(),
        1
    );
    assert_ledger_balances(&pool).await;
    let ledger = ledger(&pool).await;
    assert_eq!(ledger.get("payments_clearing:EUR"), Some(&0));
    assert_eq!(ledger.get("sales_revenue:EUR"), Some(&-2000));
    assert_eq!(ledger.get("refunds:EUR"), Some(&2000));
    assert_eq!(net_money(&pool, "ord-lost-cap").await, 0);
}

/// A ledger movement is written once per idempotency key, as one balanced transaction with
/// its two postings; an unbalanced one is refused and writes nothing.
#[tokio::test]
async fn a_ledger_movement_is_recorded_once_per_key_with_balanced_postings() {
    use orderfleet::store::ledger::{self, Account, Posting};
    let (pool, _) = support::fresh_db().await;
    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    assert!(ledger::capture(&tx, "ord-l", eur(1500)).await.unwrap());
    assert!(!ledger::capture(&tx, "ord-l", eur(1500)).await.unwrap());
    let unbalanced = [Posting {
        account: Account::SalesRevenue,
        amount_minor: 10,
        currency: eur(10).currency,
    }];
    let refused = ledger::record(&tx, "odd:ord-l", "ord-l", "odd", &unbalanced).await;
    assert!(
        matches!(refused, Err(HandlerError::Permanent { .. })),
        "{refused:?}"
    );
    tx.commit().await.expect("the ledger balances at commit");
    let row = client
        .query_one(
            "SELECT count(DISTINCT t.id), count(p.*), coalesce(sum(p.amount_minor), 0)::bigint,
                    count(*) FILTER (WHERE p.amount_minor > 0)
               FROM ledger_transactions t LEFT JOIN ledger_postings p ON p.transaction_id = t.id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3)
        ),
        (1, 2, 0, 1),
        "(transactions, postings, sum, debits)"
    );
}

/// Several movements go in one statement, each once: one recorded before and a repeat within
/// the batch write nothing, and each new one gets its own postings.
#[tokio::test]
async fn ledger_movements_recorded_together_are_each_posted_once() {
    use orderfleet::store::ledger::{self, Movement};
    let (pool, _) = support::fresh_db().await;
    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    assert!(ledger::capture(&tx, "ord-a", eur(700)).await.unwrap());
    let batch = [
        Movement::capture("ord-a", eur(700)).unwrap(), // recorded before
        Movement::capture("ord-b", eur(300)).unwrap(),
        Movement::refund("ord-b", eur(300)).unwrap(),
        Movement::capture("ord-b", eur(300)).unwrap(), // again, in the same batch
        Movement::capture("ord-c", eur(50)).unwrap(),
    ];
    assert_eq!(ledger::record_all(&tx, &batch).await.unwrap(), 3);
    assert_eq!(ledger::record_all(&tx, &batch).await.unwrap(), 0);
    tx.commit()
        .await
        .expect("every transaction balances at commit");
    let rows = client
        .query(
            "SELECT t.idempotency_key, count(p.*), sum(abs(p.amount_minor))::bigint
               FROM ledger_transactions t JOIN ledger_postings p ON p.transaction_id = t.id
              GROUP BY t.idempotency_key ORDER BY t.idempotency_key",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want = [
        ("capture:ord-a", 2, 1400),
        ("capture:ord-b", 2, 600),
        ("capture:ord-c", 2, 100),
        ("refund:ord-b", 2, 600),
    ];
    let want: Vec<(String, i64, i64)> = want
        .iter()
        .map(|(k, n, s)| (k.to_string(), *n, *s))
        .collect();
    assert_eq!(got, want);
    assert_ledger_balances(&pool).await;
    assert_eq!(net_money(&pool, "ord-b").await, 0);
}

/// The `OrderAccepted` events of `ids` (one unit of `sku` at `price` each, paid with
/// `tok_visa`), in the order of `ids`, delivered to no one yet.
async fn accepted_events(
    fleet: &orderfleet_testkit::inproc::Fleet,
    ids: &[&str],
    sku: &str,
    price: i64,
) -> Vec<Envelope> {
    for id in ids {
        fleet
            .publish_event(&order(id, &[(sku, 1, price)], "tok_visa"))
            .await
            .unwrap();
    }
    for placed in fleet.take(ids.len()).await.unwrap() {
        fleet.deliver(&placed).await;
    }
    let accepted = fleet.take(ids.len()).await.unwrap();
    ids.iter()
        .map(|id| {
            accepted
                .iter()
                .find(|e| e.detail_type == "OrderAccepted" && e.order_id() == Some(*id))
                .unwrap_or_else(|| panic!("no OrderAccepted for {id}: {accepted:?}"))
                .clone()
        })
        .collect()
}

/// The `OrderCancelled` that orders emits when the customer cancels `order_id`.
async fn cancelled_by_customer(
    fleet: &orderfleet_testkit::inproc::Fleet,
    order_id: &str,
) -> Envelope {
    fleet.publish_event(&cancellation(order_id)).await.unwrap();
    let request = fleet.take(1).await.unwrap().remove(0);
    assert_eq!(request.detail_type, "OrderCancellationRequested");
    fleet.deliver(&request).await;
    let cancelled = fleet.take(1).await.unwrap().remove(0);
    assert_eq!(cancelled.detail_type, "OrderCancelled");
    assert_eq!(cancelled.order_id(), Some(order_id));
    cancelled
}

/// Holds the `payment_attempts` key `key` in an open transaction on a connection of its own,
/// so that a payments transaction about to record that attempt (just before it calls the
/// provider) waits for it. Returns the transaction's client and its backend pid.
async fn hold_attempt(
    pool: &deadpool_postgres::Pool,
    order_id: &str,
    key: &str,
) -> (deadpool_postgres::Object, i32) {
    let client = pool.get().await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "INSERT INTO payment_attempts (idempotency_key, order_id, operation, payment_token,
                 amount_minor, currency) VALUES ($1, $2, 'authorize', 'tok_visa', 0, 'EUR')",
            &[&key, &order_id],
        )
        .await
        .unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    (client, pid)
}

/// Waits until a session of this database waits for the backend `pid`.
async fn wait_blocked_by(pool: &deadpool_postgres::Pool, pid: i32, what: &str) {
    support::wait_for(Duration::from_secs(10), what, || async {
        let c = pool.get().await.unwrap();
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND $1 = ANY(pg_blocking_pids(pid))",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        (n > 0).then_some(())
    })
    .await;
}

/// Approved authorizations in the sandbox's records for `order_id`, and approved voids.
async fn approved_at_provider(pool: &deadpool_postgres::Pool, order_id: &str) -> (bool, bool) {
    let approved = |call: Option<(i32, Option<serde_json::Value>)>| {
        call.and_then(|(_, r)| r)
            .is_some_and(|r| r["outcome"] == "approved")
    };
    (
        approved(provider_call(pool, &format!("auth:{order_id}")).await),
        approved(provider_call(pool, &format!("void:{order_id}")).await),
    )
}

/// Runs `event` alone with `handler` until it is not answered with a retry (a bounded number
/// of times), as SQS would deliver it again.
async fn execute_until_answered(
    handler: &dyn AnyHandler,
    pool: &deadpool_postgres::Pool,
    event: &Envelope,
    first: Result<orderfleet::runtime::Executed, HandlerError>,
) {
    let mut outcome = first;
    for receive in 2..6 {
        match &outcome {
            Err(HandlerError::Retry { .. }) => {
                outcome = orderfleet::runtime::execute(handler, pool, event, receive).await;
            }
            _ => break,
        }
    }
    assert!(outcome.is_ok(), "{}: {outcome:?}", event.detail_type);
}

/// Issue 12: a group reads that order X has no payment row; meanwhile the customer's
/// cancellation of X is handled alone by another process. The cancellation must wait for the
/// group (same per-order lock), and then void the hold the group placed: no approved
/// authorization of a cancelled order is left without an approved void.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_handled_while_a_group_authorizes_the_order_leaves_no_hold_on_the_card() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    let accepted = accepted_events(&fleet, &["ord-race-x", "ord-race-y"], "TEA-1", 1000).await;
    let cancel = cancelled_by_customer(&fleet, "ord-race-x").await;
    let payments = fleet.handler(HandlerName::Payments).unwrap();

    // The group locks its orders, reads no payment row for X, and stops just before it
    // records (then makes) its authorize call.
    let (blocker, blocker_pid) = hold_attempt(&pool, "ord-race-x", "auth:ord-race-x").await;
    let group = {
        let (payments, pool, events) = (payments.clone(), pool.clone(), accepted.clone());
        tokio::spawn(async move {
            let refs: Vec<(&Envelope, u32)> = events.iter().map(|e| (e, 1)).collect();
            orderfleet::runtime::group::execute_group(&*payments, &pool, &refs).await
        })
    };
    wait_blocked_by(&pool, blocker_pid, "the group to reach the authorize call").await;

    // Another process handles the cancellation alone, while the group is there.
    let alone = {
        let (payments, pool, cancel) = (payments.clone(), pool.clone(), cancel.clone());
        tokio::spawn(
            async move { orderfleet::runtime::execute(&*payments, &pool, &cancel, 1).await },
        )
    };
    // It either finishes (it did not wait for the group), or waits for the group's lock.
    support::wait_for(
        Duration::from_secs(10),
        "the cancellation to finish or to wait for the group",
        || async {
            if alone.is_finished() {
                return Some(());
            }
            let c = pool.get().await.unwrap();
            let waiting: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND wait_event_type = 'Lock'
                        AND NOT $1 = ANY(pg_blocking_pids(pid))",
                    &[&blocker_pid],
                )
                .await
                .unwrap()
                .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await;
    let cancel_waited = !alone.is_finished();
    blocker.batch_execute("ROLLBACK").await.unwrap();

    let outcome = group.await.unwrap();
    let group_transactions = outcome.transactions;
    for (event, result) in accepted.iter().zip(outcome.results) {
        execute_until_answered(&*payments, &pool, event, result).await;
    }
    execute_until_answered(&*payments, &pool, &cancel, alone.await.unwrap()).await;
    // The rest of the saga sees all of it.
    for event in accepted.iter().chain([&cancel]) {
        for h in fleet.consumers(&event.detail_type) {
            if h != HandlerName::Payments {
                fleet.deliver_with_retries(h, event).await;
            }
        }
    }
    fleet.run_until_quiet().await.unwrap();

    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-race-x").await, "cancelled");
    let (authorized, voided) = approved_at_provider(&pool, "ord-race-x").await;
    assert!(authorized, "the group authorized X at the provider");
    assert!(
        voided,
        "X is cancelled, yet its approved authorization was never voided at the provider"
    );
    assert_eq!(payment(&pool, "ord-race-x").await.0, "voided");
    assert_ledger_balances(&pool).await;
    assert_eq!(net_money(&pool, "ord-race-x").await, 0);
    // How: the cancellation waited for the group's lock, and the group committed whole.
    assert!(cancel_waited, "the cancellation did not wait for the group");
    assert_eq!(group_transactions, 1);
    let report = orderfleet::operator::report::build(&mut pool.get().await.unwrap())
        .await
        .unwrap();
    assert_eq!(report.invariants.get(DANGLING), Some(&true), "{report:?}");
}

/// A rival that creates the payment row without the per-order lock (a worker of an older
/// version, during a rolling deploy) can still make a group's authorization lose its row. The
/// hold it placed is then voided at the provider when the order's events run again, not left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_that_lost_its_payment_row_to_an_unlocked_rival_is_voided() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    let accepted = accepted_events(&fleet, &["ord-lost-x", "ord-lost-y"], "TEA-1", 1000).await;
    let payments = fleet.handler(HandlerName::Payments).unwrap();

    let (blocker, blocker_pid) = hold_attempt(&pool, "ord-lost-x", "auth:ord-lost-x").await;
    let group = {
        let (payments, pool, events) = (payments.clone(), pool.clone(), accepted.clone());
        tokio::spawn(async move {
            let refs: Vec<(&Envelope, u32)> = events.iter().map(|e| (e, 1)).collect();
            orderfleet::runtime::group::execute_group(&*payments, &pool, &refs).await
        })
    };
    wait_blocked_by(&pool, blocker_pid, "the group to reach the authorize call").await;
    // The rival cancels X in the table, calling no provider, and commits.
    pool.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO payments (order_id, state, amount_minor, currency, payment_token)
             VALUES ('ord-lost-x', 'voided', 1000, 'EUR', '')",
            &[],
        )
        .await
        .unwrap();
    blocker.batch_execute("ROLLBACK").await.unwrap();

    let outcome = group.await.unwrap();
    for (event, result) in accepted.iter().zip(outcome.results) {
        execute_until_answered(&*payments, &pool, event, result).await;
    }

    let (authorized, voided) = approved_at_provider(&pool, "ord-lost-x").await;
    assert!(authorized, "the group authorized X at the provider");
    assert!(voided, "the hold that lost its row was left on the card");
    assert_eq!(payment(&pool, "ord-lost-x").await.0, "voided");
    assert_eq!(payment(&pool, "ord-lost-y").await.0, "authorized");
    assert_ledger_balances(&pool).await;
}

const DANGLING: &str = "cancelled_and_rejected_orders_left_no_hold_at_the_provider";

/// `orderfleet report` checks the provider's records (the sandbox's table here): an approved
/// authorization of a cancelled or rejected order that was never voided is a broken invariant,
/// and a normal cancellation leaves none.
#[tokio::test]
async fn the_report_flags_a_hold_left_on_a_rejected_order_and_not_a_normal_cancellation() {
    let fleet = fleet().await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 1).await;
    // Authorized, then cancelled for want of stock: authorized and voided at the provider.
    fleet
        .publish_event(&order("ord-short", &[("TEA-1", 2, 1000)], "tok_visa"))
        .await
        .unwrap();
    // Rejected (unknown SKU): never authorized.
    fleet
        .publish_event(&order("ord-bad", &[("NO-SUCH-SKU", 1, 1000)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_no_dead_letters(&fleet);
    assert_eq!(status(&pool, "ord-short").await, "cancelled");
    assert_eq!(status(&pool, "ord-bad").await, "rejected");
    assert_eq!(approved_at_provider(&pool, "ord-short").await, (true, true));

    let report = orderfleet::operator::report::build(&mut pool.get().await.unwrap())
        .await
        .unwrap();
    assert_eq!(report.invariants.get(DANGLING), Some(&true), "{report:?}");
    assert!(report.holds(), "{:?}", report.violations);

    // A hold the provider approved for the rejected order, and nobody voided.
    pool.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO sandbox_provider_calls (idempotency_key, operation, payment_token,
                 amount_minor, currency, attempts, result, decided_at)
             VALUES ('auth:ord-bad', 'authorize', 'tok_visa', 1000, 'EUR', 1,
                     '{\"outcome\": \"approved\", \"reference\": \"auth_planted\"}', now())",
            &[],
        )
        .await
        .unwrap();
    let report = orderfleet::operator::report::build(&mut pool.get().await.unwrap())
        .await
        .unwrap();
    assert_eq!(report.invariants.get(DANGLING), Some(&false), "{report:?}");
    assert!(!report.holds());
    let found = &report.violations[DANGLING];
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("order ord-bad (rejected)") && found[0].contains("auth_planted"),
        "{found:?}"
    );
    let text = orderfleet::cli::report::render(&report);
    assert!(text.contains(&format!("[FAIL] {DANGLING}")), "{text}");
}

/// A provider that takes every call and never answers.
struct SilentProvider;

#[async_trait]
impl PaymentProvider for SilentProvider {
    async fn authorize(&self, _: &ProviderRequest) -> Result<ProviderOutcome, ProviderError> {
        std::future::pending().await
    }
    async fn capture(&self, _: &ProviderRequest) -> Result<ProviderOutcome, ProviderError> {
        std::future::pending().await
    }
    async fn void(&self, _: &ProviderRequest) -> Result<ProviderOutcome, ProviderError> {
        std::future::pending().await
    }
    async fn refund(&self, _: &ProviderRequest) -> Result<ProviderOutcome, ProviderError> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_provider_that_never_answers_is_given_up_before_the_handler_s_time_with_its_reason() {
    let fleet = fleet().await;
    stock_sku(&fleet, "TEA-1", 1000, 5).await;
    let accepted = accepted_events(&fleet, &["ord-silent"], "TEA-1", 1000).await;
    let payments = Payments::with_attempt_log(Arc::new(SilentProvider), fleet.pool().clone());
    assert_gives_up_on_a_silent_call(
        &payments,
        fleet.pool(),
        &accepted[0],
        "the provider's authorize",
    )
    .await;
    // The attempt was logged before the call, so the retry replays it by key.
    let logged = logged_attempts(fleet.pool(), "auth:ord-silent").await;
    assert_eq!(logged, 1, "the attempt is logged for its replay");
    assert_eq!(status(fleet.pool(), "ord-silent").await, "accepted");
}

/// How many attempts with `key` the attempt log holds.
async fn logged_attempts(pool: &deadpool_postgres::Pool, key: &str) -> i64 {
    let c = pool.get().await.unwrap();
    c.query_one(
        "SELECT count(*) FROM payment_attempts WHERE idempotency_key = $1",
        &[&key],
    )
    .await
    .unwrap()
    .get(0)
}
