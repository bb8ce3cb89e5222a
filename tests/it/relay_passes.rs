//! The relay under a backlog: a pass takes up to a hundred rows and publishes them in PutEvents
//! calls of ten, in one transaction; rival relays share a backlog without
//! publishing an event twice; a throttled call ends the pass and loses nothing. Counted at the
//! benchmark endpoint, which serves EventBridge's PutEvents and counts its calls and entries,
//! or, for the throttling, at an HTTP fake of EventBridge that keeps what it was sent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use orderfleet::store::outbox::{Relay, RELAY_PASS_ROWS};
use orderfleet_bench::sqs::events_client;
use serde_json::Value;

use crate::support;
use crate::support::platforms::{
    put_events_accepted, put_events_slow_at_first, put_events_throttled, Fake, Seen,
};

const SOURCE: &str = "orderfleet.orders";

/// Writes `n` outbox rows of the orders' source, each detail stamped with its event id as the
/// handlers' outbox writes do.
async fn backlog(pool: &Pool, n: i32) {
    pool.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO outbox (event_id, source, detail_type, detail)
             SELECT id, $1, 'Probe', jsonb_build_object('order_id', 'o-' || i, 'event_id', id)
               FROM (SELECT gen_random_uuid() AS id, i FROM generate_series(1, $2::int) i) e",
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
    (events_client(&format!("http://{addr}")), state, server)
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

#[tokio::test]
async fn a_throttled_call_ends_the_pass_and_loses_nothing() {
    let (pool, _) = support::fresh_db().await;
    backlog(&pool, 25).await;
    // An EventBridge that takes the first call and throttles everything after it (retries
    // included) until the test lets it through.
    let throttle = Arc::new(AtomicBool::new(false));
    let throttled = throttle.clone();
    let fake = Fake::start(move |req, before| {
        assert_eq!(
            req.headers.get("x-amz-target").map(String::as_str),
            Some("AWSEvents.PutEvents")
        );
        if !before.is_empty() && throttled.load(Ordering::SeqCst) {
            return put_events_throttled();
        }
        put_events_accepted(req, before)
    })
    .await;
    let relay = relay(&pool, &events_client(&fake.url));
    let attempts = |pool: Pool| async move {
        let c = pool.get().await.unwrap();
        let rows = c
            .query(
                "SELECT attempts, count(*) FROM outbox GROUP BY attempts ORDER BY attempts",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
            .collect::<Vec<_>>()
    };

    throttle.store(true, Ordering::SeqCst);
    let err = relay
        .publish_once()
        .await
        .expect_err("a throttled call fails the pass");
    assert!(
        format!("{err:#}").contains("ThrottlingException"),
        "{err:#}"
    );
    // The first call's ten left the outbox; the throttled call's ten count an attempt; the
    // last five were not tried (the pass stopped at the throttling).
    assert_eq!(attempts(pool.clone()).await, vec![(0, 5), (1, 10)]);
    let sent: Vec<usize> = fake
        .seen()
        .iter()
        .map(|r| r.json()["Entries"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sent[0], 10, "{sent:?}");
    assert!(
        sent[1..].iter().all(|&n| n == 10),
        "only the throttled call was retried: {sent:?}"
    );

    throttle.store(false, Ordering::SeqCst);
    let pass = relay.publish_once().await.unwrap();
    assert_eq!((pass.published, pass.failed), (15, 0));
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM outbox").await,
        0
    );
    let published: usize = fake
        .seen()
        .iter()
        .skip(sent.len())
        .map(|r| r.json()["Entries"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(published, 15, "the rest went in the next pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_connection_dies_after_putevents_republishes_the_same_events() {
    let (pool, db) = support::fresh_db().await;
    backlog(&pool, 10).await;
    // EventBridge takes the call but answers slowly, the first time: long enough for the
    // test to kill the relay's database session while the call is out.
    let fake = put_events_slow_at_first(Duration::from_millis(1_500)).await;
    // The relay has a pool of its own, as in a worker: the session the test ends is one of
    // its connections, never one of the test's own queries'.
    let relay_pool = orderfleet::store::db::pool(&db, 2).expect("pool");
    let relay = relay(&relay_pool, &events_client(&fake.url));
    let pass = tokio::spawn({
        let relay = relay.clone();
        async move { relay.publish_once().await }
    });
    // The relay's session holds the rows' locks while PutEvents is out: end it, as a crash
    // of the worker right after the call would. Only once it holds them (it has a
    // transaction id): between preparing its read and running it, the session looks the same
    // otherwise.
    let admin = orderfleet::store::db::pool(&db, 1).expect("pool");
    support::wait_for(
        Duration::from_secs(10),
        "the relay waiting on PutEvents",
        || {
            let admin = admin.clone();
            async move {
                let killed: i64 = admin
                    .get()
                    .await
                    .unwrap()
                    .query_one(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()
                        AND state = 'idle in transaction' AND query LIKE '%FROM outbox%'
                        AND backend_xid IS NOT NULL",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (killed > 0).then_some(())
            }
        },
    )
    .await;
    let err = pass.await.unwrap().expect_err("the pass cannot commit");
    eprintln!("first pass: {err:#}");
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM outbox").await,
        10,
        "nothing was marked published: the rows stay"
    );

    // As the relay's loop does after a failed pass, try again: its pool may first hand out
    // the connection that was ended, which fails once.
    let mut again = relay.publish_once().await;
    for _ in 0..5 {
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = relay.publish_once().await;
    }
    let again = again.unwrap();
    assert_eq!(again.published, 10);
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM outbox").await,
        0
    );
    // Both calls carried the same events, with the same event ids: consumers recognise the
    // second copy by its event_id (the inbox), so the crash costs a duplicate, not a loss.
    let ids = |r: &Seen| -> Vec<String> {
        let mut ids: Vec<String> = r.json()["Entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let detail: Value = serde_json::from_str(e["Detail"].as_str().unwrap()).unwrap();
                detail["event_id"].as_str().unwrap().to_string()
            })
            .collect();
        ids.sort();
        ids
    };
    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "one call, then its republication");
    assert_eq!(ids(&seen[0]), ids(&seen[1]));
    assert_eq!(ids(&seen[0]).len(), 10);
}
