//! The operator's DLQ tools against the local stack: the real worker dead-letters messages,
//! the real `orderfleet` binary peeks, plans, redrives, exports, imports and purges them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use deadpool_postgres::Pool;
use orderfleet::domain::names::HandlerName;
use orderfleet::infra::aws::Clients;
use orderfleet::infra::topology::Topology;
use orderfleet::operator::mover::{self, CrashPoint, MoveOptions};
use orderfleet::operator::progress::Progress;
use orderfleet::operator::queue::{self, QueueRef, Role};
use orderfleet::sqs::attrs::{REDRIVEN_FROM, REDRIVE_COUNT, REDRIVE_KEY};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// helpers

/// Runs the `orderfleet` binary to completion.
fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run orderfleet")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).to_string()
}

async fn stop_worker(mut child: support::Proc) {
    support::signal(&child, "-TERM");
    support::wait_exit(&mut child, Duration::from_secs(30)).await;
    // The worker aborted its last long poll when it stopped, but the emulator (like SQS)
    // keeps an abandoned ReceiveMessage open for its wait time (1 s here): a message sent
    // meanwhile would be received by nobody and hidden for the visibility timeout. There is
    // no condition to observe, so wait that wait time out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

async fn send_all(clients: &Clients, url: &str, bodies: &[String]) {
    support::send_bodies(clients, url, bodies).await;
}

async fn url(clients: &Clients, name: &str) -> String {
    orderfleet::sqs::queue::queue_url(&clients.sqs, name)
        .await
        .unwrap()
}

/// Sends `bodies` to the inventory queue and lets the real worker handle them until `expect`
/// messages sit in its DLQ.
async fn dead_letter_through_the_worker(
    clients: &Clients,
    topo: &Topology,
    db_url: &str,
    bodies: &[String],
    expect: u64,
    worker_args: &[&str],
) {
    let work = url(clients, &topo.queue_name(HandlerName::Inventory)).await;
    let dlq = url(clients, &topo.dlq_name(HandlerName::Inventory)).await;
    send_all(clients, &work, bodies).await;
    let child = support::inventory_worker(topo, db_url, worker_args);
    // Generous: moto slows down when many tests share it, and this runs beside whole builds.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let last = loop {
        let (visible, hidden) = support::depth(clients, &dlq).await;
        let source = support::depth(clients, &work).await;
        let last = (visible, hidden, source.0 + source.1);
        if visible + hidden >= expect {
            break last;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the DLQ did not fill: (visible, in flight) in the DLQ and messages left in the \
             queue: {last:?}, expected {expect} in the DLQ"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    stop_worker(child).await;
    let (visible, hidden) = support::depth(clients, &dlq).await;
    assert_eq!(
        (visible, hidden),
        (expect, 0),
        "the DLQ holds more or other than the {expect} messages sent to it (last seen {last:?})"
    );
}

/// Receives and deletes everything in a queue: (body, message attributes) of each message.
async fn drain(
    clients: &Clients,
    url: &str,
) -> Vec<(String, HashMap<String, MessageAttributeValue>)> {
    let mut out = Vec::new();
    let mut empty = 0;
    while empty < 2 {
        let got = clients
            .sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default();
        if got.is_empty() {
            empty += 1;
            continue;
        }
        empty = 0;
        for m in got {
            clients
                .sqs
                .delete_message()
                .queue_url(url)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
            out.push((
                m.body().unwrap_or_default().to_string(),
                m.message_attributes().cloned().unwrap_or_default(),
            ));
        }
    }
    out
}

fn counted(bodies: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for b in bodies {
        *m.entry(b).or_insert(0) += 1;
    }
    m
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(support::unique(tag));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn journal_lines(dir: &Path) -> Vec<Value> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        lines.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok()),
        );
    }
    lines
}

async fn pool_scalar(pool: &Pool, sql: &str) -> Option<i64> {
    pool.get()
        .await
        .unwrap()
        .query_opt(sql, &[])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// A topology whose queues dead-letter after two receives, so retries run out quickly.
async fn quick_topology(clients: &Clients) -> Topology {
    let mut topo = Topology::with_prefix(support::unique("t"));
    topo.max_receive_count = 2;
    topo.lake = false;
    orderfleet::infra::provision::provision(clients, &topo)
        .await
        .expect("provision");
    topo
}

fn failure_attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .unwrap()
}

