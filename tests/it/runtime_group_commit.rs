//! Group commit, the runtime's mechanics, shown with probe handlers and one real queue: a panic
//! or a hang costs only its own event a retry while its neighbours commit, a transaction a
//! handler aborted is never reported as applied, a busy SQS queue is committed in groups with
//! every message applied once, and concurrent groups of one handler never share an order.
//! What each handler's groups decide is in `saga_group_commit.rs`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::handlers::{Context, Handler};
use orderfleet::runtime::group::{execute_group, GroupCommit, GroupConfig};
use orderfleet::runtime::{self, Apply, ConsumerConfig, Executed};
use orderfleet::store::db::Cached;
use orderfleet::telemetry::metrics::Counters;
use orderfleet_testkit::examples::envelope;
use serde_json::json;
use tokio::sync::Notify;

use crate::support::saga::stock;
use crate::support::{self, applied, refs};

/// Writes a row per event; `Hold` waits until released, `Panic` panics, `Hang` never ends,
/// `Swallow` ignores a failed statement.
struct Probe {
    started: Notify,
    release: Notify,
}

#[async_trait]
impl Handler for Probe {
    type Batch = ();

    fn name(&self) -> &str {
        "probe"
    }
    fn group_commit(&self) -> bool {
        true
    }
    async fn handle(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        cx.tx
            .execute_cached(
                "INSERT INTO probe_rows (key) VALUES ($1)",
                &[&event.event_key()],
            )
            .await?;
        match event.detail_type.as_str() {
            "Hold" => {
                self.started.notify_one();
                self.release.notified().await;
            }
            "Panic" => panic!("probe told to panic"),
            "Hang" => std::future::pending::<()>().await,
            // A handler bug: a failed statement ignored, which aborts the transaction.
            "Swallow" => {
                let _ = cx.tx.batch_execute("SELECT 1 / 0").await;
            }
            _ => {}
        }
        Ok(())
    }
}

async fn probe_db() -> deadpool_postgres::Pool {
    let (pool, _) = support::fresh_db().await;
    pool.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE probe_rows (key text PRIMARY KEY)")
        .await
        .unwrap();
    pool
}

/// A group of `kinds` behind a held event, on a grouper with one transaction: they queue while
/// the held event runs, then run as one group. Returns each one's answer.
async fn queued_group(
    group: &GroupCommit,
    probe: &Probe,
    kinds: &[&str],
) -> (Vec<Envelope>, Vec<Result<Executed, HandlerError>>) {
    let hold = envelope("Hold", &json!({}));
    let first = {
        let group = group.clone();
        tokio::spawn(async move { group.apply(&Arc::new(hold), 1).await })
    };
    probe.started.notified().await;
    let queued: Vec<Envelope> = kinds.iter().map(|t| envelope(t, &json!({}))).collect();
    let mut waiting = Vec::new();
    for event in queued.clone() {
        let group = group.clone();
        waiting.push(tokio::spawn(async move {
            group.apply(&Arc::new(event), 1).await
        }));
    }
    support::wait_for(Duration::from_secs(10), "the events queued", || {
        let n = group.queued();
        async move { (n == kinds.len()).then_some(()) }
    })
    .await;
    probe.release.notify_one();
    assert!(applied(&first.await.unwrap()));
    let mut answers = Vec::new();
    for w in waiting {
        answers.push(w.await.unwrap());
    }
    (queued, answers)
}

/// A probe's group that counts caught panics in `counters`, as a worker's consumer does.
fn probe_group(
    pool: &deadpool_postgres::Pool,
    timeout: Duration,
    counters: Arc<Counters>,
) -> (Arc<Probe>, GroupCommit) {
    let probe = Arc::new(Probe {
        started: Notify::new(),
        release: Notify::new(),
    });
    let group = GroupCommit::counting_into(
        probe.clone(),
        pool.clone(),
        GroupConfig {
            max_group: 32,
            transactions: 1,
            timeout,
        },
        counters,
    );
    (probe, group)
}

