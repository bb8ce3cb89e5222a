//! Restarts and rival copies: what a rolling deploy does to messages.
//!
//! SQS does not cancel a long poll whose client went away: it still hands messages to it, and
//! they stay invisible for the visibility timeout. These tests stop a real worker while its
//! long polls are in flight and check that the next worker gets every message at once; and that
//! a second copy of a message that arrives while the first is handled is kept, not left to come
//! back again and again; and that a worker killed after its commit but before its batched
//! delete went out costs the message a redelivery, absorbed by the inbox, not a second effect.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support;
use async_trait::async_trait;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::infra::topology::Topology;
use orderfleet::runtime::lease::Leases;
use orderfleet::runtime::{self, Apply, Consumer, Executed};
use orderfleet::telemetry::metrics::Counters;
use tokio_util::sync::CancellationToken;

/// The real inventory worker with `wait_secs` long polls (the tests' usual worker polls for 1 s,
/// which would hide what a production wait of 20 s does).
async fn inventory_queue(clients: &orderfleet::infra::aws::Clients, topo: &Topology) -> String {
    orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.queue_name(HandlerName::Inventory))
        .await
        .unwrap()
}

/// Waits until the worker has written its first heartbeat: it is up and polling.
async fn wait_until_up(pool: &deadpool_postgres::Pool) {
    support::wait_for(
        Duration::from_secs(30),
        "the worker's heartbeat",
        || async {
            (support::scalar(pool, "SELECT count(*) FROM worker_heartbeats").await > 0)
                .then_some(())
        },
    )
    .await;
}

async fn wait_until_all_handled(
    clients: &orderfleet::infra::aws::Clients,
    pool: &deadpool_postgres::Pool,
    url: &str,
    n: i64,
    within: Duration,
) {
    support::wait_for(
        within,
        &format!("all {n} messages handled (none stranded by the stopped worker)"),
        || async {
            let done = support::scalar(pool, "SELECT count(*) FROM processed_messages").await;
            (done == n && support::depth(clients, url).await == (0, 0)).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_worker_stopped_while_idle_leaves_no_message_hidden_from_its_successor() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    let url = inventory_queue(&clients, &topo).await;

    // Four receive loops long-poll an empty queue for 10 s each.
    let mut a = support::inventory_worker_polling(&topo, &db_url, 10, &["--concurrency", "32"]);
    wait_until_up(&pool).await;
    // Idle a moment, so that every receive loop has its long poll in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    support::signal(&a, "-TERM");
    let status = support::wait_exit(&mut a, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "exit code");

    let _b = support::inventory_worker_polling(&topo, &db_url, 1, &[]);
    let bodies: Vec<String> = (0..48)
        .map(|i| support::stock_received(&format!("idle-{}", i % 6), 1))
        .collect();
    support::send_bodies(&clients, &url, &bodies).await;
    // The queue's visibility timeout is 60 s: a message taken by an abandoned poll of the first
    // worker would wait that long.
    wait_until_all_handled(&clients, &pool, &url, 48, Duration::from_secs(15)).await;
}

#[tokio::test]
async fn a_worker_stopped_under_load_hands_over_every_message_at_once() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    let url = inventory_queue(&clients, &topo).await;

    // An uncommitted insert of the SKU blocks the handlers of the first two messages inside
    // their transactions: they are running when SIGTERM arrives, while the other receive loop
    // long-polls the empty queue.
    let mut blocker = pool.get().await.unwrap();
    let lock = blocker.transaction().await.unwrap();
    lock.execute("INSERT INTO stock (sku, on_hand) VALUES ('held', 0)", &[])
        .await
        .unwrap();
    let mut a = support::inventory_worker_polling(
        &topo,
        &db_url,
        10,
        &["--concurrency", "8", "--receivers", "2"],
    );
    wait_until_up(&pool).await;
    let held: Vec<String> = (0..2).map(|_| support::stock_received("held", 1)).collect();
    support::send_bodies(&clients, &url, &held).await;
    support::wait_for(
        Duration::from_secs(20),
        "two messages in flight",
        || async { (support::depth(&clients, &url).await == (0, 2)).then_some(()) },
    )
    .await;

    support::signal(&a, "-TERM");
    // These arrive after the stop, while the first worker's polls are still open.
    let late: Vec<String> = (0..20)
        .map(|_| support::stock_received("late", 1))
        .collect();
    support::send_bodies(&clients, &url, &late).await;
    lock.commit().await.unwrap();
    let status = support::wait_exit(&mut a, Duration::from_secs(40)).await;
    assert_eq!(status.code(), Some(0), "exit code");

    let _b = support::inventory_worker_polling(&topo, &db_url, 1, &[]);
    wait_until_all_handled(&clients, &pool, &url, 22, Duration::from_secs(15)).await;
    assert_eq!(
        support::scalar(&pool, "SELECT on_hand FROM stock WHERE sku = 'held'").await,
        2
    );
    assert_eq!(
        support::scalar(&pool, "SELECT on_hand FROM stock WHERE sku = 'late'").await,
        20
    );
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM stock_movements").await,
        22,
        "every message applied once"
    );
}

