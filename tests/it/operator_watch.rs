//! `orderfleet watch` and `make run`: what a person who started the fleet sees.
//!
//! The first test drives a small run through the real AWS path (the simulator publishes through
//! moto's EventBridge, the real worker handles it) and reads `watch --once --json` against the
//! database and the queues. The second runs `scripts/run.sh` itself, as `make run` does, and
//! stops it the way a terminal's Ctrl-C does.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support;
use orderfleet::domain::names::HandlerName;
use serde_json::Value;

const ORDERS: usize = 8;
/// A seed whose orders include completed and cancelled ones (checked below).
const SEED: u64 = 5;
/// The handlers the first test's worker runs; the others get no worker.
const RUNNING: [&str; 5] = [
    "orders",
    "inventory",
    "payments",
    "fulfillment",
    "notifications",
];

fn orderfleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("ORDERFLEET_RUN_ID")
        .env_remove("ORDERFLEET_EMAIL_OUTBOX_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("run orderfleet")
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn send(clients: &orderfleet::infra::aws::Clients, queue: &str, body: &str) {
    let url = orderfleet::sqs::queue::queue_url(&clients.sqs, queue)
        .await
        .unwrap();
    clients
        .sqs
        .send_message()
        .queue_url(url)
        .message_body(body)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn watch_once_json_reports_orders_by_outcome_handler_rates_depths_and_the_email_folder() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    let outbox_dir = std::env::temp_dir().join(format!("{}-outbox", topo.prefix));
    let outbox = outbox_dir.to_str().unwrap().to_string();
    // A dead letter for payments, and work for a handler nobody runs.
    send(&clients, &topo.dlq_name(HandlerName::Payments), "dead").await;
    send(
        &clients,
        &topo.queue_name(HandlerName::Personalization),
        "waiting",
    )
    .await;

    let log_path = std::env::temp_dir().join(format!("{}-worker.log", topo.prefix));
    let _worker = Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
        .args(["--handler", &RUNNING.join(",")])
        .args(["--prefix", &topo.prefix, "--database-url", &db_url])
        .args(["--sandbox-payment-database-url", &db_url])
        .args(["--email-outbox-dir", &outbox])
        .args(["--wait-time-secs", "1", "--retry-base-secs", "1"])
        .args(["--heartbeat-secs", "1", "--metrics-sink", "none"])
        .env("RUST_LOG", "warn")
        .env_remove("ORDERFLEET_HANDLERS")
        .stdout(Stdio::null())
        .stderr(File::create(&log_path).unwrap())
        .spawn()
        .map(support::Proc)
        .expect("spawn orderfleet-worker");
    let worker_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let run_id = support::unique("w");
    let published = orderfleet(&[
        "publish",
        "--orders",
        &ORDERS.to_string(),
        "--seed",
        &SEED.to_string(),
        "--run-id",
        &run_id,
        "--prefix",
        &topo.prefix,
        "--database-url",
        &db_url,
    ]);
    assert!(
        published.status.success(),
        "{}\n--- worker\n{}",
        describe("publish", &published),
        worker_log()
    );
    let waited = orderfleet(&[
        "wait",
        "--timeout-secs",
        "60",
        "--interval-ms",
        "250",
        "--database-url",
        &db_url,
    ]);
    assert!(
        waited.status.success(),
        "{}\n--- worker\n{}",
        describe("wait", &waited),
        worker_log()
    );

    let watch = |extra: &'static [&'static str]| {
        let (prefix, url, outbox) = (topo.prefix.clone(), db_url.clone(), outbox.clone());
        move || {
            let mut args = vec![
                "watch",
                "--once",
                "--prefix",
                &prefix,
                "--database-url",
                &url,
                "--email-outbox-dir",
                &outbox,
                "--rate-window-secs",
                "600",
            ];
            args.extend(extra);
            orderfleet(&args)
        }
    };
    // `wait` settles the orders; the last emails may still be on their way.
    let doc: Value = support::wait_for(Duration::from_secs(30), "the last emails", || {
        let out = watch(&["--json"])();
        async move {
            assert_eq!(out.status.code(), Some(0), "{}", describe("watch", &out));
            let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
            let notifications = doc["handlers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h["handler"] == "notifications")
                .cloned()
                .unwrap();
            let idle = notifications["queue_visible"] == 0
                && notifications["queue_in_flight"] == 0
                && doc["emails"]["sent"].as_i64() > Some(0);
            idle.then_some(doc)
        }
    })
    .await;

    // Orders: the run's, by outcome, agreeing with the table.
    let client = pool.get().await.unwrap();
    let by_status: BTreeMap<String, i64> = client
        .query("SELECT status, count(*) FROM orders GROUP BY status", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let orders = &doc["orders"];
    assert_eq!(orders["scope"], "run", "{orders}");
    assert_eq!(doc["run"]["run_id"], run_id.as_str());
    assert_eq!(orders["published"], ORDERS, "{orders}");
    assert_eq!(orders["placed"], ORDERS, "{orders}");
    assert_eq!(orders["in_flight"], 0, "{orders}");
    for status in ["completed", "cancelled", "rejected", "returned"] {
        assert_eq!(
            orders[status].as_i64(),
            Some(by_status.get(status).copied().unwrap_or(0)),
            "{status}: {orders} vs {by_status:?}"
        );
    }
    assert!(orders["completed"].as_i64() >= Some(1), "{orders}");
    assert!(orders["cancelled"].as_i64() >= Some(1), "{orders}");

    // Handlers: the running ones applied events at a measurable rate; the others have none.
    let handlers: BTreeMap<String, Value> = doc["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["handler"].as_str().unwrap().to_string(), h.clone()))
        .collect();
    assert_eq!(handlers.len(), HandlerName::ALL.len(), "{handlers:?}");
    for h in HandlerName::ALL {
        let row = &handlers[h.as_str()];
        if RUNNING.contains(&h.as_str()) {
            assert_eq!(row["workers"], 1, "{row}");
            assert!(row["applied"].as_i64() > Some(0), "{row}");
            assert!(row["per_sec"].as_f64() > Some(0.0), "{row}");
        } else {
            assert_eq!(row["workers"], 0, "{row}");
            assert_eq!(row["applied"], 0, "{row}");
        }
    }
    // The inbox is where the rate comes from: per handler, its rows over the window.
    let inbox: i64 = client
        .query_one(
            "SELECT count(*) FROM processed_messages WHERE handler = 'orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(handlers["orders"]["applied"], inbox);
    assert_eq!(handlers["payments"]["dlq_depth"], 1, "the dead letter");
    assert_eq!(handlers["orders"]["dlq_depth"], 0);
    // Nobody consumes personalization: its queue holds the message sent above and the events
    // the rules routed there, as many as SQS counts.
    let personalization = orderfleet::sqs::queue::queue_url(
        &clients.sqs,
        &topo.queue_name(HandlerName::Personalization),
    )
    .await
    .unwrap();
    let (waiting, _) = support::depth(&clients, &personalization).await;
    assert!(waiting >= 1);
    assert_eq!(handlers["personalization"]["queue_visible"], waiting);
    assert_eq!(doc["workers_live"], 1);
    assert_eq!(doc["outbox"]["pending"], 0);

    // Emails: how many, and the folder they are in, as files.
    let sent: i64 = client
        .query_one("SELECT count(*) FROM emails WHERE status = 'sent'", &[])
        .await
        .unwrap()
        .get(0);
    let emails = &doc["emails"];
    assert_eq!(emails["sent"], sent, "{emails}");
    assert_eq!(emails["sent_by_transport"]["file"], sent, "{emails}");
    assert_eq!(emails["outbox_dir"], outbox.as_str());
    let files = std::fs::read_dir(&outbox_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "eml")
        })
        .count();
    assert_eq!(emails["outbox_files"], files);
    assert_eq!(files as i64, sent);
    assert!(emails["by_kind"]["confirmation"].as_i64() >= Some(1));

    // Without --json and not on a terminal: one line saying the same.
    let line = watch(&[])();
    let text = String::from_utf8_lossy(&line.stdout);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains(&format!(
            "{ORDERS} placed, 0 in flight, {} completed",
            orders["completed"]
        )),
        "{text}"
    );
    assert!(text.contains("DLQ 1"), "{text}");

    // A run that was never published counts nothing, and says so rather than failing.
    let other = watch(&["--json", "--run-id", "never_published"])();
    let other: Value = serde_json::from_slice(&other.stdout).unwrap();
    assert_eq!(other["orders"]["scope"], "run");
    assert_eq!(other["orders"]["placed"], 0);
    assert_eq!(other["run"], Value::Null);

    let _ = std::fs::remove_dir_all(&outbox_dir);
}

/// Reads the script's stdout lines on a thread, so the test can wait for one with a deadline.
fn lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The script, in a process group of its own. Dropped while it still runs (a failed assertion),
/// it gets SIGTERM, which its trap forwards to the worker (in a group of its own), and a while
/// to stop, so that no worker is left consuming the stack's queues.
struct Script(support::Proc);

impl Script {
    fn signal_group(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, "--", &format!("-{}", self.0.id())])
            .status();
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.signal_group("-TERM");
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `make run` without the build: `scripts/run.sh` with this build's binaries, on the stack's own
/// database and default prefix, as `make run` uses them. It publishes three orders, shows the
/// watch (one line per refresh, since its stdout is a pipe here) and keeps the workers' logs
/// in the file it names, as text and without EMF lines; Ctrl-C (SIGINT to the foreground
/// process group, as a terminal sends it) stops everything with status 0.
#[test]
fn make_run_shows_the_watch_and_keeps_the_logs_plain_in_the_file_it_names() {
    support::env("DATABASE_URL");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_orderfleet"))
        .parent()
        .unwrap();
    let dir = std::env::temp_dir().join(support::unique("of_run_"));
    std::fs::create_dir_all(&dir).unwrap();
    let run_log = dir.join("run.log");
    let run_id = support::unique("r");
    let mut script = Command::new("bash");
    script
        .arg(root.join("scripts/run.sh"))
        .current_dir(root)
        .env("ORDERFLEET_BIN_DIR", bin_dir)
        .env("ORDERS", "3")
        .env("RUN_LOG", &run_log)
        .env("WATCH_INTERVAL", "1")
        .env("ORDERFLEET_RUN_ID", &run_id)
        .env("ORDERFLEET_EMAIL_OUTBOX_DIR", dir.join("outbox"))
        // Short polls: the stop waits for the receives in flight.
        .env("ORDERFLEET_WAIT_TIME_SECS", "1")
        // EMF, were it on, would be written every second.
        .env("ORDERFLEET_METRICS_INTERVAL_SECS", "1")
        .env_remove("ORDERFLEET_METRICS_SINK")
        .env_remove("ORDERFLEET_LOG_FORMAT")
        .env_remove("ORDERFLEET_HANDLERS")
        .env_remove("ORDERFLEET_PREFIX")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, as a shell gives a foreground job: the signal below goes to
        // the whole group, like a terminal's Ctrl-C.
        .process_group(0);
    let mut child = Script(support::Proc(script.spawn().expect("run scripts/run.sh")));
    let stdout = lines(child.0.stdout.take().unwrap());
    let log = || std::fs::read_to_string(&run_log).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let settled = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match stdout.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("3 placed, 0 in flight");
                seen.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    child.signal_group("-INT");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if status.is_some() {
        use std::io::Read;
        let _ = child.0.stderr.take().unwrap().read_to_string(&mut stderr);
    }
    seen.extend(stdout.try_iter());
    let context = format!(
        "--- stdout\n{}\n--- stderr\n{stderr}\n--- log\n{}",
        seen.join("\n"),
        log()
    );
    assert!(
        settled,
        "the watch never showed the three orders settled\n{context}"
    );
    let status = status.unwrap_or_else(|| panic!("run.sh did not stop after SIGINT\n{context}"));
    assert_eq!(status.code(), Some(0), "{context}");

    // The terminal got the watch and nothing else: every stdout line is a refresh of it.
    for line in seen.iter().filter(|l| !l.is_empty()) {
        assert!(
            line.contains(&format!("orders (run {run_id}")),
            "not a watch line: {line:?}\n{context}"
        );
    }
    // Where the logs are: named when it stops.
    assert!(
        stderr.contains(&format!("the workers' logs: {}", run_log.display())),
        "{context}"
    );
    // The log: the worker's text lines, no JSON objects, no EMF, no colour codes.
    let text = log();
    assert!(text.contains("worker ready"), "{context}");
    assert!(text.contains("worker stopped"), "{context}");
    assert!(text.contains("handled"), "{context}");
    assert!(
        !text.contains("\"_aws\""),
        "EMF lines in the log\n{context}"
    );
    assert!(!text.contains('\x1b'), "colour codes in the log\n{context}");
    assert!(
        !text.lines().any(|l| l.starts_with('{')),
        "JSON lines in the log\n{context}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
