//! Observability of the real worker: EMF lines checked against the Embedded Metric Format
//! specification, the PutMetricData sink against the emulator's CloudWatch, and the
//! health check.

use std::collections::HashSet;
use std::io::Read;
use std::process::{Child, Command};
use std::time::Duration;

use orderfleet::domain::names::HandlerName;
use orderfleet::infra::aws::Clients;
use orderfleet::infra::topology::Topology;
use serde_json::Value;

use crate::support;
use crate::support::signal;

async fn wait_exit(child: &mut Child) -> i32 {
    support::wait_exit(child, Duration::from_secs(20))
        .await
        .code()
        .unwrap_or(-1)
}

async fn send_stock(clients: &Clients, topo: &Topology, n: usize) {
    let url =
        orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.queue_name(HandlerName::Inventory))
            .await
            .unwrap();
    let bodies: Vec<String> = (0..n).map(|_| support::stock_received("m", 1)).collect();
    support::send_bodies(clients, &url, &bodies).await;
}

async fn processed(db_url: &str) -> i64 {
    let pool = orderfleet::store::db::pool(db_url, 1).unwrap();
    let c = pool.get().await.unwrap();
    c.query_one("SELECT count(*) FROM processed_messages", &[])
        .await
        .unwrap()
        .get(0)
}

/// The units CloudWatch accepts in an EMF metric directive.
const UNITS: &[&str] = &[
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Count",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
    "None",
];

/// Checks one line against the EMF specification; returns the metric names it carries.
fn check_emf(line: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let aws = v["_aws"].as_object().expect("_aws object");
    let ts = aws["Timestamp"]
        .as_i64()
        .expect("_aws.Timestamp is an integer");
    let now = chrono::Utc::now().timestamp_millis();
    assert!(
        (now - ts).abs() < 3_600_000,
        "timestamp {ts} is not epoch milliseconds near now"
    );
    let directives = aws["CloudWatchMetrics"]
        .as_array()
        .expect("CloudWatchMetrics array");
    assert!(!directives.is_empty());
    let mut names = Vec::new();
    for d in directives {
        let ns = d["Namespace"].as_str().expect("Namespace");
        assert!(
            !ns.is_empty() && ns.len() <= 255 && !ns.starts_with("AWS/"),
            "namespace {ns}"
        );
        for set in d["Dimensions"].as_array().expect("Dimensions") {
            let set = set.as_array().expect("a dimension set is an array");
            assert!(set.len() <= 30, "more than 30 dimensions");
            for key in set {
                let key = key.as_str().expect("dimension key is a string");
                assert!(
                    v[key].is_string(),
                    "dimension {key} has no string value at the root"
                );
                assert!(!["message_id", "event_id", "receipt_handle"].contains(&key));
            }
        }
        let metrics = d["Metrics"].as_array().expect("Metrics");
        assert!(metrics.len() <= 100, "more than 100 metrics in a directive");
        for m in metrics {
            let name = m["Name"].as_str().expect("metric Name");
            assert!(!name.is_empty() && name.len() <= 255);
            if let Some(unit) = m.get("Unit") {
                assert!(UNITS.contains(&unit.as_str().unwrap()), "unit {unit}");
            }
            match &v[name] {
                Value::Number(_) => {}
                Value::Array(values) => {
                    assert!(
                        !values.is_empty() && values.len() <= 100,
                        "{name}: {} values",
                        values.len()
                    );
                    assert!(
                        values.iter().all(Value::is_number),
                        "{name} has a non-number"
                    );
                }
                other => panic!("metric {name} has no numeric value at the root: {other}"),
            }
            names.push(name.to_string());
        }
    }
    names
}

