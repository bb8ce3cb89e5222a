//! Bought-together recommendations: completed orders feed `co_purchases` once per order, and
//! `recommendations::top_for_skus` ranks what was bought with the given SKUs.

use crate::support;
use deadpool_postgres::Pool;
use orderfleet::domain::envelope::Envelope;
use orderfleet::handlers::personalization::Personalization;
use orderfleet::runtime::{self, Executed};
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