/// Puts messages straight into a DLQ, with failure attributes as the worker writes them
/// (for tests about moving, where how they got there does not matter).
async fn seed_dlq(clients: &Clients, dlq_url: &str, bodies: &[String], kind: &str) {
    for chunk in bodies.chunks(10) {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, b)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(b)
                    .message_attributes(orderfleet::sqs::attrs::KIND, failure_attr(kind))
                    .message_attributes(
                        orderfleet::sqs::attrs::REASON,
                        failure_attr("seeded by a test"),
                    )
                    .message_attributes("tenant", failure_attr("acme"))
                    .build()
                    .unwrap()
            })
            .collect();
        clients
            .sqs
            .send_message_batch()
            .queue_url(dlq_url)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 1 and 2: the worker dead-letters, peek shows why

#[tokio::test]
async fn peek_shows_why_the_worker_dead_lettered_poison_and_permanent_failures() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (_pool, db_url) = support::fresh_db().await;
    let bodies = vec![
        support::stock_received("negative", -4),
        support::stock_received("zero", 0),
        "not json at all".to_string(),
        support::event_body(
            "StockReceived",
            "orderfleet.storefront",
            json!({"quantity": 3}),
        ),
    ];
    dead_letter_through_the_worker(&clients, &topo, &db_url, &bodies, 4, &[]).await;

    let out = cli(&[
        "dlq",
        "peek",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let messages = doc["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{doc}");
    let by_body: HashMap<&str, &Value> = messages
        .iter()
        .map(|m| (m["body"].as_str().unwrap(), m))
        .collect();
    let negative = by_body[bodies[0].as_str()];
    assert_eq!(negative["kind"], "permanent");
    assert_eq!(negative["detail_type"], "StockReceived");
    assert_eq!(negative["source"], "orderfleet.storefront");
    assert_eq!(negative["handler"], "inventory");
    assert!(negative["event_id"].as_str().is_some());
    assert!(negative["reason"]
        .as_str()
        .unwrap()
        .contains("non-positive quantity -4"));
    assert!(negative["age_secs"].as_i64().is_some());
    let garbage = by_body["not json at all"];
    assert_eq!(garbage["kind"], "poison");
    assert!(garbage["reason"]
        .as_str()
        .unwrap()
        .contains("not an EventBridge event"));
    assert!(garbage["event_id"].is_null());
    let schema = by_body[bodies[3].as_str()];
    assert_eq!(schema["kind"], "poison");
    assert!(schema["reason"]
        .as_str()
        .unwrap()
        .contains("does not match its schema"));

    // The table says the same to a human.
    let out = cli(&["dlq", "peek", "inventory", "--prefix", &topo.prefix]);
    let table = text(&out.stdout);
    assert!(table.contains("non-positive quantity 0"), "{table}");
    assert!(table.contains("(not an event)"), "{table}");

    // Peeking hid nothing: every message is visible again at once, none in flight, and
    // nothing moved out of the DLQ.
    let dlq = url(&clients, &topo.dlq_name(HandlerName::Inventory)).await;
    assert_eq!(support::depth(&clients, &dlq).await, (4, 0));
    let work = url(&clients, &topo.queue_name(HandlerName::Inventory)).await;
    assert_eq!(support::depth(&clients, &work).await, (0, 0));
    // The receive count shown includes the peeks: two so far, so this one says 3.
    let out = cli(&[
        "dlq",
        "peek",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--json",
    ]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        doc["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["receive_count"] == 3),
        "{doc}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3: dry run

#[tokio::test]
async fn a_dry_run_prints_the_plan_and_changes_nothing() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (_pool, db_url) = support::fresh_db().await;
    let bodies = vec![
        support::stock_received("a", 0),
        support::stock_received("b", -1),
        support::stock_received("c", -2),
        support::stock_received("d", -2),
        "{\"broken\":".to_string(),
    ];
    dead_letter_through_the_worker(&clients, &topo, &db_url, &bodies, 5, &[]).await;
    let journals = temp_dir("journal");
    let dir = journals.to_str().unwrap();

    let out = cli(&[
        "dlq",
        "redrive",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--dry-run",
        "--json",
        "--filter",
        "kind=permanent",
        "--journal-dir",
        dir,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["matching"], 4, "{plan}");
    assert_eq!(plan["examined"], 5);
    assert_eq!(plan["method"], "client-side");
    assert_eq!(plan["by_detail_type"], json!({"StockReceived": 4}));
    let reasons = plan["by_reason"].as_object().unwrap();
    assert_eq!(reasons.len(), 4, "{plan}");
    assert_eq!(
        reasons["StockReceived for d has a non-positive quantity -2"], 1,
        "{plan}"
    );
    assert_eq!(plan["samples"].as_array().unwrap().len(), 3);

    let text_plan = cli(&[
        "dlq",
        "redrive",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--dry-run",
        "--journal-dir",
        dir,
    ]);
    let shown = text(&text_plan.stdout);
    assert!(shown.contains("would move 5 of 5"), "{shown}");
    assert!(shown.contains("by failure reason"), "{shown}");
    assert!(shown.contains("nothing changed"), "{shown}");

    let dlq = url(&clients, &topo.dlq_name(HandlerName::Inventory)).await;
    let work = url(&clients, &topo.queue_name(HandlerName::Inventory)).await;
    assert_eq!(support::depth(&clients, &dlq).await, (5, 0));
    assert_eq!(support::depth(&clients, &work).await, (0, 0));
    assert!(
        journal_lines(&journals).is_empty(),
        "a dry run wrote a journal"
    );
    assert!(
        !text(&out.stderr).contains("audit:"),
        "a dry run claims a change"
    );
}

// ---------------------------------------------------------------------------------------------
// 4: a filtered redrive of what was fixed, then the fleet processes it

#[tokio::test]
async fn a_filtered_redrive_moves_exactly_the_fixed_messages_and_the_fleet_then_processes_them() {
    let clients = support::clients().await;
    let topo = quick_topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    // The incident: something holds a lock on the stock row of "locked" (think of a stuck
    // migration), so every StockReceived for it times out until its retries run out.
    let mut blocker = pool.get().await.unwrap();
    let lock = blocker.transaction().await.unwrap();
    lock.execute("INSERT INTO stock (sku, on_hand) VALUES ('locked', 0)", &[])
        .await
        .unwrap();
    let stuck: Vec<String> = (0..3)
        .map(|_| support::stock_received("locked", 2))
        .collect();
    let broken = vec![
        support::stock_received("bad", 0),
        support::stock_received("bad", -1),
        "garbage".to_string(),
    ];
    let all: Vec<String> = stuck.iter().chain(&broken).cloned().collect();
    let dlq = url(&clients, &topo.dlq_name(HandlerName::Inventory)).await;
    let work = url(&clients, &topo.queue_name(HandlerName::Inventory)).await;
    send_all(&clients, &work, &all).await;
    let child = support::inventory_worker(
        &topo,
        &db_url,
        &[
            "--handler-timeout-secs",
            "1",
            "--retry-base-secs",
            "1",
            "--retry-cap-secs",
            "1",
            "--db-pool-size",
            "32",
            "--shutdown-grace-secs",
            "1",
        ],
    );
    support::wait_for(Duration::from_secs(60), "the DLQ to fill", || async {
        (support::depth(&clients, &dlq).await.0 == 6).then_some(())
    })
    .await;
    // The fix: the lock goes away. Only the exhausted messages can succeed now. (Released
    // before the worker stops: its timed-out handlers left statements queued behind the lock.)
    lock.rollback().await.unwrap();
    drop(blocker);
    stop_worker(child).await;

    let journals = temp_dir("journal");
    let out = cli(&[
        "dlq",
        "redrive",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--yes",
        "--filter",
        "kind=exhausted",
        "--filter",
        "detail.sku=locked",
        "--journal-dir",
        journals.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("moving on the client side (filters"),
        "{stderr}"
    );
    assert!(
        stderr.contains("audit: moved 3 of 3 matching from")
            && stderr.contains("(filters: kind=exhausted detail.sku=locked), 0 failed"),
        "{stderr}"
    );

    assert_eq!(support::depth(&clients, &work).await, (3, 0));
    assert_eq!(support::depth(&clients, &dlq).await, (3, 0));
    // What stayed behind is exactly the unfixable three.
    let peek = cli(&[
        "dlq",
        "peek",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--json",
    ]);
    let doc: Value = serde_json::from_slice(&peek.stdout).unwrap();
    let left = counted(
        doc["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_string()),
    );
    assert_eq!(left, counted(broken.clone()));

    // The fleet handles the redriven messages: each applied once.
    let child = support::inventory_worker(&topo, &db_url, &[]);
    support::wait_for(
        Duration::from_secs(30),
        "the redriven stock applied",
        || async {
            let on_hand =
                pool_scalar(&pool, "SELECT on_hand FROM stock WHERE sku = 'locked'").await;
            (on_hand == Some(6) && support::depth(&clients, &work).await == (0, 0)).then_some(())
        },
    )
    .await;
    stop_worker(child).await;
    assert_eq!(
        pool_scalar(
            &pool,
            "SELECT count(*) FROM stock_movements WHERE sku = 'locked'"
        )
        .await,
        Some(3)
    );
    assert_eq!(support::depth(&clients, &dlq).await, (3, 0));
}

// ---------------------------------------------------------------------------------------------
// 5: kill the redrive mid-way, rerun

#[tokio::test]
async fn a_redrive_killed_mid_way_and_rerun_moves_every_message_exactly_once() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (_pool, db_url) = support::fresh_db().await;
    let permanent: Vec<String> = (0..30)
        .map(|i| support::stock_received(&format!("k{i}"), -i))
        .collect();
    let poison: Vec<String> = (0..6).map(|i| format!("poison {i}")).collect();
    let all: Vec<String> = permanent.iter().chain(&poison).cloned().collect();
    dead_letter_through_the_worker(&clients, &topo, &db_url, &all, 36, &[]).await;
    let dlq = url(&clients, &topo.dlq_name(HandlerName::Inventory)).await;
    let work = url(&clients, &topo.queue_name(HandlerName::Inventory)).await;
    let journals = temp_dir("journal");
    let dir = journals.to_str().unwrap();
    let args = [
        "dlq",
        "redrive",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--yes",
        "--filter",
        "kind=permanent",
        "--journal-dir",
        dir,
        "--visibility-timeout-secs",
        "4",
    ];

    let mut first = Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(args)
        .args(["--rate", "5"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it between batches once some moved: every intent answered (the rate limit keeps
    // the next batch about a second away). The journal's in-doubt window has its own test.
    support::wait_for(Duration::from_secs(30), "some messages moved", || async {
        let lines = journal_lines(&journals);
        let count = |t: &str| lines.iter().filter(|l| l["type"] == t).count();
        let moved = support::depth(&clients, &work).await.0 as usize;
        (count("sent") >= 10 && count("intent") == count("sent") && moved >= 10).then_some(())
    })
    .await;
    Command::new("kill")
        .args(["-KILL", &first.id().to_string()])
        .status()
        .unwrap();
    let status = first.wait().unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    let moved_at_kill = support::depth(&clients, &work).await.0;
    assert!(
        moved_at_kill < 30,
        "the kill came too late to prove anything"
    );

    let rerun = cli(&args);
    let stderr = text(&rerun.stderr);
    assert_eq!(rerun.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("resuming the unfinished move"), "{stderr}");
    // Every message is in exactly one place, exactly once.
    let moved = drain(&clients, &work).await;
    let stayed = drain(&clients, &dlq).await;
    assert_eq!(
        (moved.len(), stayed.len()),
        (30, 6),
        "moved {moved_at_kill} before the kill; rerun: {stderr}"
    );
    assert_eq!(counted(moved.into_iter().map(|m| m.0)), counted(permanent));
    assert_eq!(counted(stayed.into_iter().map(|m| m.0)), counted(poison));
}

/// Runs the mover in process, optionally "crashing" (stopping dead, as kill -9 would, leaving
/// the journal and the hidden messages as they are) at a point.
async fn run_mover(
    clients: &Clients,
    source: &QueueRef,
    target: &QueueRef,
    journal: &Path,
    crash_at: Option<CrashPoint>,
) -> anyhow::Result<mover::MoveReport> {
    let opts = MoveOptions {
        filters: vec![],
        limit: None,
        rate: None,
        visibility: Duration::from_secs(2),
        journal: journal.to_path_buf(),
        crash_at,
    };
    mover::move_messages(
        &clients.sqs,
        source,
        target,
        &opts,
        &CancellationToken::new(),
        &mut Progress::hidden(),
    )
    .await
}

async fn seeded_pair(clients: &Clients, n: usize) -> (Topology, QueueRef, QueueRef, Vec<String>) {
    let topo = support::topology(clients).await;
    let source = queue::resolve(&clients.sqs, &topo.prefix, "inventory", Role::Dlq)
        .await
        .unwrap();
    let target = queue::resolve(&clients.sqs, &topo.prefix, "inventory", Role::Work)
        .await
        .unwrap();
    let bodies: Vec<String> = (0..n)
        .map(|i| support::stock_received(&format!("s{i}"), 1))
        .collect();
    seed_dlq(clients, &source.url, &bodies, "exhausted").await;
    (topo, source, target, bodies)
}

#[tokio::test]
async fn a_crash_before_the_send_or_before_the_delete_neither_loses_nor_duplicates() {
    let clients = support::clients().await;
    for crash in [CrashPoint::AfterIntent(2), CrashPoint::AfterSent(2)] {
        let (_topo, source, target, bodies) = seeded_pair(&clients, 25).await;
        let journal = temp_dir("journal").join("j.jsonl");
        let err = run_mover(&clients, &source, &target, &journal, Some(crash))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("injected crash"), "{err}");
        let report = run_mover(&clients, &source, &target, &journal, None)
            .await
            .unwrap();
        assert!(report.resumed);
        match crash {
            // Batch 2 was announced but never sent: the rerun cannot know that, calls it in
            // doubt, and sends it — for the first time.
            CrashPoint::AfterIntent(_) => assert_eq!(report.in_doubt_resent, 10, "{report:?}"),
            // Batch 2 was in the target already: the rerun only deleted its source copies.
            _ => assert_eq!(report.completed_from_journal, 10, "{report:?}"),
        }
        let moved = drain(&clients, &target.url).await;
        assert_eq!(
            counted(moved.iter().map(|m| m.0.clone())),
            counted(bodies),
            "{crash:?}"
        );
        assert!(drain(&clients, &source.url).await.is_empty(), "{crash:?}");
        // The redriven copies carry the original attributes minus the failure, plus where
        // they came from.
        let attrs = &moved[0].1;
        assert_eq!(attrs["tenant"].string_value(), Some("acme"));
        assert!(!attrs.contains_key(orderfleet::sqs::attrs::KIND));
        assert!(!attrs.contains_key(orderfleet::sqs::attrs::REASON));
        assert_eq!(
            attrs[REDRIVEN_FROM].string_value(),
            Some(source.name.as_str())
        );
        assert_eq!(attrs[REDRIVE_COUNT].string_value(), Some("1"));
    }
}

#[tokio::test]
async fn a_crash_between_the_send_and_its_journal_entry_resends_only_that_batch_under_the_same_key()
{
    let clients = support::clients().await;
    let (_topo, source, target, bodies) = seeded_pair(&clients, 25).await;
    let journal = temp_dir("journal").join("j.jsonl");
    run_mover(
        &clients,
        &source,
        &target,
        &journal,
        Some(CrashPoint::AfterSend(2)),
    )
    .await
    .unwrap_err();
    let report = run_mover(&clients, &source, &target, &journal, None)
        .await
        .unwrap();
    // The documented window: batch 2 reached the target, but the journal cannot know.
    assert_eq!(report.in_doubt_resent, 10, "{report:?}");
    let moved = drain(&clients, &target.url).await;
    assert_eq!(moved.len(), 35);
    let mut keys: HashMap<String, (String, usize)> = HashMap::new();
    for (body, attrs) in &moved {
        let key = attrs[REDRIVE_KEY].string_value().unwrap().to_string();
        let e = keys.entry(key).or_insert((body.clone(), 0));
        assert_eq!(&e.0, body, "one key, one body");
        e.1 += 1;
    }
    assert_eq!(keys.len(), 25, "every source message has its own key");
    assert_eq!(keys.values().filter(|(_, n)| *n == 2).count(), 10);
    assert_eq!(
        counted(keys.into_values().map(|(b, _)| b)),
        counted(bodies),
        "nothing lost"
    );
    assert!(drain(&clients, &source.url).await.is_empty());
}

#[tokio::test]
async fn a_redrive_without_filters_on_moto_falls_back_to_the_client_side_and_says_so() {
    let clients = support::clients().await;
    let (topo, source, target, bodies) = seeded_pair(&clients, 12).await;
    let journals = temp_dir("journal");
    let out = cli(&[
        "dlq",
        "redrive",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--yes",
        "--rate",
        "100",
        "--journal-dir",
        journals.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("native move tasks are not available") && stderr.contains("HTTP 500"),
        "{stderr}"
    );
    assert!(
        stderr.contains("audit: moved 12 of 12 matching"),
        "{stderr}"
    );
    let moved = drain(&clients, &target.url).await;
    assert_eq!(counted(moved.into_iter().map(|m| m.0)), counted(bodies));
    assert_eq!(support::depth(&clients, &source.url).await, (0, 0));
}

// ---------------------------------------------------------------------------------------------
// 6: export and import

fn attribute(
    data_type: &str,
    string: Option<&str>,
    binary: Option<&[u8]>,
) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type(data_type)
        .set_string_value(string.map(str::to_string))
        .set_binary_value(binary.map(|b| aws_sdk_sqs::primitives::Blob::new(b.to_vec())))
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_export_then_an_import_keeps_bodies_and_attributes_byte_for_byte() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let dlq = url(&clients, &topo.dlq_name(HandlerName::Inventory)).await;
    let bytes: Vec<u8> = (0..=255).collect();
    let bodies = [
        support::stock_received("x", 0),
        "  {\"b\":1,  \"a\":[2,1]}\n\ttrailing ".to_string(),
        "ünïcödé ✓ 🚚 \u{7f}".to_string(),
        "x".repeat(200_000),
    ];
    for (i, body) in bodies.iter().enumerate() {
        clients
            .sqs
            .send_message()
            .queue_url(&dlq)
            .message_body(body)
            .message_attributes("n", attribute("Number", Some("1.50"), None))
            .message_attributes("bin", attribute("Binary", None, Some(&bytes[i..])))
            .message_attributes(
                "custom",
                attribute("String.json", Some("{\"k\": \"v\" }"), None),
            )
            .message_attributes(orderfleet::sqs::attrs::KIND, failure_attr("poison"))
            .send()
            .await
            .unwrap();
    }
    let dir = temp_dir("export");
    let file = dir.join("dlq.jsonl");
    let file_arg = file.to_str().unwrap();
    let out = cli(&[
        "dlq",
        "export",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--out",
        file_arg,
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("audit: exported 4 of 4"), "{stderr}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the export is private");
    // The messages stay, visible.
    assert_eq!(support::depth(&clients, &dlq).await, (4, 0));
    // Never overwritten.
    let again = cli(&[
        "dlq",
        "export",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--out",
        file_arg,
    ]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("never overwritten"));

    // Import into another queue, then compare message by message.
    let copy_name = format!("{}-copy", topo.prefix);
    let copy = clients
        .sqs
        .create_queue()
        .queue_name(&copy_name)
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let out = cli(&[
        "dlq",
        "import",
        &copy_name,
        "--prefix",
        &topo.prefix,
        "--from",
        file_arg,
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("audit: imported 4 of 4 lines"), "{stderr}");
    // A second run knows it is done.
    let again = cli(&[
        "dlq",
        "import",
        &copy_name,
        "--prefix",
        &topo.prefix,
        "--from",
        file_arg,
    ]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("already imported"));

    let original = drain(&clients, &dlq).await;
    let imported = drain(&clients, &copy).await;
    let key = |v: &Vec<(String, HashMap<String, MessageAttributeValue>)>| {
        let mut v: Vec<(String, BTreeMap<String, MessageAttributeValue>)> = v
            .iter()
            .map(|(b, a)| (b.clone(), a.clone().into_iter().collect()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(original.len(), 4);
    assert_eq!(key(&original), key(&imported));
    let (_, attrs) = &key(&imported)[0];
    assert_eq!(attrs["n"].string_value(), Some("1.50"));
    assert_eq!(attrs["custom"].data_type(), "String.json");
}

#[tokio::test]
async fn export_with_delete_removes_exactly_what_it_wrote() {
    let clients = support::clients().await;
    let (topo, source, _target, bodies) = seeded_pair(&clients, 15).await;
    let file = temp_dir("export").join("dlq.jsonl");
    let out = cli(&[
        "dlq",
        "export",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--out",
        file.to_str().unwrap(),
        "--delete",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        counted(
            lines
                .iter()
                .map(|l| l["body"].as_str().unwrap().to_string())
        ),
        counted(bodies)
    );
    assert!(lines[0]["attributes"]["SentTimestamp"].is_string());
    assert_eq!(
        lines[0]["message_attributes"]["tenant"]["string_value"],
        "acme"
    );
    assert_eq!(support::depth(&clients, &source.url).await, (0, 0));
}

// ---------------------------------------------------------------------------------------------
// 7: purge

#[tokio::test]
async fn purge_without_yes_refuses_and_suggests_an_export_first() {
    let clients = support::clients().await;
    let (topo, source, _target, _bodies) = seeded_pair(&clients, 3).await;
    let out = cli(&["dlq", "purge", "inventory", "--prefix", &topo.prefix]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("without --yes"), "{stderr}");
    assert!(
        stderr.contains("orderfleet dlq export inventory --out FILE"),
        "{stderr}"
    );
    assert!(!stderr.contains("audit:"), "{stderr}");
    assert_eq!(support::depth(&clients, &source.url).await, (3, 0));

    let out = cli(&[
        "dlq",
        "purge",
        "inventory",
        "--prefix",
        &topo.prefix,
        "--yes",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("audit: purged"), "{stderr}");
    support::wait_for(Duration::from_secs(60), "the purge", || async {
        (support::depth(&clients, &source.url).await == (0, 0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_bad_filter_is_refused_before_anything_is_read() {
    let out = cli(&[
        "dlq",
        "redrive",
        "inventory",
        "--filter",
        "colour=red",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown filter key \"colour\""), "{stderr}");
    assert!(stderr.contains("detail.<path>"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Privacy: what a terminal shows

#[tokio::test]
async fn peek_and_a_dry_run_mask_customer_data_that_peek_json_keeps_whole() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let dlq = url(&clients, &topo.dlq_name(HandlerName::Orders)).await;
    let mut detail = orderfleet_testkit::examples::example("OrderPlaced").unwrap();
    detail["payment_token"] = json!("tok_secret_77");
    detail["customer"]["email"] = json!("grace@example.com");
    detail["shipping_address"]["line1"] = json!("1 Navy Yard Lane");
    let body = serde_json::to_string(&orderfleet_testkit::examples::envelope(
        "OrderPlaced",
        &detail,
    ))
    .unwrap();
    clients
        .sqs
        .send_message()
        .queue_url(&dlq)
        .message_body(&body)
        .message_attributes(orderfleet::sqs::attrs::KIND, failure_attr("permanent"))
        .message_attributes(
            orderfleet::sqs::attrs::REASON,
            failure_attr("mail to grace@example.com bounced"),
        )
        .send()
        .await
        .unwrap();
    let journals = temp_dir("journal");
    let prefix = topo.prefix.as_str();
    let shown = [
        cli(&["dlq", "peek", "orders", "--prefix", prefix]),
        cli(&[
            "dlq",
            "redrive",
            "orders",
            "--prefix",
            prefix,
            "--dry-run",
            "--journal-dir",
            journals.to_str().unwrap(),
        ]),
    ];
    for out in &shown {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        for secret in ["grace@example.com", "tok_secret_77", "Navy Yard"] {
            assert!(!stdout.contains(secret), "{secret} shown: {stdout}");
        }
        assert!(stdout.contains("g***@example.com"), "{stdout}");
    }
    let json_out = cli(&["dlq", "peek", "orders", "--prefix", prefix, "--json"]);
    let full = text(&json_out.stdout);
    assert!(
        full.contains("grace@example.com") && full.contains("tok_secret_77"),
        "--json keeps the body whole, as its --help says: {full}"
    );
}
