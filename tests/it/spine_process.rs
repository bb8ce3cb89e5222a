//! The real `orderfleet-worker` binary against the local stack: signals, crashes, restarts
//! and the outbox relay, publishing on commit included.

use std::process::{Command, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::handlers::{Context, Handler};
use orderfleet::infra::aws::Clients;
use orderfleet::infra::topology::Topology;
use orderfleet::runtime::{self, Executed};
use serde_json::json;

use crate::support;
use crate::support::{signal, wait_exit};

async fn send_stock(clients: &Clients, url: &str, sku: &str, n: usize) {
    let bodies: Vec<String> = (0..n).map(|_| support::stock_received(sku, 1)).collect();
    support::send_bodies(clients, url, &bodies).await;
}

async fn inventory_queue(clients: &Clients, topo: &Topology) -> String {
    orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.queue_name(HandlerName::Inventory))
        .await
        .unwrap()
}

#[tokio::test]
async fn sigterm_lets_running_handlers_finish_and_strands_nothing_in_flight() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    let url = inventory_queue(&clients, &topo).await;
    send_stock(&clients, &url, "held", 6).await;

    // An uncommitted insert of the same SKU makes the handlers block inside their
    // transactions: they are running when SIGTERM arrives.
    let mut blocker = pool.get().await.unwrap();
    let lock = blocker.transaction().await.unwrap();
    lock.execute("INSERT INTO stock (sku, on_hand) VALUES ('held', 0)", &[])
        .await
        .unwrap();

    let mut child =
        support::inventory_worker(&topo, &db_url, &["--concurrency", "2", "--receivers", "1"]);
    support::wait_for(
        Duration::from_secs(20),
        "two messages in flight",
        || async { (support::depth(&clients, &url).await == (4, 2)).then_some(()) },
    )
    .await;
    signal(&child, "-TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited before its handlers finished"
    );
    lock.commit().await.unwrap();

    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "exit code");
    assert_eq!(
        support::scalar(&pool, "SELECT on_hand FROM stock WHERE sku = 'held'").await,
        2,
        "both running handlers finished"
    );
    // Checked at once, long before the 60 s visibility timeout: the two finished messages were
    // deleted, the four never started are visible, none is stranded in flight.
    assert_eq!(support::depth(&clients, &url).await, (4, 0));
}

#[tokio::test]
async fn kill_9_mid_batch_then_restart_applies_every_message_exactly_once() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    let url = inventory_queue(&clients, &topo).await;
    send_stock(&clients, &url, "k9", 60).await;
    let args = ["--concurrency", "8", "--visibility-timeout-secs", "3"];

    let mut first = support::inventory_worker(&topo, &db_url, &args);
    support::wait_for(Duration::from_secs(30), "some progress", || async {
        let n = support::scalar(&pool, "SELECT count(*) FROM stock_movements").await;
        (n >= 10).then_some(())
    })
    .await;
    signal(&first, "-KILL");
    let status = wait_exit(&mut first, Duration::from_secs(10)).await;
    assert_eq!(status.code(), None, "killed by a signal");
    let done_at_kill = support::scalar(&pool, "SELECT count(*) FROM stock_movements").await;
    assert!(
        done_at_kill < 60,
        "the kill came too late to prove anything"
    );

    let mut second = support::inventory_worker(&topo, &db_url, &args);
    support::wait_for(Duration::from_secs(60), "every message handled", || async {
        let n = support::scalar(&pool, "SELECT count(*) FROM processed_messages").await;
        (n == 60 && support::depth(&clients, &url).await == (0, 0)).then_some(())
    })
    .await;
    signal(&second, "-TERM");
    assert_eq!(
        wait_exit(&mut second, Duration::from_secs(20)).await.code(),
        Some(0)
    );
    assert_eq!(
        support::scalar(&pool, "SELECT on_hand FROM stock WHERE sku = 'k9'").await,
        60
    );
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM stock_movements").await,
        60
    );
}

/// Emits one InventoryReserved per event.
struct Emitter;

#[async_trait]
impl Handler for Emitter {
    type Batch = ();

    fn name(&self) -> &str {
        "inventory"
    }
    async fn handle(&self, ev: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        cx.emit(
            "InventoryReserved",
            &json!({"order_id": ev.detail["order_id"], "version": 1}),
        )
    }
}

#[tokio::test]
async fn an_event_committed_before_a_crash_is_published_after_restart() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    // The handler's transaction commits with its outbox row, and the process dies before any
    // relay runs: no relay exists in this test until the worker starts.
    let event: Envelope = serde_json::from_str(&support::event_body(
        "OrderAccepted",
        "orderfleet.orders",
        json!({"order_id": "o-crash"}),
    ))
    .unwrap();
    let done = runtime::execute(&Emitter, &pool, &event, 1).await.unwrap();
    assert_eq!(done, Executed::Applied { emitted: 1 });
    let event_id: String = pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT event_id::text FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let mut child = support::inventory_worker(&topo, &db_url, &[]);
    let orders_q =
        orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.queue_name(HandlerName::Orders))
            .await
            .unwrap();
    let body: String = support::wait_for(Duration::from_secs(20), "the event on the bus", || {
        let (sqs, q) = (clients.sqs.clone(), orders_q.clone());
        async move {
            let out = sqs
                .receive_message()
                .queue_url(q)
                .wait_time_seconds(1)
                .send()
                .await
                .ok()?;
            out.messages?.first()?.body.clone()
        }
    })
    .await;
    let delivered = Envelope::decode(&body).unwrap();
    assert_eq!(delivered.detail_type, "InventoryReserved");
    assert_eq!(delivered.source, "orderfleet.inventory");
    assert_eq!(delivered.event_key(), event_id);
    assert_eq!(delivered.detail["order_id"], "o-crash");
    // The relay deletes the row once PutEvents returned, which may be just after delivery.
    support::wait_for(
        Duration::from_secs(5),
        "the published row deleted",
        || async {
            let left = support::scalar(&pool, "SELECT count(*) FROM outbox").await;
            (left == 0).then_some(())
        },
    )
    .await;
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(20)).await.code(),
        Some(0)
    );
}