/// Sums one counter over the EMF lines a worker wrote for its handler (`--metrics-interval-secs`).
fn emf_total(stdout: &str, metric: &str) -> f64 {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["handler"] == "inventory" && v.get("outcome").is_none())
        .filter_map(|v| v[metric].as_f64())
        .sum()
}

#[tokio::test]
async fn a_worker_killed_between_its_commit_and_its_batched_delete_applies_the_message_once() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    let url = inventory_queue(&clients, &topo).await;

    // Deletes wait up to 10 s to fill a batch, so the kill surely lands after the commit and
    // before the delete, even when a loaded machine notices the commit late (with 2 s, a full
    // `make test` once saw the delete go out first); a 3 s visibility brings the message back
    // soon after.
    let mut a = support::inventory_worker(
        &topo,
        &db_url,
        &[
            "--delete-flush-ms",
            "10000",
            "--visibility-timeout-secs",
            "3",
        ],
    );
    wait_until_up(&pool).await;
    support::send_bodies(&clients, &url, &[support::stock_received("flushed", 5)]).await;
    support::wait_for(Duration::from_secs(20), "the restock committed", || async {
        (support::scalar(&pool, "SELECT count(*) FROM processed_messages").await == 1).then_some(())
    })
    .await;
    support::signal(&a, "-KILL");
    let status = support::wait_exit(&mut a, Duration::from_secs(10)).await;
    assert_eq!(status.code(), None, "killed by a signal");
    // A request the worker had already sent would still reach the emulator: let it land
    // before counting, so that such a delete fails here and not as a missing duplicate later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (visible, hidden) = support::depth(&clients, &url).await;
    assert_eq!(
        visible + hidden,
        1,
        "the message must still be in its queue: the kill came after the delete was sent"
    );

    // The successor deletes at the default pace; the message comes back to it once its
    // visibility runs out.
    let mut b = support::inventory_worker(&topo, &db_url, &["--metrics-interval-secs", "1"]);
    wait_until_all_handled(&clients, &pool, &url, 1, Duration::from_secs(30)).await;
    support::signal(&b, "-TERM");
    let status = support::wait_exit(&mut b, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "exit code");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut b.stdout.take().expect("stdout"), &mut out)
        .expect("read the worker's stdout");
    assert_eq!(
        emf_total(&out, "MessagesDuplicate"),
        1.0,
        "the successor saw the message again and acknowledged it as a duplicate"
    );
    assert_eq!(emf_total(&out, "MessagesSucceeded"), 0.0);

    // Applied once: one restock of 5, one movement.
    assert_eq!(
        support::scalar(&pool, "SELECT on_hand FROM stock WHERE sku = 'flushed'").await,
        5
    );
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM stock_movements").await,
        1
    );
}

/// Holds every event until `release` is notified; counts how often it is applied.
struct Gate {
    calls: AtomicU32,
    release: tokio::sync::Notify,
}

