//! Test support shared by the integration tests: a fresh database per test, a unique
//! topology prefix per test in the local AWS emulator, and waiting on conditions.
//!
//! The tests need the local stack: run them with `make test`, or `make up` and
//! `eval "$(make -s env)"` first.

pub mod notifications;
pub mod platforms;
pub mod saga;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::handlers::{AnyHandler, Context, GroupState};
use orderfleet::runtime::group::execute_group;

use deadpool_postgres::Pool;
use orderfleet::infra::aws::Clients;
use orderfleet::infra::topology::Topology;
use orderfleet::runtime::backoff::RetryPolicy;
use orderfleet::runtime::ConsumerConfig;
use orderfleet::sqs::queue::QueueFacts;
use serde_json::Value;

/// The environment variable, or a panic that says how to get it.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with `make test`, or `make up` and `eval \"$(make -s env)\"`")
    })
}

/// A short unique name, safe for databases and queue names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A new, migrated database for this test. Returns its pool and URL.
pub async fn fresh_db() -> (Pool, String) {
    let base = env("DATABASE_URL");
    let name = unique("of_test_");
    let admin = orderfleet::store::db::pool(&base, 1).expect("pool");
    admin
        .get()
        .await
        .expect("connect to the local PostgreSQL (make up)")
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let url = match base.rfind('/') {
        Some(i) => format!("{}/{name}", &base[..i]),
        None => panic!("DATABASE_URL has no database name"),
    };
    let pool = orderfleet::store::db::pool(&url, 16).expect("pool");
    orderfleet::store::db::migrate(&pool)
        .await
        .expect("migrate");
    (pool, url)
}

pub async fn clients() -> Clients {
    env("AWS_ENDPOINT_URL");
    Clients::from_env().await
}

/// A provisioned topology whose every resource name is unique to this test, without the lake
/// (the emulator allows only 50 Firehose streams in all).
pub async fn topology(clients: &Clients) -> Topology {
    let mut topo = Topology::with_prefix(unique("t"));
    topo.lake = false;
    orderfleet::infra::provision::provision(clients, &topo)
        .await
        .expect("provision");
    topo
}

