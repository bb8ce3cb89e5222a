//! The real `orderfleet-worker --handler notifications` against the local stack, with no email
//! settings at all: it must use the file transport and the templates built into the binary
//! (its working directory has no `templates/email`), write the `.eml` under `.local/outbox`,
//! and never log the customer's address.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support;
use crate::support::notifications::*;
use orderfleet::domain::names::HandlerName;

#[tokio::test]
async fn orderfleet_worker_runs_notifications_with_the_file_outbox_by_default() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, url) = support::fresh_db().await;
    let cwd = TempDir::new("of-worker-");
    let log = std::fs::File::create(cwd.path().join("worker.log")).unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"));
    worker
        .current_dir(cwd.path())
        .args(["--handler", "notifications", "--prefix", &topo.prefix])
        .args(["--database-url", &url, "--wait-time-secs", "1"])
        .args([
            "--health-file",
            &cwd.path().join("health").to_string_lossy(),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
    for (name, _) in std::env::vars() {
        if name.starts_with("ORDERFLEET_EMAIL_") || name.starts_with("ORDERFLEET_SMTP_") {
            worker.env_remove(name);
        }
    }
    let worker = support::Proc(worker.spawn().expect("spawn orderfleet-worker"));

    let order_id = support::unique("ord-w-");
    let detail = serde_json::to_value(accepted(&order_id, "ada@example.com")).unwrap();
    let queue = orderfleet::sqs::queue::queue_url(
        &clients.sqs,
        &topo.queue_name(HandlerName::Notifications),
    )
    .await
    .unwrap();
    clients
        .sqs
        .send_message()
        .queue_url(&queue)
        .message_body(support::event_body(
            "OrderAccepted",
            "orderfleet.orders",
            detail,
        ))
        .send()
        .await
        .unwrap();

    let eml = cwd
        .path()
        .join(".local/outbox")
        .join(format!("{order_id}.confirmation.eml"));
    let raw = support::wait_for(Duration::from_secs(60), "the confirmation .eml", || {
        let found = std::fs::read(&eml).ok();
        async move { found }
    })
    .await;
    let parsed = assert_well_formed(&raw, "ada@example.com");
    assert_eq!(
        parsed.header("Subject").unwrap(),
        format!("Your order {order_id} is confirmed")
    );
    let rows = support::wait_for(Duration::from_secs(10), "the emails row", || {
        let pool = pool.clone();
        async move {
            let rows = emails(&pool).await;
            (!rows.is_empty()).then_some(rows)
        }
    })
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].status.as_str(), rows[0].transport.as_str()),
        ("sent", "file")
    );

    drop(worker);
    let log = std::fs::read_to_string(cwd.path().join("worker.log")).unwrap();
    assert!(log.contains("email sent"), "{log}");
    assert!(log.contains("a***@example.com"), "{log}");
    assert!(log.contains("built-in"), "templates from the binary: {log}");
    assert!(
        !log.contains("ada@example.com"),
        "the address appears in full in the log: {log}"
    );
}
