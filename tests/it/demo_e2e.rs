//! `make demo` in miniature, through the real AWS path: the `orderfleet publish` binary puts a
//! catalogue and twenty orders on a moto EventBridge bus, rules route them to SQS, the real
//! `orderfleet-worker` runs the four saga handlers, and `orderfleet wait` and
//! `orderfleet report --json` judge the result.

use std::fs::File;
use std::process::{Command, Output, Stdio};

use crate::support;
use orderfleet::cli::simulator::{self, OrderKind, PlanConfig};
use serde_json::Value;

const ORDERS: usize = 20;
/// A seed whose twenty orders include regular ones and declined payments (which must end
/// cancelled); checked below, so a change to the simulator's mix cannot silently void the test.
const SEED: u64 = 5;

fn orderfleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(args)
        .env("RUST_LOG", "warn")
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

#[tokio::test]
async fn twenty_orders_through_the_bus_and_the_real_worker_settle_with_every_invariant_true() {
    let plan = simulator::plan_orders(
        &PlanConfig {
            orders: ORDERS,
            seed: SEED,
            run_id: "check".into(),
            regular_only: false,
        },
        &simulator::catalogue(simulator::DEFAULT_SKUS),
    )
    .unwrap();
    let kinds = plan.counts();
    assert!(kinds.contains_key(&OrderKind::Regular), "{kinds:?}");
    assert!(
        kinds.contains_key(&OrderKind::CardDeclined)
            || kinds.contains_key(&OrderKind::InsufficientFunds),
        "seed {SEED} plans no declined payment: {kinds:?}"
    );

    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (_pool, db_url) = support::fresh_db().await;
    let log_path = std::env::temp_dir().join(format!("{}-worker.log", topo.prefix));
    let log = File::create(&log_path).unwrap();
    let _worker = Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
        .args(["--handler", "orders,inventory,payments,fulfillment"])
        .args(["--prefix", &topo.prefix, "--database-url", &db_url])
        .args(["--sandbox-payment-database-url", &db_url])
        // Short polls and retries: the test should not wait on idle long polls or on the
        // backoff of the flaky payment token.
        .args(["--wait-time-secs", "1", "--retry-base-secs", "1"])
        .args(["--heartbeat-secs", "1", "--metrics-sink", "none"])
        .env("RUST_LOG", "warn")
        .env_remove("ORDERFLEET_HANDLERS")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(support::Proc)
        .expect("spawn orderfleet-worker");
    let worker_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let published = orderfleet(&[
        "publish",
        "--orders",
        &ORDERS.to_string(),
        "--seed",
        &SEED.to_string(),
        "--prefix",
        &topo.prefix,
        "--database-url",
        &db_url,
        "--json",
    ]);
    assert!(
        published.status.success(),
        "{}\n--- worker\n{}",
        describe("publish", &published),
        worker_log()
    );
    let summary: Value = serde_json::from_slice(&published.stdout).expect("publish --json");
    assert_eq!(summary["orders"], ORDERS);

    let waited = orderfleet(&[
        "wait",
        "--timeout-secs",
        "45",
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

    let reported = orderfleet(&["report", "--json", "--database-url", &db_url]);
    let report: Value = serde_json::from_slice(&reported.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", describe("report", &reported)));
    let invariants = report["invariants"].as_object().expect("invariants");
    assert!(invariants.len() >= 6, "{invariants:?}");
    let broken: Vec<&String> = invariants
        .iter()
        .filter(|(_, ok)| **ok != Value::Bool(true))
        .map(|(name, _)| name)
        .collect();
    assert!(
        broken.is_empty(),
        "broken invariants {broken:?}: {}",
        report["violations"]
    );
    assert!(
        reported.status.success(),
        "{}",
        describe("report", &reported)
    );

    let by_status = report["orders_by_status"].as_object().expect("by status");
    let total: i64 = by_status.values().filter_map(Value::as_i64).sum();
    assert_eq!(total, ORDERS as i64, "{by_status:?}");
    assert!(by_status["completed"].as_i64() >= Some(1), "{by_status:?}");
    assert!(by_status["cancelled"].as_i64() >= Some(1), "{by_status:?}");
    assert_eq!(report["orders_in_flight"], 0);
    // Nothing was dead-lettered on the way.
    for handler in orderfleet_testkit::inproc::SAGA {
        let dlq = orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.dlq_name(handler))
            .await
            .unwrap();
        assert_eq!(
            support::depth(&clients, &dlq).await,
            (0, 0),
            "{handler} DLQ"
        );
    }
}
