//! Bought-together recommendations: completed orders feed `co_purchases` once per order, and
//! `recommendations::top_for_skus` ranks what was bought with the given SKUs. Without a
//! Personalize tracker, orders are counted in groups: one transaction per group, each order
//! once, rival groups without deadlock, nothing kept of a group lost before its commit.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::support::{self, applied, groups_at_once, refs};
use async_trait::async_trait;
use deadpool_postgres::Pool;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::handlers::personalization::Personalization;
use orderfleet::handlers::{AnyHandler, Context, GroupState};
use orderfleet::runtime::group::execute_group;
use orderfleet::runtime::{self, Executed};
use orderfleet::store::db::Tx;
use orderfleet::store::recommendations::{top_for_skus, Recommendation};
use serde_json::json;

/// An OrderCompleted as the orders worker publishes it, with `event_id` as its outbox id.
fn completed(event_id: &str, order_id: &str, lines: &[(&str, i64)]) -> Envelope {
    let lines: Vec<_> = lines
        .iter()
        .map(|(sku, quantity)| json!({"sku": sku, "quantity": quantity}))
        .collect();
    let body = support::event_body(
        "OrderCompleted",
        "orderfleet.orders",
        json!({
            "version": 1,
            "event_id": event_id,
            "order_id": order_id,
            "customer_id": "cus-1",
            "lines": lines,
            "total": {"amount_minor": 1000, "currency": "EUR"},
        }),
    );
    Envelope::decode(&body).expect("envelope")
}

async fn complete(pool: &Pool, event: &Envelope) -> Executed {
    runtime::execute(&Personalization::new(None), pool, event, 1)
        .await
        .expect("personalization")
}

fn rec(sku: &str, name: &str, score: i64) -> Recommendation {
    Recommendation {
        sku: sku.into(),
        name: name.into(),
        score,
    }
}

#[tokio::test]
async fn after_enough_completed_orders_recommendations_rank_by_how_often_items_were_bought_together(
) {
    let (pool, _) = support::fresh_db().await;
    let client = pool.get().await.unwrap();
    for (sku, name) in [
        ("A", "Anvil"),
        ("B", "Bellows"),
        ("C", "Chisel"),
        ("D", "Drill"),
    ] {
        client
            .execute(
                "INSERT INTO products (sku, doc) VALUES ($1, $2)",
                &[
                    &sku,
                    &json!({"name": name, "price": {"amount_minor": 100, "currency": "EUR"}}),
                ],
            )
            .await
            .unwrap();
    }
    // E has no catalogue entry: its name falls back to the SKU.
    let orders = [
        ("o1", vec![("A", 1), ("B", 1), ("C", 2)]),
        ("o2", vec![("A", 1), ("B", 3)]),
        ("o3", vec![("A", 1), ("B", 1), ("D", 1)]),
        ("o4", vec![("A", 1), ("C", 1), ("A", 2)]),
        ("o5", vec![("B", 1), ("E", 1)]),
    ];
    for (order_id, lines) in &orders {
        let event = completed(&format!("ev-{order_id}"), order_id, lines);
        assert_eq!(
            complete(&pool, &event).await,
            Executed::Applied { emitted: 0 }
        );
        // A redelivery of the event changes nothing...
        assert_eq!(complete(&pool, &event).await, Executed::Duplicate);
    }
    // ...and neither does the same order completed again under another event id.
    let again = completed("ev-o1-again", "o1", &orders[0].1);
    assert_eq!(
        complete(&pool, &again).await,
        Executed::Applied { emitted: 0 }
    );

    let skus = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        top_for_skus(&client, &skus(&["A"]), 5).await.unwrap(),
        vec![
            rec("B", "Bellows", 3),
            rec("C", "Chisel", 2),
            rec("D", "Drill", 1)
        ]
    );
    // Scores add up over the given SKUs, which are never recommended themselves; ties go by
    // SKU.
    assert_eq!(
        top_for_skus(&client, &skus(&["A", "B"]), 5).await.unwrap(),
        vec![
            rec("C", "Chisel", 3),
            rec("D", "Drill", 2),
            rec("E", "E", 1)
        ]
    );
    assert_eq!(
        top_for_skus(&client, &skus(&["A", "B"]), 1).await.unwrap(),
        vec![rec("C", "Chisel", 3)]
    );
    assert_eq!(
        top_for_skus(&client, &skus(&["E"]), 3).await.unwrap(),
        vec![rec("B", "Bellows", 1)]
    );
    assert!(top_for_skus(&client, &skus(&["Z"]), 3)
        .await
        .unwrap()
        .is_empty());
    assert!(top_for_skus(&client, &[], 3).await.unwrap().is_empty());

    // Both directions of every pair, never a SKU with itself.
    let asymmetric: i64 = client
        .query_one(
            "SELECT count(*) FROM co_purchases a
              WHERE a.sku = a.other_sku
                 OR NOT EXISTS (SELECT 1 FROM co_purchases b
                                 WHERE b.sku = a.other_sku AND b.other_sku = a.sku
                                   AND b.count = a.count)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(asymmetric, 0);
}

