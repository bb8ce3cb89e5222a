//! The relay under a backlog: a pass takes up to a hundred rows and publishes them in PutEvents
//! calls of ten, sent at once, in one transaction; rival relays share a backlog without
//! publishing an event twice. Counted at the benchmark endpoint, which serves EventBridge's
//! PutEvents and counts its calls and entries.

use aws_sdk_eventbridge::config::{BehaviorVersion, Credentials, Region};
use deadpool_postgres::Pool;
use orderfleet::store::outbox::{Relay, RELAY_PASS_ROWS};

use crate::support;

const SOURCE: &str = "orderfleet.orders";

/// Writes `n` outbox rows of the orders' source.
async fn backlog(pool: &Pool, n: i32) {
    pool.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO outbox (event_id, source, detail_type, detail)
             SELECT gen_random_uuid(), $1, 'Probe', jsonb_build_object('order_id', 'o-' || i)
               FROM generate_series(1, $2::int) i",
            &[&SOURCE, &n],
        )
        .await
        .unwrap();
}

/// An EventBridge client against the benchmark endpoint, and its state.
async fn bench_events() -> (
    aws_sdk_eventbridge::Client,
    orderfleet_bench::sqs::BenchSqs,
    tokio::task::JoinHandle<()>,
) {
    let (addr, state, server) = orderfleet_bench::sqs::spawn_local(0)
        .await
        .expect("start the benchmark endpoint");
    let config = aws_sdk_eventbridge::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(format!("http://{addr}"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .build();
    (
        aws_sdk_eventbridge::Client::from_conf(config),
        state,
        server,
    )
}

fn relay(pool: &Pool, events: &aws_sdk_eventbridge::Client) -> Relay {
    Relay::new(
        pool.clone(),
        events.clone(),
        "orderfleet-test".into(),
        vec![SOURCE.into()],
    )
}

#[tokio::test]
async fn a_backlog_is_published_a_hundred_events_per_pass_in_calls_of_ten() {
    let (pool, _) = support::fresh_db().await;
    let (events, state, _server) = bench_events().await;
    backlog(&pool, 125).await;
    let relay = relay(&pool, &events);

    let first = relay.publish_once().await.unwrap();
    assert_eq!(first.published, RELAY_PASS_ROWS);
    assert!(first.full, "a pass that took its fill says more may wait");
    let stats = state.event_stats();
    assert_eq!(stats.get("PutEvents"), 10, "ten calls of ten entries");
    assert_eq!(stats.put_events_entries, 100);

    let second = relay.publish_once().await.unwrap();
    assert_eq!((second.published, second.full), (25, false));
    let stats = state.event_stats();
    assert_eq!(stats.get("PutEvents"), 13, "25 entries take three calls");
    assert_eq!(stats.put_events_entries, 125);
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM outbox").await,
        0,
        "published rows leave the outbox"
    );
    assert_eq!(relay.publish_once().await.unwrap().published, 0);
}

#[tokio::test]
async fn two_relays_racing_over_one_backlog_publish_each_event_once() {
    let (pool, _) = support::fresh_db().await;
    let (events, state, _server) = bench_events().await;
    backlog(&pool, 700).await;
    let drain = |relay: Relay| async move {
        let mut published = 0;
        loop {
            let pass = relay.publish_once().await.unwrap();
            published += pass.published;
            if pass.published == 0 {
                return published;
            }
        }
    };
    let (a, b) = tokio::join!(
        tokio::spawn(drain(relay(&pool, &events))),
        tokio::spawn(drain(relay(&pool, &events))),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a + b, 700, "every row published by one relay or the other");
    assert!(a > 0 && b > 0, "both relays took rows ({a} and {b})");
    assert_eq!(
        state.event_stats().put_events_entries,
        700,
        "no event was sent twice (SKIP LOCKED)"
    );
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM outbox").await,
        0
    );
}