#[tokio::test]
async fn a_worker_on_a_queue_without_a_redrive_policy_exits_with_a_clear_message() {
    let clients = support::clients().await;
    let topo = Topology::with_prefix(support::unique("bare"));
    clients
        .sqs
        .create_queue()
        .queue_name(topo.queue_name(HandlerName::Inventory))
        .send()
        .await
        .unwrap();
    let (_pool, db_url) = support::fresh_db().await;
    let out = Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
        .args(["--handler", "inventory", "--prefix", &topo.prefix])
        .args(["--database-url", &db_url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("has no RedrivePolicy"), "{stderr}");
    assert!(stderr.contains("orderfleet provision"), "{stderr}");
}

#[tokio::test]
async fn under_systemd_the_worker_reports_ready_watchdog_and_stopping() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (_pool, db_url) = support::fresh_db().await;
    let dir = std::env::temp_dir().join(support::unique("notify"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
        .args(["--handler", "inventory", "--prefix", &topo.prefix])
        .args(["--database-url", &db_url, "--wait-time-secs", "1"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(support::Proc)
        .unwrap();
    let mut seen = Vec::new();
    recv(&sock, "READY=1", &mut seen).await.expect("READY=1");
    recv(&sock, "WATCHDOG=1", &mut seen)
        .await
        .expect("WATCHDOG=1");
    signal(&child, "-TERM");
    recv(&sock, "STOPPING=1", &mut seen)
        .await
        .expect("STOPPING=1");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(20)).await.code(),
        Some(0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads sd_notify datagrams until `want` arrives (20 s at most).
async fn recv(
    sock: &tokio::net::UnixDatagram,
    want: &str,
    seen: &mut Vec<String>,
) -> Result<(), String> {
    let mut buf = [0u8; 256];
    let read = async {
        loop {
            let n = sock.recv(&mut buf).await.unwrap();
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = msg == want;
            seen.push(msg);
            if done {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .map_err(|_| format!("no {want}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_publishing_on_commit_has_its_events_published_after_restart() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    let orders_q =
        orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.queue_name(HandlerName::Orders))
            .await
            .unwrap();
    let analytics_q =
        orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.queue_name(HandlerName::Analytics))
            .await
            .unwrap();
    // Five invalid orders: the orders handler commits an OrderRejected for each,
    // which goes to analytics.
    let bodies: Vec<String> = (0..5)
        .map(|i| support::invalid_order(&format!("o-k9p-{i}"), 1))
        .collect();
    // The first worker's EventBridge takes connections and never answers: its hand-offs are
    // out when it dies.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_url = format!("http://{}", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            held.push(socket);
        }
    });
    // Claims of 10 s: a hand-off gives its rows back after 5, so the kill has that long.
    let claim = ["--outbox-claim-secs", "10"];
    let mut first = support::orders_worker(
        &topo,
        &db_url,
        &claim,
        &[("AWS_ENDPOINT_URL_EVENTBRIDGE", hole_url.as_str())],
    );
    support::send_bodies(&clients, &orders_q, &bodies).await;
    support::wait_for(
        Duration::from_secs(30),
        "the rejections committed, claimed",
        || async {
            let claimed = support::scalar(
                &pool,
                "SELECT count(*) FROM outbox WHERE claimed_until > clock_timestamp()",
            )
            .await;
            (claimed == 5).then_some(())
        },
    )
    .await;
    signal(&first, "-KILL");
    assert_eq!(
        wait_exit(&mut first, Duration::from_secs(10)).await.code(),
        None
    );
    let committed: Vec<String> = {
        let c = pool.get().await.unwrap();
        c.query(
            "SELECT event_id::text FROM outbox WHERE claimed_until IS NOT NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(
        committed.len(),
        5,
        "the kill came after the hand-offs gave up"
    );

    // The restart talks to the real (emulated) EventBridge; its relay takes the dead
    // process's rows once their claim ran out.
    let mut second = support::orders_worker(&topo, &db_url, &claim, &[]);
    let delivered = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    support::wait_for(Duration::from_secs(40), "every rejection delivered", || {
        let (sqs, q, seen) = (clients.sqs.clone(), analytics_q.clone(), delivered.clone());
        async move {
            let bodies = support::receive_bodies(&sqs, &q).await;
            let mut seen = seen.lock().unwrap();
            for body in bodies {
                let e = Envelope::decode(&body).unwrap();
                if e.detail_type == "OrderRejected" {
                    seen.insert(e.event_key().to_string());
                }
            }
            (seen.len() == 5).then_some(())
        }
    })
    .await;
    let delivered: Vec<String> = delivered.lock().unwrap().iter().cloned().collect();
    let mut committed_sorted = committed.clone();
    committed_sorted.sort();
    assert_eq!(
        delivered, committed_sorted,
        "the committed events, with their ids"
    );
    support::wait_for(Duration::from_secs(10), "an empty outbox", || async {
        (support::scalar(&pool, "SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    signal(&second, "-TERM");
    assert_eq!(
        wait_exit(&mut second, Duration::from_secs(20)).await.code(),
        Some(0)
    );
}
