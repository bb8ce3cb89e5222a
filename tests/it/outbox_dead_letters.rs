//! An outbox row EventBridge will never accept: the relay moves it to the outbox dead-letter
//! table with the reason and goes on publishing; the metric, `orderfleet status` and
//! `orderfleet report` show it.

use std::io::Read;
use std::process::Command;
use std::time::Duration;

use crate::support;
use orderfleet::domain::names::HandlerName;
use orderfleet::infra::aws::Clients;
use orderfleet::infra::topology::Topology;
use serde_json::Value;

async fn queue(clients: &Clients, topo: &Topology, h: HandlerName) -> String {
    orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.queue_name(h))
        .await
        .unwrap()
}

fn orderfleet(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(args)
        .output()
        .expect("run orderfleet");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "orderfleet {args:?} printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test]
async fn an_order_rejection_too_big_for_eventbridge_is_dead_lettered_and_later_events_still_flow() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, db_url) = support::fresh_db().await;
    let orders_q = queue(&clients, &topo, HandlerName::Orders).await;
    let analytics_q = queue(&clients, &topo, HandlerName::Analytics).await;

    // About 110 KB in, well within an SQS message; its rejection is over 256 KB.
    let big = support::invalid_order("o-big", 1200);
    assert!(
        big.len() < 200 * 1024,
        "the order itself is {} bytes",
        big.len()
    );
    support::send_bodies(&clients, &orders_q, &[big]).await;
    let mut child = support::orders_worker(&topo, &db_url, &["--metrics-interval-secs", "1"], &[]);

    let reason: String = support::wait_for(
        Duration::from_secs(30),
        "the oversize OrderRejected in the outbox dead letters",
        || {
            let pool = pool.clone();
            async move {
                let c = pool.get().await.ok()?;
                let row = c
                    .query_opt(
                        "SELECT reason FROM outbox_dead_letters
                          WHERE detail_type = 'OrderRejected' AND detail->>'order_id' = 'o-big'",
                        &[],
                    )
                    .await
                    .ok()??;
                Some(row.get(0))
            }
        },
    )
    .await;
    assert!(reason.contains("at most 262144"), "reason: {reason}");
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM outbox").await,
        0,
        "the row left the outbox"
    );

    // The relay goes on: a later (small) rejection reaches analytics promptly.
    support::send_bodies(&clients, &orders_q, &[support::invalid_order("o-small", 1)]).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    support::wait_for(
        Duration::from_secs(10),
        "the small OrderRejected on the analytics queue",
        || {
            let (sqs, q) = (clients.sqs.clone(), analytics_q.clone());
            let seen = seen.clone();
            async move {
                let bodies = support::receive_bodies(&sqs, &q).await;
                let mut seen = seen.lock().unwrap();
                for body in bodies {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    seen.push(v["detail"]["order_id"].as_str().unwrap_or("").to_string());
                }
                seen.iter().any(|o| o == "o-small").then_some(())
            }
        },
    )
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|o| o == "o-big"),
        "the big one was published"
    );

    let status = orderfleet(&[
        "status",
        "--json",
        "--prefix",
        &topo.prefix,
        "--database-url",
        &db_url,
    ]);
    assert_eq!(status["outbox"]["dead_letters"], 1, "status: {status}");
    let report = orderfleet(&["report", "--json", "--database-url", &db_url]);
    assert_eq!(report["outbox_dead_letters"], 1, "report: {report}");

    support::signal(&child, "-TERM");
    assert_eq!(
        support::wait_exit(&mut child, Duration::from_secs(20))
            .await
            .code(),
        Some(0)
    );
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let gauge = out
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["OutboxDeadLetters"].as_f64());
    assert_eq!(gauge, Some(1.0), "the OutboxDeadLetters metric");
}