#[tokio::test]
async fn an_event_personalization_does_not_consume_is_refused_for_good() {
    let (pool, _) = support::fresh_db().await;
    let body = support::event_body(
        "OrderPlaced",
        "orderfleet.storefront",
        json!({"order_id": "o"}),
    );
    let event = Envelope::decode(&body).unwrap();
    let err = runtime::execute(&Personalization::new(None), &pool, &event, 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "permanent", "{err}");
}

/// The `co_purchases` table, as (sku, other_sku) → count.
async fn pair_counts(pool: &Pool) -> BTreeMap<(String, String), i64> {
    let client = pool.get().await.unwrap();
    client
        .query("SELECT sku, other_sku, count FROM co_purchases", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}

/// What `co_purchases` holds once each of `orders` is counted once: +1 for every ordered pair
/// of distinct SKUs of an order.
fn expected_pairs(orders: &[(String, Vec<(&str, i64)>)]) -> BTreeMap<(String, String), i64> {
    let mut pairs = BTreeMap::new();
    for (_, lines) in orders {
        let skus: BTreeSet<&str> = lines.iter().map(|(sku, _)| *sku).collect();
        for a in &skus {
            for b in &skus {
                if a != b {
                    *pairs.entry((a.to_string(), b.to_string())).or_default() += 1;
                }
            }
        }
    }
    pairs
}

/// `n` orders of three SKUs each out of six, so that every order shares SKUs with others.
fn overlapping_orders(n: usize) -> Vec<(String, Vec<(&'static str, i64)>)> {
    const SKUS: [&str; 6] = ["A", "B", "C", "D", "E", "F"];
    (0..n)
        .map(|i| {
            let lines = (0..3).map(|k| (SKUS[(i + 2 * k) % 6], 1)).collect();
            (format!("o{i:03}"), lines)
        })
        .collect()
}

#[tokio::test]
async fn a_group_of_completed_orders_counts_each_order_once_in_one_transaction() {
    let (pool, _) = support::fresh_db().await;
    let handler = Personalization::new(None);
    assert!(AnyHandler::group_commit(&handler));
    let orders: Vec<(String, Vec<(&str, i64)>)> = vec![
        ("o1".into(), vec![("A", 1), ("B", 1), ("C", 2)]),
        ("o2".into(), vec![("A", 1), ("B", 3)]),
        ("o3".into(), vec![("B", 1)]),
        ("o4".into(), vec![("A", 1), ("C", 1), ("A", 2)]),
    ];
    let mut events: Vec<Envelope> = orders
        .iter()
        .map(|(id, lines)| completed(&format!("ev-{id}"), id, lines))
        .collect();
    // The same event twice, and o1 completed again under another event id, in the group.
    events.push(events[1].clone());
    events.push(completed("ev-o1-again", "o1", &orders[0].1));

    let outcome = execute_group(&handler, &pool, &refs(&events, 1)).await;
    assert_eq!(outcome.transactions, 1, "{:?}", outcome.results);
    let answers: Vec<_> = outcome.results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        answers,
        [
            vec![Executed::Applied { emitted: 0 }; 4],
            vec![Executed::Duplicate, Executed::Applied { emitted: 0 }],
        ]
        .concat()
    );
    assert_eq!(pair_counts(&pool).await, expected_pairs(&orders));
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM personalization_orders").await,
        4
    );

    // A later group with the same orders (another delivery of each) adds nothing.
    let again: Vec<Envelope> = orders
        .iter()
        .map(|(id, lines)| completed(&format!("ev-{id}-later"), id, lines))
        .collect();
    let outcome = execute_group(&handler, &pool, &refs(&again, 1)).await;
    assert!(outcome.results.iter().all(applied));
    assert_eq!(pair_counts(&pool).await, expected_pairs(&orders));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rival_groups_completing_the_same_orders_in_opposite_order_count_each_once_without_deadlock(
) {
    let (pool, _) = support::fresh_db().await;
    let orders = overlapping_orders(60);
    // Four groups at once: two hold one copy each of the first thirty orders, in opposite
    // orders; the other two the same for the last thirty. Every group shares SKUs with every
    // other.
    let copy = |tag: &str, orders: &[(String, Vec<(&str, i64)>)]| -> Vec<Envelope> {
        orders
            .iter()
            .map(|(id, lines)| completed(&format!("ev-{id}-{tag}"), id, lines))
            .collect::<Vec<_>>()
    };
    let (first, last) = orders.split_at(30);
    let mut events = copy("a", first);
    events.extend(copy("b", first).into_iter().rev());
    events.extend(copy("a", last));
    events.extend(copy("b", last).into_iter().rev());
    groups_at_once(Arc::new(Personalization::new(None)), &pool, &events, 30).await;

    assert_eq!(pair_counts(&pool).await, expected_pairs(&orders));
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM personalization_orders").await,
        60
    );
}

