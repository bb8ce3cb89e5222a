//! Publishing on commit (`Handoff` in src/store/outbox.rs): the task that commits a handler's
//! events publishes them itself, and the relay takes only what that did not. Shown against the
//! benchmark endpoint (which serves PutEvents and counts its entries) or an HTTP fake of
//! EventBridge that keeps what it was sent: a hand-off publishes once and empties the outbox; a
//! rival relay leaves claimed rows alone; a process that dies after its commit, before or
//! during its PutEvents call, loses nothing (its rows leave through a relay once the claim runs
//! out); a throttled hand-off gives its rows back to the relay, which publishes them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::handlers::{Context, Handler};
use orderfleet::runtime::group::{GroupCommit, GroupConfig};
use orderfleet::runtime::{self, Apply, Executed};
use orderfleet::store::outbox::{Handoff, Relay};
use orderfleet_bench::sqs::events_client;
use orderfleet_testkit::examples::envelope;
use serde_json::{json, Value};

use crate::support;
use crate::support::platforms::{
    put_events_accepted, put_events_slow_at_first, put_events_throttled, Fake,
};

/// Emits `detail.n` events per event it handles.
struct Emitter;

#[async_trait]
impl Handler for Emitter {
    type Batch = ();

    fn name(&self) -> &str {
        "emitter"
    }
    fn group_commit(&self) -> bool {
        true
    }
    async fn handle(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let n = event.detail["n"].as_u64().unwrap_or(1);
        for i in 0..n {
            cx.emit("Probe", &json!({"order_id": format!("o-{i}")}))?;
        }
        Ok(())
    }
}

fn relay(pool: &Pool, events: &aws_sdk_eventbridge::Client) -> Relay {
    Relay::new(
        pool.clone(),
        events.clone(),
        "orderfleet-test".into(),
        vec!["orderfleet.emitter".into()],
    )
}

/// Handles one event that emits `n`, publishing through `handoff`.
async fn commit(pool: &Pool, handoff: &Handoff, n: u64) {
    let done = runtime::execute_handing_off(
        &Emitter,
        pool,
        &envelope("Emit", &json!({"n": n})),
        1,
        Some(handoff),
    )
    .await
    .unwrap();
    assert_eq!(
        done,
        Executed::Applied {
            emitted: n as usize
        }
    );
}

/// The event ids of the entries of every PutEvents call `fake` was sent, in order.
fn sent_ids(fake: &Fake) -> Vec<String> {
    fake.seen()
        .iter()
        .flat_map(|r| {
            r.json()["Entries"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|e| {
                    let detail: Value =
                        serde_json::from_str(e["Detail"].as_str().unwrap()).unwrap();
                    detail["event_id"].as_str().unwrap().to_string()
                })
        })
        .collect()
}

/// Runs relay passes of `survivor` until one publishes something (the claims ran out), then
/// until one finds nothing more, and returns how many events they published.
async fn published_once_the_claim_ran_out(survivor: &Relay) -> usize {
    let mut published = support::wait_for(Duration::from_secs(10), "the claim to run out", || {
        let survivor = survivor.clone();
        async move {
            let pass = survivor.publish_once().await.unwrap();
            (pass.published > 0).then_some(pass.published)
        }
    })
    .await;
    // Each row's claim runs from its own insert (`clock_timestamp()`), so on a loaded machine
    // a pass can fall between two rows' ends and take only the first: the passes after it take
    // the rest.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match survivor.publish_once().await.unwrap().published {
            0 => return published,
            more => published += more,
        }
    }
}