#[async_trait]
impl Apply for Gate {
    fn name(&self) -> &str {
        "inventory"
    }
    async fn apply(&self, _: &Arc<Envelope>, _: u32) -> Result<Executed, HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.release.notified().await;
        Ok(Executed::Applied { emitted: 0 })
    }
}

/// An SQS client for the in-memory benchmark endpoint, which keeps SQS's documented rule on
/// receipt handles that the emulator does not: once a message is received again, only the
/// newest receipt handle can change its visibility or delete it (an older one is refused, or
/// its delete silently does nothing).
async fn strict_sqs() -> (aws_sdk_sqs::Client, tokio::task::JoinHandle<()>) {
    let (sqs, _state, server) = support::bench_sqs().await;
    (sqs, server)
}

async fn strict_depth(sqs: &aws_sdk_sqs::Client, url: &str) -> (u64, u64) {
    use aws_sdk_sqs::types::QueueAttributeName as Q;
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(Q::All)
        .send()
        .await
        .unwrap();
    let attrs = out.attributes().cloned().unwrap_or_default();
    let n = |k: Q| attrs.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
    (
        n(Q::ApproximateNumberOfMessages),
        n(Q::ApproximateNumberOfMessagesNotVisible),
    )
}

#[tokio::test]
async fn a_second_copy_that_arrives_while_the_first_runs_is_kept_hidden_and_deleted_with_it() {
    let (sqs, server) = strict_sqs().await;
    let url = support::create_queue(&sqs, "copies").await;
    let dlq_url = support::create_queue(&sqs, "copies-dlq").await;
    let facts = orderfleet::sqs::queue::QueueFacts {
        queue_url: url.clone(),
        dlq_url,
        max_receive_count: 5,
        visibility_timeout: Duration::from_secs(3),
        retention: Duration::from_secs(345_600),
    };
    let cfg = support::consumer_config(&facts);
    runtime::validate(&cfg, &facts).unwrap();
    let gate = Arc::new(Gate {
        calls: AtomicU32::new(0),
        release: tokio::sync::Notify::new(),
    });
    // No lease task yet: the first copy's visibility runs out and SQS hands out a second copy
    // while the first is still being handled, as it does when an extension is lost.
    let leases = Leases::default();
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let consumer = Consumer {
        cfg,
        sqs: sqs.clone(),
        handler: gate.clone(),
        leases: leases.clone(),
        counters: counters.clone(),
        relay_wake: None,
    };
    let task = tokio::spawn(consumer.run(stop.clone()));
    sqs.send_message()
        .queue_url(&url)
        .message_body(support::stock_received("copy", 1))
        .send()
        .await
        .unwrap();
    let c = counters.clone();
    support::wait_for(Duration::from_secs(20), "a second copy received", || {
        let c = c.clone();
        async move { (c.snapshot().received >= 2).then_some(()) }
    })
    .await;

    // From now on leases are extended as in a worker.
    let lease_stop = CancellationToken::new();
    tokio::spawn(
        leases
            .clone()
            .run(sqs.clone(), runtime::LEASE_TICK, lease_stop.clone()),
    );
    // Three visibility timeouts: each would hand out another copy and raise the receive count
    // towards the DLQ, if the copy in hand were not kept hidden.
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            counters.snapshot().received,
            2,
            "the message came back again while its first copy was still being handled"
        );
    }
    gate.release.notify_waiters();
    support::wait_for(Duration::from_secs(10), "the message handled", || async {
        (counters.snapshot().succeeded == 1).then_some(())
    })
    .await;
    // Deleted with the newest receipt handle: it does not come back after the visibility timeout.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(strict_depth(&sqs, &url).await, (0, 0), "message left");
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    lease_stop.cancel();
    server.abort();
    assert_eq!(gate.calls.load(Ordering::SeqCst), 1, "applied once");
    assert_eq!(counters.snapshot().received, 2);
    assert!(leases.is_empty(), "a lease outlived its message");
}