/// Personalization, but the first transaction to reach its end fails after the counting
/// statement ran, as when the process dies or the connection drops before `COMMIT`.
struct LosesFirstCommit {
    inner: Personalization,
    lost: AtomicBool,
}

#[async_trait]
impl AnyHandler for LosesFirstCommit {
    fn name(&self) -> &str {
        AnyHandler::name(&self.inner)
    }
    fn source(&self) -> String {
        AnyHandler::source(&self.inner)
    }
    fn group_commit(&self) -> bool {
        true
    }
    async fn lock_group(
        &self,
        tx: &Tx,
        events: &[&Envelope],
        state: &mut GroupState,
    ) -> Result<(), HandlerError> {
        AnyHandler::lock_group(&self.inner, tx, events, state).await
    }
    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, GroupState>,
    ) -> Result<(), HandlerError> {
        AnyHandler::handle(&self.inner, event, cx).await
    }
    async fn finish(&self, tx: &Tx, state: GroupState) -> Result<(), HandlerError> {
        AnyHandler::finish(&self.inner, tx, state).await?;
        if self.lost.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        Err(HandlerError::retry("connection lost before COMMIT"))
    }
}

#[tokio::test]
async fn a_group_lost_before_its_commit_counts_nothing_and_its_orders_count_once_after() {
    let (pool, _) = support::fresh_db().await;
    let orders = overlapping_orders(8);
    let events: Vec<Envelope> = orders
        .iter()
        .map(|(id, lines)| completed(&format!("ev-{id}"), id, lines))
        .collect();
    let handler = LosesFirstCommit {
        inner: Personalization::new(None),
        lost: AtomicBool::new(false),
    };
    // The group's counting statement ran, then its transaction was lost: the runtime runs
    // every event again alone, and those commit.
    let outcome = execute_group(&handler, &pool, &refs(&events, 1)).await;
    assert!(handler.lost.load(Ordering::SeqCst));
    assert_eq!(outcome.transactions, 1 + 8, "{:?}", outcome.results);
    assert!(outcome.results.iter().all(applied), "{:?}", outcome.results);
    assert_eq!(pair_counts(&pool).await, expected_pairs(&orders));

    // And the redelivery of the whole group (its messages were received again after a
    // restart, say) finds every event claimed.
    let outcome = execute_group(&handler, &pool, &refs(&events, 2)).await;
    assert!(outcome
        .results
        .iter()
        .all(|r| matches!(r, Ok(Executed::Duplicate))));
    assert_eq!(pair_counts(&pool).await, expected_pairs(&orders));
}