/// Each outbox row, oldest first: whether its claim is cleared, its attempts and its last
/// error (what a hand-off that gave rows back leaves).
async fn handed_back_rows(pool: &Pool) -> Vec<(bool, i32, String)> {
    let c = pool.get().await.unwrap();
    c.query(
        "SELECT claimed_until IS NULL, attempts, last_error FROM outbox ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

async fn outbox_ids(pool: &Pool) -> Vec<String> {
    let c = pool.get().await.unwrap();
    c.query("SELECT event_id::text FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Runs `work` on a runtime of its own, in a thread, and then drops that runtime with whatever
/// it had spawned still pending: what a process that dies at that point leaves behind, except
/// that its PostgreSQL sessions end cleanly.
fn in_a_process_that_dies_after<F>(work: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(work());
        drop(rt);
    })
    .join()
    .expect("the doomed process's thread");
}

#[tokio::test]
async fn a_committed_event_is_published_by_its_committer_once_and_leaves_the_outbox() {
    let (pool, _) = support::fresh_db().await;
    let (addr, state, _server) = orderfleet_bench::sqs::spawn_local(0)
        .await
        .expect("start the benchmark endpoint");
    let relay = relay(&pool, &events_client(&format!("http://{addr}")));
    let handoff = relay.handoff();

    commit(&pool, &handoff, 12).await;
    support::wait_for(Duration::from_secs(10), "the hand-off", || {
        let handoff = handoff.clone();
        async move { (handoff.counts() == (12, 0)).then_some(()) }
    })
    .await;
    let stats = state.event_stats();
    assert_eq!(stats.put_events_entries, 12, "each event sent once");
    assert_eq!(stats.get("PutEvents"), 2, "12 entries take two calls");
    // The published rows are deleted together, within 50 ms; wait for that statement.
    support::wait_for(Duration::from_secs(5), "an empty outbox", || {
        let pool = pool.clone();
        async move { outbox_ids(&pool).await.is_empty().then_some(()) }
    })
    .await;
    assert_eq!(
        relay.publish_once().await.unwrap().published,
        0,
        "nothing left for the relay"
    );
    assert_eq!(state.event_stats().put_events_entries, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rival_relay_leaves_rows_alone_while_their_committer_publishes_them() {
    let (pool, _) = support::fresh_db().await;
    // EventBridge answers the hand-off's call slowly: long enough for a rival relay (another
    // process's) to look at the outbox meanwhile.
    let fake = Fake::start_holding(|_, _| Duration::from_millis(1_000), put_events_accepted).await;
    let events = events_client(&fake.url);
    let handoff = relay(&pool, &events).handoff();
    let rival = relay(&pool, &events);

    commit(&pool, &handoff, 5).await;
    let committed = outbox_ids(&pool).await;
    assert_eq!(committed.len(), 5);
    let pass = rival.publish_once().await.unwrap();
    assert_eq!(pass.published, 0, "the rival passed over the claimed rows");
    support::wait_for(Duration::from_secs(10), "the hand-off", || {
        let handoff = handoff.clone();
        async move { (handoff.counts() == (5, 0)).then_some(()) }
    })
    .await;
    assert_eq!(
        sent_ids(&fake),
        committed,
        "each event sent once, by its committer"
    );
    assert_eq!(rival.publish_once().await.unwrap().published, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_dies_between_its_commit_and_its_hand_off_loses_nothing() {
    let (pool, db) = support::fresh_db().await;
    let fake = Fake::start(put_events_accepted).await;
    let url = fake.url.clone();
    // The doomed process commits with 2 s claims and dies before its hand-off task runs (on a
    // current-thread runtime, a spawned task waits for the next await of the thread).
    in_a_process_that_dies_after(move || async move {
        let pool = orderfleet::store::db::pool(&db, 2).unwrap();
        let handoff = relay(&pool, &events_client(&url)).handoff_claiming(Duration::from_secs(2));
        commit(&pool, &handoff, 7).await;
    });
    let committed = outbox_ids(&pool).await;
    assert_eq!(committed.len(), 7, "the commit stands");
    assert!(fake.seen().is_empty(), "nothing was sent before the death");

    // Another process's relay: nothing while the claim holds, everything once it ran out.
    let survivor = relay(&pool, &events_client(&fake.url));
    assert_eq!(survivor.publish_once().await.unwrap().published, 0);
    let published = published_once_the_claim_ran_out(&survivor).await;
    assert_eq!(published, 7);
    assert_eq!(sent_ids(&fake), committed, "each event sent once");
    assert!(outbox_ids(&pool).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_dies_while_its_hand_off_is_out_has_its_events_sent_again() {
    let (pool, db) = support::fresh_db().await;
    // EventBridge takes the hand-off's call but answers slowly the first time: the process dies
    // after the events reached it and before it could delete them.
    let fake = put_events_slow_at_first(Duration::from_millis(1_500)).await;
    let url = fake.url.clone();
    let seen = fake.clone();
    in_a_process_that_dies_after(move || async move {
        let pool = orderfleet::store::db::pool(&db, 2).unwrap();
        let handoff = relay(&pool, &events_client(&url)).handoff_claiming(Duration::from_secs(2));
        commit(&pool, &handoff, 3).await;
        support::wait_for(Duration::from_secs(10), "the hand-off's call", || {
            let seen = seen.clone();
            async move { (!seen.seen().is_empty()).then_some(()) }
        })
        .await;
    });
    let committed = outbox_ids(&pool).await;
    assert_eq!(committed.len(), 3, "the rows stay: their delete never ran");
    assert_eq!(sent_ids(&fake), committed);

    let survivor = relay(&pool, &events_client(&fake.url));
    assert_eq!(
        survivor.publish_once().await.unwrap().published,
        0,
        "the claim holds for a while after the death"
    );
    let published = published_once_the_claim_ran_out(&survivor).await;
    assert_eq!(published, 3);
    // At least once: the same events, with the same ids, went out again; consumers absorb the
    // copies by `event_id` (saga_idempotency.rs, relay_passes.rs).
    let sent = sent_ids(&fake);
    assert_eq!(sent.len(), 6);
    assert_eq!(sent[3..], committed[..]);
    assert!(outbox_ids(&pool).await.is_empty());
}

#[tokio::test]
async fn a_throttled_hand_off_gives_its_events_back_to_the_relay_which_publishes_them() {
    let (pool, _) = support::fresh_db().await;
    let throttle = Arc::new(AtomicBool::new(true));
    let throttled = throttle.clone();
    let fake = Fake::start(move |req, before| {
        if throttled.load(Ordering::SeqCst) {
            return put_events_throttled();
        }
        put_events_accepted(req, before)
    })
    .await;
    let relay = relay(&pool, &events_client(&fake.url));
    let handoff = relay.handoff();
    assert!(
        handoff.claim().is_some(),
        "publishing on commit to begin with"
    );

    commit(&pool, &handoff, 4).await;
    support::wait_for(Duration::from_secs(30), "the hand-off", || {
        let handoff = handoff.clone();
        async move { (handoff.counts() == (0, 4)).then_some(()) }
    })
    .await;
    let rows = handed_back_rows(&pool).await;
    let c = pool.get().await.unwrap();
    assert_eq!(rows.len(), 4, "nothing lost");
    for (unclaimed, attempts, error) in &rows {
        assert!(*unclaimed && *attempts == 1, "{rows:?}");
        assert!(error.contains("ThrottlingException"), "{error}");
    }
    assert!(
        handoff.claim().is_none(),
        "after a failure, rows go to the relay, which backs off"
    );
    // The next commit writes its rows for the relay.
    commit(&pool, &handoff, 1).await;
    let claims: BTreeMap<bool, i64> = c
        .query(
            "SELECT claimed_until IS NULL, count(*) FROM outbox GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(claims, BTreeMap::from([(true, 5)]), "no row is claimed");

    throttle.store(false, Ordering::SeqCst);
    let pass = relay.publish_once().await.unwrap();
    assert_eq!((pass.published, pass.failed), (5, 0));
    assert!(outbox_ids(&pool).await.is_empty());
    assert!(
        handoff.claim().is_some(),
        "once the relay publishes again, so does the hand-off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_whose_call_outlasts_half_its_claim_gives_the_rows_back_before_a_relay_may_take_them(
) {
    let (pool, _) = support::fresh_db().await;
    // EventBridge holds the first call for 5 s; the hand-off claims for 4 s, so it must stop
    // waiting after 2 s, while no relay may take the rows yet.
    let fake = put_events_slow_at_first(Duration::from_millis(5_000)).await;
    let relay = relay(&pool, &events_client(&fake.url));
    let handoff = relay.handoff_claiming(Duration::from_secs(4));

    let started = std::time::Instant::now();
    commit(&pool, &handoff, 4).await;
    let committed = outbox_ids(&pool).await;
    support::wait_for(Duration::from_secs(10), "the hand-off to give up", || {
        let handoff = handoff.clone();
        async move { (handoff.counts() == (0, 4)).then_some(()) }
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "gave the rows back after {:?}, past its claim",
        started.elapsed()
    );
    let rows = handed_back_rows(&pool).await;
    assert_eq!(rows.len(), 4);
    assert!(
        rows.iter().all(|(unclaimed, attempts, e)| *unclaimed
            && *attempts == 1
            && e.contains("timed out")),
        "{rows:?}"
    );
    assert!(
        handoff.claim().is_none(),
        "a call failed: the relay takes over"
    );
    let pass = relay.publish_once().await.unwrap();
    assert_eq!(pass.published, 4);
    // EventBridge may have taken the cut-off call as well: the relay's copy is a duplicate of
    // the same event ids, which consumers absorb.
    assert_eq!(sent_ids(&fake)[4..], committed[..]);
}

#[tokio::test]
async fn events_committed_in_groups_are_published_by_their_groups() {
    let (pool, _) = support::fresh_db().await;
    let (addr, state, _server) = orderfleet_bench::sqs::spawn_local(0)
        .await
        .expect("start the benchmark endpoint");
    let handoff = relay(&pool, &events_client(&format!("http://{addr}"))).handoff();
    let group = GroupCommit::new(
        Arc::new(Emitter),
        pool.clone(),
        GroupConfig {
            max_group: 32,
            transactions: 1,
            timeout: Duration::from_secs(20),
        },
    )
    .handing_off(Some(handoff.clone()));
    let events: Vec<Arc<Envelope>> = (0..20)
        .map(|_| Arc::new(envelope("Emit", &json!({"n": 3}))))
        .collect();
    let done = futures_util::future::join_all(events.iter().map(|e| group.apply(e, 1))).await;
    assert!(done
        .iter()
        .all(|d| matches!(d, Ok(Executed::Applied { emitted: 3 }))));
    let stats = group.stats();
    assert!(
        stats.groups < 20,
        "the events shared transactions: {stats:?}"
    );
    support::wait_for(Duration::from_secs(10), "the hand-offs", || {
        let handoff = handoff.clone();
        async move { (handoff.counts() == (60, 0)).then_some(()) }
    })
    .await;
    assert_eq!(state.event_stats().put_events_entries, 60, "each once");
    support::wait_for(Duration::from_secs(5), "an empty outbox", || {
        let pool = pool.clone();
        async move { outbox_ids(&pool).await.is_empty().then_some(()) }
    })
    .await;
}