/// Like [`topology`], with the lake: an S3 bucket and a Firehose delivery stream.
pub async fn lake_topology(clients: &Clients) -> Topology {
    let topo = Topology::with_prefix(unique("t"));
    orderfleet::infra::provision::provision(clients, &topo)
        .await
        .expect("provision");
    topo
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An SQS body as an EventBridge rule would deliver it.
pub fn event_body(detail_type: &str, source: &str, detail: Value) -> String {
    serde_json::json!({
        "version": "0",
        "id": uuid::Uuid::new_v4().to_string(),
        "detail-type": detail_type,
        "source": source,
        "account": "123456789012",
        "time": chrono::Utc::now().to_rfc3339(),
        "region": "us-east-1",
        "resources": [],
        "detail": detail,
    })
    .to_string()
}

/// Counts of a queue: (visible, in flight).
pub async fn depth(clients: &Clients, queue_url: &str) -> (u64, u64) {
    use aws_sdk_sqs::types::QueueAttributeName as Q;
    let out = clients
        .sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(Q::ApproximateNumberOfMessages)
        .attribute_names(Q::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("queue attributes");
    let attrs = out.attributes().cloned().unwrap_or_default();
    let n = |k: Q| attrs.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
    (
        n(Q::ApproximateNumberOfMessages),
        n(Q::ApproximateNumberOfMessagesNotVisible),
    )
}

/// A spawned process that is killed if the test ends (or panics) while it still runs, so a
/// failing test never leaves a worker behind.
pub struct Proc(pub std::process::Child);

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// An OrderPlaced whose every one of `lines` lines is wrong three ways (unknown SKU, quantity
/// 0, negative price): the OrderRejected lists three reasons per line, several times the
/// order's own size.
pub fn invalid_order(order_id: &str, lines: usize) -> String {
    let lines: Vec<Value> = (0..lines)
        .map(|i| {
            serde_json::json!({"sku": format!("nope-{i:05}"), "quantity": 0,
                   "unit_price": {"amount_minor": -1, "currency": "EUR"}})
        })
        .collect();
    event_body(
        "OrderPlaced",
        "orderfleet.storefront",
        serde_json::json!({
            "event_id": format!("placed-{order_id}"),
            "order_id": order_id,
            "customer": {"id": "cus-1", "email": "ada@example.com", "name": "Ada"},
            "lines": lines,
            "shipping_address": {"name": "Ada", "line1": "1 Road", "city": "London",
                                 "postal_code": "N1", "country": "GB"},
            "payment_token": "tok",
            "placed_at": chrono::Utc::now().to_rfc3339(),
        }),
    )
}

/// An orders worker on `topo` polling for 1 s, with `extra` arguments and environment; its
/// stdout (the EMF lines) is piped.
pub fn orders_worker(topo: &Topology, db_url: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    std::process::Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
        .args(["--handler", "orders", "--prefix", &topo.prefix])
        .args(["--database-url", db_url, "--wait-time-secs", "1"])
        .args(["--heartbeat-secs", "1"])
        .args(extra)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Proc)
        .expect("spawn orderfleet-worker")
}

/// The bodies of one receive of up to ten messages from `queue_url` (1 s long poll; none on
/// an error). The messages stay in flight.
pub async fn receive_bodies(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> Vec<String> {
    match sqs
        .receive_message()
        .queue_url(queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .send()
        .await
    {
        Ok(out) => out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| m.body)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Spawns the real `orderfleet-worker` running the inventory handler on `topo` and `db_url`,
/// polling briefly so it stops fast; `extra` adds flags. Stdout is piped (EMF lines).
pub fn inventory_worker(topo: &Topology, db_url: &str, extra: &[&str]) -> Proc {
    inventory_worker_polling(topo, db_url, 1, extra)
}

/// [`inventory_worker`] with long polls of `wait_secs` (a production worker waits 20 s).
pub fn inventory_worker_polling(
    topo: &Topology,
    db_url: &str,
    wait_secs: u32,
    extra: &[&str],
) -> Proc {
    std::process::Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
        .args(["--handler", "inventory", "--prefix", &topo.prefix])
        .args(["--database-url", db_url])
        .args(["--wait-time-secs", &wait_secs.to_string()])
        .args(["--heartbeat-secs", "1"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Proc)
        .expect("spawn orderfleet-worker")
}

/// Sends `sig` (e.g. "-TERM") to the process.
pub fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

/// Waits for the process to exit, at most `timeout`.
pub async fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> std::process::ExitStatus {
    wait_for(timeout, "the process to exit", || {
        let status = child.try_wait().expect("try_wait");
        async move { status }
    })
    .await
}

/// A StockReceived event body for `sku`, with an `event_id` of its own.
pub fn stock_received(sku: &str, quantity: i64) -> String {
    event_body(
        "StockReceived",
        "orderfleet.storefront",
        serde_json::json!({"sku": sku, "quantity": quantity, "event_id": unique("stock-")}),
    )
}

/// Sends `bodies` to the queue in batches of ten, failing the test on any failed entry.
pub async fn send_bodies(clients: &Clients, queue_url: &str, bodies: &[String]) {
    use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
    for chunk in bodies.chunks(10) {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, b)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(b)
                    .build()
                    .expect("entry")
            })
            .collect();
        let out = clients
            .sqs
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .expect("SendMessageBatch");
        assert!(
            out.failed().is_empty(),
            "failed entries: {:?}",
            out.failed()
        );
    }
}

/// Consumer settings for a test on the queue `facts` describes: 8 handlers at once, one receive
/// loop, 1 s polls, quick deletes, the queue's own visibility timeout and receive limit.
pub fn consumer_config(facts: &QueueFacts) -> ConsumerConfig {
    ConsumerConfig {
        queue_url: facts.queue_url.clone(),
        dlq_url: facts.dlq_url.clone(),
        concurrency: 8,
        receivers: 1,
        wait_time_secs: 1,
        visibility_timeout: facts.visibility_timeout,
        handler_timeout: Duration::from_secs(20),
        retry: RetryPolicy::default(),
        max_receive_count: facts.max_receive_count,
        delete_flush: Duration::from_millis(5),
        receive_linger: Duration::ZERO,
        shutdown_grace: Duration::from_secs(10),
        max_event_age: None,
    }
}

/// The in-memory benchmark SQS endpoint ([`orderfleet_bench::sqs`]) on an ephemeral port, for
/// one test: a client for it, its state (request counts per action, queue counts) and the
/// server task. Unlike the emulator it counts requests, and it keeps SQS's rule that only a
/// message's newest receipt handle can delete it or change its visibility.
pub async fn bench_sqs() -> (
    aws_sdk_sqs::Client,
    orderfleet_bench::sqs::BenchSqs,
    tokio::task::JoinHandle<()>,
) {
    let (addr, state, server) = orderfleet_bench::sqs::spawn_local(0)
        .await
        .expect("start the benchmark SQS endpoint");
    let client = orderfleet_bench::sqs::sqs_client(&format!("http://{addr}"));
    (client, state, server)
}

/// Creates the queue `name` with default attributes; returns its URL.
pub async fn create_queue(sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    sqs.create_queue()
        .queue_name(name)
        .send()
        .await
        .expect("CreateQueue")
        .queue_url()
        .expect("queue URL")
        .to_string()
}

/// The single bigint a query returns, e.g. a `count(*)`.
pub async fn scalar(pool: &Pool, sql: &str) -> i64 {
    pool.get()
        .await
        .expect("database pool")
        .query_one(sql, &[])
        .await
        .expect("query")
        .get(0)
}

/// Each event with the receive count it is handled under, as [`orderfleet::runtime::group::execute_group`] takes them.
pub fn refs(
    events: &[orderfleet::domain::envelope::Envelope],
    receive_count: u32,
) -> Vec<(&orderfleet::domain::envelope::Envelope, u32)> {
    events.iter().map(|e| (e, receive_count)).collect()
}

/// Whether a handler's answer is "applied".
pub fn applied(
    r: &Result<orderfleet::runtime::Executed, orderfleet::domain::outcome::HandlerError>,
) -> bool {
    matches!(r, Ok(orderfleet::runtime::Executed::Applied { .. }))
}

/// A handler whose groups all wait for each other before taking their locks, so that they
/// really contend instead of running one after the other.
pub struct AtOnce {
    pub inner: Arc<dyn AnyHandler>,
    pub barrier: tokio::sync::Barrier,
}

#[async_trait]
impl AnyHandler for AtOnce {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn source(&self) -> String {
        self.inner.source()
    }
    fn group_commit(&self) -> bool {
        true
    }
    async fn lock_group(
        &self,
        tx: &orderfleet::store::db::Tx,
        events: &[&Envelope],
        state: &mut GroupState,
    ) -> Result<(), HandlerError> {
        // Bounded, so that a group run a second time cannot hang the test.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.barrier.wait()).await;
        self.inner.lock_group(tx, events, state).await
    }
    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, GroupState>,
    ) -> Result<(), HandlerError> {
        self.inner.handle(event, cx).await
    }
    async fn finish(
        &self,
        tx: &orderfleet::store::db::Tx,
        state: GroupState,
    ) -> Result<(), HandlerError> {
        self.inner.finish(tx, state).await
    }
}

/// Runs `events` with `handler` in groups of `size`, all at once: each group waits for the
/// others at a barrier before it locks. Asserts that every group committed whole (no deadlock,
/// no fallback) and applied every event.
pub async fn groups_at_once(
    handler: Arc<dyn AnyHandler>,
    pool: &deadpool_postgres::Pool,
    events: &[Envelope],
    size: usize,
) {
    let handler: Arc<dyn AnyHandler> = Arc::new(AtOnce {
        inner: handler,
        barrier: tokio::sync::Barrier::new(events.len().div_ceil(size)),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in events.chunks(size) {
        let (handler, pool, chunk) = (handler.clone(), pool.clone(), chunk.to_vec());
        tasks.spawn(async move { execute_group(&*handler, &pool, &refs(&chunk, 1)).await });
    }
    while let Some(done) = tasks.join_next().await {
        let outcome = done.unwrap();
        assert_eq!(
            outcome.transactions, 1,
            "the group fell apart: {:?}",
            outcome.results
        );
        assert!(outcome.results.iter().all(applied));
    }
}

/// One consumer applying through a group commit that shares its counters, as the worker builds
/// it (`GroupCommit::counting_into`), with its lease task.
pub struct GroupedConsumer {
    pub counters: std::sync::Arc<orderfleet::telemetry::metrics::Counters>,
    pub group: orderfleet::runtime::group::GroupCommit,
    /// Cancelled when the consumer is told to stop.
    pub stop: tokio_util::sync::CancellationToken,
    background: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl GroupedConsumer {
    pub fn start(
        clients: &orderfleet::infra::aws::Clients,
        pool: &Pool,
        handler: std::sync::Arc<dyn orderfleet::handlers::AnyHandler>,
        cfg: orderfleet::runtime::ConsumerConfig,
        group: orderfleet::runtime::group::GroupConfig,
    ) -> Self {
        let counters = std::sync::Arc::new(orderfleet::telemetry::metrics::Counters::default());
        let group = orderfleet::runtime::group::GroupCommit::counting_into(
            handler,
            pool.clone(),
            group,
            counters.clone(),
        );
        Self::run(clients, group, counters, cfg)
    }

    /// A consumer counting into `counters` and applying through `group`, however that was
    /// built (one made with `GroupCommit::new` keeps its own counters and a fixed group cap).
    pub fn run(
        clients: &orderfleet::infra::aws::Clients,
        group: orderfleet::runtime::group::GroupCommit,
        counters: std::sync::Arc<orderfleet::telemetry::metrics::Counters>,
        cfg: orderfleet::runtime::ConsumerConfig,
    ) -> Self {
        use orderfleet::runtime::{self, lease::Leases, Consumer};
        use std::sync::Arc;
        let leases = Leases::default();
        let background = tokio_util::sync::CancellationToken::new();
        tokio::spawn(leases.clone().run(
            clients.sqs.clone(),
            runtime::LEASE_TICK,
            background.clone(),
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let consumer = Consumer {
            cfg,
            sqs: clients.sqs.clone(),
            handler: Arc::new(group.clone()),
            leases,
            counters: counters.clone(),
            relay_wake: None,
        };
        let task = tokio::spawn(consumer.run(stop.clone()));
        GroupedConsumer {
            counters,
            group,
            stop,
            background,
            task,
        }
    }

    /// Messages handled so far, applied or recognised as duplicates.
    pub fn handled_count(&self) -> u64 {
        let s = self.counters.snapshot();
        s.succeeded + s.duplicates
    }

    /// Waits until `n` messages are handled.
    pub async fn handled(&self, n: u64, within: Duration) {
        wait_for(within, &format!("{n} messages handled"), || {
            let done = self.handled_count() >= n;
            async move { done.then_some(()) }
        })
        .await;
    }

    /// Stops as a worker does, then the lease task.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.expect("join").expect("consumer");
        self.background.cancel();
    }
}