async fn idle_in_transaction(pool: &deadpool_postgres::Pool) -> i64 {
    support::scalar(
        pool,
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_group_costs_only_that_event_a_retry_and_its_neighbours_commit() {
    let pool = probe_db().await;
    let counters = Arc::new(Counters::default());
    let (probe, group) = probe_group(&pool, Duration::from_secs(20), counters.clone());
    let (queued, answers) = queued_group(&group, &probe, &["Ok", "Ok", "Panic", "Ok", "Ok"]).await;

    for (event, answer) in queued.iter().zip(&answers) {
        if event.detail_type == "Panic" {
            match answer {
                Err(HandlerError::Retry { reason, .. }) => {
                    assert!(reason.contains("probe told to panic"), "{reason}")
                }
                other => panic!("expected a retry, got {other:?}"),
            }
        } else {
            assert!(applied(answer), "{answer:?}");
        }
    }
    // The held event and the four good ones; nothing of the panicking one.
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM probe_rows").await,
        5
    );
    assert_eq!(idle_in_transaction(&pool).await, 0);
    let stats = group.stats();
    assert_eq!((stats.events, stats.groups), (6, 2));
    // The failed group and the regrouped four, besides the held event's own.
    assert_eq!(stats.transactions, 3);
    // Counted where the consumer's metrics (HandlerPanics) read it, as a lone event's panic is.
    assert_eq!(counters.snapshot().panics, 1);
    assert_eq!(stats.panics, 1);
    // The runner survived: received again, the good ones are duplicates.
    for event in queued.iter().filter(|e| e.detail_type == "Ok") {
        let event = Arc::new(event.clone());
        assert_eq!(group.apply(&event, 2).await.unwrap(), Executed::Duplicate);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_hangs_in_a_group_times_out_alone_and_its_neighbours_commit() {
    let pool = probe_db().await;
    let counters = Arc::new(Counters::default());
    let (probe, group) = probe_group(&pool, Duration::from_secs(1), counters.clone());
    let (queued, answers) = queued_group(&group, &probe, &["Ok", "Hang", "Ok"]).await;
    assert!(applied(&answers[0]) && applied(&answers[2]), "{answers:?}");
    match &answers[1] {
        Err(HandlerError::Retry { reason, .. }) => {
            assert!(reason.contains("timed out"), "{reason}")
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    assert_eq!(queued[1].detail_type, "Hang");
    // Not counted here: the consumer waiting for it timed out first and counted it.
    assert_eq!(counters.snapshot().timeouts, 0);
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM probe_rows").await,
        3
    );
    assert_eq!(idle_in_transaction(&pool).await, 0);
}

#[tokio::test]
async fn a_transaction_aborted_by_a_swallowed_error_is_never_reported_as_applied() {
    let pool = probe_db().await;
    let probe = Probe {
        started: Notify::new(),
        release: Notify::new(),
    };
    // Alone: the COMMIT would quietly roll back; the check in front of it fails instead.
    let swallow = envelope("Swallow", &json!({}));
    match runtime::execute(&probe, &pool, &swallow, 1).await {
        Err(HandlerError::Permanent { reason }) => {
            assert!(reason.contains("aborted"), "{reason}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    // In a group: the group cannot commit, so each event is judged alone.
    let events = vec![
        envelope("Ok", &json!({})),
        envelope("Swallow", &json!({})),
        envelope("Ok", &json!({})),
    ];
    let outcome = execute_group(&probe, &pool, &refs(&events, 1)).await;
    assert!(applied(&outcome.results[0]) && applied(&outcome.results[2]));
    assert!(outcome.results[1].is_err(), "{:?}", outcome.results[1]);
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM probe_rows").await,
        2
    );
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM processed_messages").await,
        2
    );
}

#[tokio::test]
async fn a_busy_queue_is_committed_in_groups_and_every_message_applied_once() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let facts = orderfleet::sqs::queue::inspect_queue(
        &clients.sqs,
        &topo.queue_name(HandlerName::Inventory),
    )
    .await
    .unwrap();
    let cfg = ConsumerConfig {
        concurrency: 30,
        receivers: 3,
        ..support::consumer_config(&facts)
    };
    // 60 receipts of one SKU, each sent twice: 120 messages, 60 distinct events.
    let bodies: Vec<String> = (0..60)
        .map(|_| support::stock_received("BUSY-G", 1))
        .collect();
    let twice: Vec<String> = bodies.iter().chain(bodies.iter()).cloned().collect();
    support::send_bodies(&clients, &facts.queue_url, &twice).await;

    let group = GroupCommit::new(
        Arc::new(orderfleet::handlers::inventory::Inventory),
        pool.clone(),
        GroupConfig {
            max_group: 32,
            transactions: 2,
            timeout: Duration::from_secs(20),
        },
    );
    // Its own counters and a fixed cap of 32: this test is about grouping, not the depth.
    let run = support::GroupedConsumer::run(&clients, group, Arc::new(Counters::default()), cfg);
    run.handled(120, Duration::from_secs(60)).await;
    let (counters, group) = (run.counters.clone(), run.group.clone());
    run.shutdown().await;

    let s = counters.snapshot();
    // Each distinct event applied once; SQS may deliver any message more than once.
    assert_eq!(s.succeeded, 60);
    assert!(s.duplicates >= 60, "{s:?}");
    assert_eq!(stock(&pool, "BUSY-G").await.0, 60);
    let stats = group.stats();
    assert!(stats.events >= 120, "{stats:?}");
    assert!(
        stats.groups * 2 <= stats.events,
        "groups averaged fewer than two messages: {stats:?}"
    );
}

/// Records which orders' groups are open, and whether two open groups ever shared an order.
#[derive(Default)]
struct OrderWatch {
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    groups_open: std::sync::atomic::AtomicUsize,
    most_groups_open: std::sync::atomic::AtomicUsize,
    shared: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Handler for OrderWatch {
    type Batch = Vec<String>;

    fn name(&self) -> &str {
        "order-watch"
    }

    fn group_commit(&self) -> bool {
        true
    }

    /// Registers the event's order as open in this transaction (a group, or an event alone).
    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Vec<String>>,
    ) -> Result<(), HandlerError> {
        use std::sync::atomic::Ordering::SeqCst;
        let Some(id) = event.order_id() else {
            return Ok(());
        };
        let mine = &mut cx.batch;
        if mine.is_empty() {
            let now = self.groups_open.fetch_add(1, SeqCst) + 1;
            self.most_groups_open.fetch_max(now, SeqCst);
        }
        if !mine.iter().any(|m| m == id) {
            mine.push(id.to_string());
            let mut open = self.open.lock().unwrap();
            let n = open.entry(id.to_string()).or_default();
            if *n > 0 {
                self.shared.store(true, SeqCst);
            }
            *n += 1;
        }
        // Long enough for the other transactions to form their groups meanwhile.
        tokio::time::sleep(Duration::from_millis(3)).await;
        Ok(())
    }

    async fn finish(
        &self,
        _tx: &orderfleet::store::db::Tx,
        ids: Vec<String>,
    ) -> Result<(), HandlerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut open = self.open.lock().unwrap();
        for id in ids {
            if let Some(n) = open.get_mut(&id) {
                *n -= 1;
            }
        }
        self.groups_open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// Concurrent groups of one handler never share an order: an event of an order that a running
/// group has waits in the queue for it, instead of in PostgreSQL with a whole group behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_groups_of_one_handler_never_share_an_order() {
    use std::sync::atomic::Ordering::SeqCst;
    let (pool, _) = support::fresh_db().await;
    let watch = Arc::new(OrderWatch::default());
    let group = GroupCommit::new(
        watch.clone(),
        pool.clone(),
        GroupConfig {
            max_group: 8,
            transactions: 4,
            timeout: Duration::from_secs(20),
        },
    );
    // Ten orders with twelve events each, arriving interleaved, plus some without an order.
    let mut tasks = Vec::new();
    for round in 0..12 {
        for order in 0..10 {
            let event = envelope(
                "Step",
                &json!({"order_id": format!("o-{order}"), "n": round}),
            );
            let group = group.clone();
            tasks.push(tokio::spawn(async move {
                group.apply(&Arc::new(event), 1).await
            }));
        }
        let event = envelope("Tick", &json!({"n": round}));
        let group = group.clone();
        tasks.push(tokio::spawn(async move {
            group.apply(&Arc::new(event), 1).await
        }));
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert!(applied(&answer), "{answer:?}");
    }
    assert!(
        !watch.shared.load(SeqCst),
        "two open groups shared an order"
    );
    assert!(
        watch.most_groups_open.load(SeqCst) >= 2,
        "groups never ran side by side, so the test proved nothing"
    );
    assert_eq!(group.stats().events, 132);
    assert_eq!(
        support::scalar(
            &pool,
            "SELECT count(*) FROM processed_messages WHERE handler = 'order-watch'"
        )
        .await,
        132
    );
}