#[tokio::test]
async fn the_worker_writes_emf_lines_that_follow_the_specification() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (_pool, db_url) = support::fresh_db().await;
    send_stock(&clients, &topo, 5).await;
    let health = std::env::temp_dir().join(support::unique("h"));
    let mut child = support::inventory_worker(
        &topo,
        &db_url,
        &[
            "--metrics-interval-secs",
            "1",
            "--health-file",
            health.to_str().unwrap(),
        ],
    );
    support::wait_for(Duration::from_secs(20), "five messages handled", || async {
        (processed(&db_url).await == 5).then_some(())
    })
    .await;
    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child).await, 0);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(!lines.is_empty(), "no EMF output");
    let mut seen = HashSet::new();
    let mut succeeded = 0.0;
    for line in &lines {
        seen.extend(check_emf(line));
        let v: Value = serde_json::from_str(line).unwrap();
        if v["handler"] == "inventory" && v.get("outcome").is_none() {
            succeeded += v["MessagesSucceeded"].as_f64().unwrap();
        }
    }
    assert_eq!(succeeded, 5.0, "MessagesSucceeded over all intervals");
    for name in [
        "MessagesReceived",
        "MessagesSucceeded",
        "MessagesRetried",
        "MessagesDeadLettered",
        "MessagesDuplicate",
        "HandlerDurationMs",
        "MessageAgeMs",
        "ReceiveCount",
        "LeaseExtensions",
        "EmptyReceives",
        "InFlight",
        "OutboxLagMs",
        "Heartbeat",
        "Messages",
    ] {
        assert!(seen.contains(name), "no {name} metric in {seen:?}");
    }
}

#[tokio::test]
async fn the_putmetricdata_sink_lands_metrics_in_cloudwatch() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (_pool, db_url) = support::fresh_db().await;
    send_stock(&clients, &topo, 3).await;
    let health = std::env::temp_dir().join(support::unique("h"));
    let mut child = support::inventory_worker(
        &topo,
        &db_url,
        &[
            "--metrics-sink",
            "cloudwatch",
            "--health-file",
            health.to_str().unwrap(),
        ],
    );
    support::wait_for(
        Duration::from_secs(20),
        "three messages handled",
        || async { (processed(&db_url).await == 3).then_some(()) },
    )
    .await;
    // The interval is 60 s; the flush at shutdown sends this run's metrics in one call.
    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child).await, 0);
    let cw = aws_sdk_cloudwatch::Client::new(&orderfleet::infra::aws::sdk_config().await);
    let listed = cw
        .list_metrics()
        .namespace(orderfleet::telemetry::emf::NAMESPACE)
        .send()
        .await
        .unwrap();
    let have: HashSet<(String, Vec<(String, String)>)> = listed
        .metrics()
        .iter()
        .map(|m| {
            let mut dims: Vec<(String, String)> = m
                .dimensions()
                .iter()
                .map(|d| {
                    (
                        d.name().unwrap_or_default().into(),
                        d.value().unwrap_or_default().into(),
                    )
                })
                .collect();
            dims.sort();
            (m.metric_name().unwrap_or_default().to_string(), dims)
        })
        .collect();
    let inv = |k: &str| {
        (
            k.to_string(),
            vec![("handler".to_string(), "inventory".to_string())],
        )
    };
    for name in [
        "MessagesSucceeded",
        "HandlerDurationMs",
        "Heartbeat",
        "InFlight",
    ] {
        assert!(have.contains(&inv(name)), "{name} not listed: {have:?}");
    }
    assert!(have.contains(&(
        "Messages".to_string(),
        vec![
            ("handler".to_string(), "inventory".to_string()),
            ("outcome".to_string(), "succeeded".to_string())
        ]
    )));
}

#[tokio::test]
async fn the_health_check_fails_when_the_worker_is_wedged_and_passes_when_healthy() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (_pool, db_url) = support::fresh_db().await;
    let health = std::env::temp_dir().join(support::unique("h"));
    let health_arg = health.to_str().unwrap().to_string();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
            .args([
                "healthcheck",
                "--health-file",
                &health_arg,
                "--max-age-secs",
                "2",
            ])
            .output()
            .unwrap()
    };
    let mut child = support::inventory_worker(
        &topo,
        &db_url,
        &["--health-file", &health_arg, "--metrics-sink", "none"],
    );
    support::wait_for(Duration::from_secs(20), "a healthy report", || async {
        check().status.success().then_some(())
    })
    .await;
    // A stopped process is the purest wedge: alive, but its runtime makes no progress.
    signal(&child, "-STOP");
    let out = support::wait_for(Duration::from_secs(10), "an unhealthy report", || async {
        let out = check();
        (!out.status.success()).then_some(out)
    })
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wedged"));
    signal(&child, "-CONT");
    support::wait_for(Duration::from_secs(10), "healthy again", || async {
        check().status.success().then_some(())
    })
    .await;
    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child).await, 0);
    assert!(
        !check().status.success(),
        "a stopped worker must not look healthy"
    );
}
