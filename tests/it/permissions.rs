//! Least privilege in the fleet's own code: each worker publishes to the bus only what its own
//! handlers emitted, under their sources, because that is all its IAM role allows
//! (`events:source`, checked against the catalogue in `xtask/tests/deploy_cfn.rs`).

use orderfleet::domain::catalogue;
use orderfleet::domain::names::HandlerName;
use orderfleet::store::outbox::Relay;

use crate::support;

#[tokio::test]
async fn a_worker_s_relay_publishes_only_the_events_its_own_handlers_emitted() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let c = pool.get().await.unwrap();
    for source in ["orderfleet.orders", "orderfleet.payments"] {
        c.execute(
            "INSERT INTO outbox (event_id, source, detail_type, detail)
             VALUES (gen_random_uuid(), $1, 'Probe', '{\"order_id\": \"o-1\"}')",
            &[&source],
        )
        .await
        .unwrap();
    }
    let orders = HandlerName::Orders;
    assert!(catalogue::produces(orders));
    let relay = Relay::new(
        pool.clone(),
        clients.events.clone(),
        topo.bus_name.clone(),
        vec![orders.source()],
    );
    let pass = relay.publish_once().await.unwrap();
    assert_eq!(pass.published, 1);
    assert_eq!(relay.publish_once().await.unwrap().published, 0);
    let left: Vec<String> = c
        .query("SELECT source FROM outbox WHERE published_at IS NULL", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["orderfleet.payments".to_string()]);
}

#[test]
fn only_orders_inventory_payments_and_fulfillment_emit_events_so_only_their_workers_relay() {
    // Analytics, notifications and personalization only consume: their workers publish
    // nothing, and their roles have no PutEvents.
    for h in [
        HandlerName::Analytics,
        HandlerName::Notifications,
        HandlerName::Personalization,
    ] {
        assert!(!catalogue::produces(h), "{h}");
    }
    for h in [
        HandlerName::Orders,
        HandlerName::Inventory,
        HandlerName::Payments,
        HandlerName::Fulfillment,
    ] {
        assert!(catalogue::produces(h), "{h}");
    }
}
