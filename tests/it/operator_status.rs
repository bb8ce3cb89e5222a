//! `orderfleet status --json` against the local stack and a running worker.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support;
use orderfleet::domain::names::HandlerName;
use serde_json::Value;

#[tokio::test]
async fn status_json_shows_the_queues_the_dlq_depths_and_the_live_workers() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    let dlq =
        orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.dlq_name(HandlerName::Inventory))
            .await
            .unwrap();
    let orders =
        orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.queue_name(HandlerName::Orders))
            .await
            .unwrap();
    for (url, body) in [(&dlq, "dead 1"), (&dlq, "dead 2"), (&orders, "waiting")] {
        clients
            .sqs
            .send_message()
            .queue_url(url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }
    // A worker that died without saying so, five minutes ago.
    pool.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO worker_heartbeats (worker_id, handlers, host, pid, version, started_at, last_seen_at)
             VALUES (gen_random_uuid(), '{payments}', 'gone-host', 1, '0.0.1', now() - interval '1 hour',
                     now() - interval '5 minutes')",
            &[],
        )
        .await
        .unwrap();
    let worker = support::Proc(
        Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
            .args(["--handler", "inventory", "--prefix", &topo.prefix])
            .args([
                "--database-url",
                &db_url,
                "--wait-time-secs",
                "1",
                "--heartbeat-secs",
                "1",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = worker.id() as i64;
    let status = support::wait_for(Duration::from_secs(30), "the worker's heartbeat", || {
        let (prefix, url) = (topo.prefix.clone(), db_url.clone());
        async move {
            let out = Command::new(env!("CARGO_BIN_EXE_orderfleet"))
                .args([
                    "status",
                    "--json",
                    "--prefix",
                    &prefix,
                    "--database-url",
                    &url,
                ])
                .env("RUST_LOG", "warn")
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
            let live = doc["workers"]
                .as_array()?
                .iter()
                .any(|w| w["pid"].as_i64() == Some(pid) && w["state"] == "live");
            live.then_some(doc)
        }
    })
    .await;

    let queues = status["queues"].as_array().unwrap();
    assert_eq!(queues.len(), HandlerName::ALL.len());
    let row = |h: &str| queues.iter().find(|q| q["handler"] == h).unwrap();
    let inventory = row("inventory");
    assert_eq!(inventory["queue"], topo.queue_name(HandlerName::Inventory));
    assert_eq!(inventory["dlq"], topo.dlq_name(HandlerName::Inventory));
    assert_eq!(inventory["dlq_depth"], 2);
    assert_eq!(row("orders")["visible"], 1);
    assert_eq!(row("orders")["dlq_depth"], 0);
    // moto has no move tasks and no CloudWatch SQS metrics: shown as unknown, not as zero.
    assert!(inventory["move_tasks"].is_null());
    assert!(inventory["oldest_age_secs"].is_null());

    let workers = status["workers"].as_array().unwrap();
    let me = workers
        .iter()
        .find(|w| w["pid"].as_i64() == Some(pid))
        .unwrap();
    assert_eq!(me["handlers"], serde_json::json!(["inventory"]));
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"));
    assert!(me["processed"].is_i64() && me["failed"].is_i64());
    let gone = workers.iter().find(|w| w["host"] == "gone-host").unwrap();
    assert_eq!(gone["state"], "stale");
    drop(worker);
}
