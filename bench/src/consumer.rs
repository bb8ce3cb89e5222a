//! `make bench`: the consumer runtime measured against the in-memory SQS endpoint
//! ([`crate::sqs`]), which runs as a separate process so that the figures (and the RSS)
//! are the consumer's alone.
//!
//! Two phases:
//! - throughput: a preloaded queue drained by the real [`Consumer`] with a no-op handler,
//!   giving messages per second and SQS requests per message;
//! - latency: messages sent one at a time at low rate to an idle, long-polling consumer,
//!   giving p50/p99 from the moment a message is sent (visible) to its handler starting.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::runtime::backoff::RetryPolicy;
use orderfleet::runtime::lease::Leases;
use orderfleet::runtime::{Apply, Consumer, ConsumerConfig, Executed};
use orderfleet::telemetry::metrics::Counters;

/// Settings of one benchmark run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub messages: usize,
    pub concurrency: usize,
    pub receivers: usize,
    pub latency_messages: usize,
    pub latency_interval: Duration,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub messages: usize,
    pub elapsed_secs: f64,
    pub msgs_per_sec: f64,
    pub sqs_requests: u64,
    pub sqs_requests_per_msg: f64,
    pub requests_by_operation: Value,
    pub rss_mb: f64,
    pub p50_visible_to_start_ms: f64,
    pub p99_visible_to_start_ms: f64,
}

/// A handler that does nothing but count, and for the latency phase record how long each
/// message took from its send to this call.
struct Noop {
    handled: AtomicU64,
    target: u64,
    done: Notify,
    latencies_us: Mutex<Vec<u64>>,
    epoch: Instant,
}

#[async_trait::async_trait]
impl Apply for Noop {
    fn name(&self) -> &str {
        "bench"
    }
    async fn apply(&self, event: &Arc<Envelope>, _: u32) -> Result<Executed, HandlerError> {
        if let Some(sent) = event.detail.get("sent_us").and_then(Value::as_u64) {
            let now = self.epoch.elapsed().as_micros() as u64;
            let mut l = self.latencies_us.lock().unwrap_or_else(|p| p.into_inner());
            l.push(now.saturating_sub(sent));
        }
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
        Ok(Executed::Applied { emitted: 0 })
    }
}

/// The bench SQS endpoint, running as a child process.
pub struct Endpoint {
    child: tokio::process::Child,
    pub url: String,
}

impl Endpoint {
    /// Starts `orderfleet-bench-sqs` (next to the current executable) on a free port, with
    /// `preload` messages of `body` in queue `queue`.
    pub async fn start(exe_dir: &Path, queue: &str, preload: usize, body: &str) -> Result<Self> {
        let exe = exe_dir.join("orderfleet-bench-sqs");
        let mut child = tokio::process::Command::new(&exe)
            .args(["--port", "0", "--preload-queue", queue])
            .args(["--preload-count", &preload.max(1).to_string()])
            .args(["--preload-body", body])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with `cargo build --release --bins`)",
                    exe.display()
                )
            })?;
        let stderr = child.stderr.take().context("bench-sqs stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(i) = line.find("listening on ") {
                    return Ok(line[i + "listening on ".len()..].trim().to_string());
                }
            }
            bail!("orderfleet-bench-sqs exited before listening")
        })
        .await
        .context("waiting for orderfleet-bench-sqs")??;
        // Keep draining its stderr so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Endpoint { child, url })
    }

    /// Calls one of the endpoint's own operations (`OrderfleetBench.Stats` / `.Reset`).
    pub async fn call(&self, target: &str) -> Result<Value> {
        let addr = self.url.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let req = format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nX-Amz-Target: {target}\r\n\
             Content-Type: application/x-amz-json-1.0\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        stream.read_to_end(&mut resp).await?;
        let text = String::from_utf8_lossy(&resp);
        let body = text.split("\r\n\r\n").nth(1).context("no HTTP body")?;
        serde_json::from_str(body).with_context(|| format!("{target} answered {body}"))
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// An EventBridge envelope as the bench sends it; `detail` is merged in.
pub fn bench_body(detail: Value) -> String {
    json!({
        "version": "0", "id": "bench-{i}", "detail-type": "StockReceived",
        "source": "orderfleet.storefront", "account": "000000000000",
        "time": "2026-01-01T00:00:00Z", "region": "us-east-1", "resources": [],
        "detail": detail,
    })
    .to_string()
}

fn consumer(sqs: &aws_sdk_sqs::Client, url: &str, cfg: &BenchConfig, apply: Arc<Noop>) -> Consumer {
    Consumer {
        cfg: ConsumerConfig {
            queue_url: url.to_string(),
            dlq_url: url.to_string(),
            concurrency: cfg.concurrency,
            receivers: cfg.receivers,
            wait_time_secs: 20,
            visibility_timeout: Duration::from_secs(120),
            handler_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            max_receive_count: 5,
            delete_flush: Duration::from_millis(5),
            receive_linger: Duration::ZERO,
            shutdown_grace: Duration::from_secs(10),
            max_event_age: None,
        },
        sqs: sqs.clone(),
        handler: apply,
        leases: Leases::default(),
        counters: Arc::new(Counters::default()),
        relay_wake: None,
    }
}

/// Peak resident set size of this process, in MiB (VmHWM).
pub fn peak_rss_mb() -> f64 {
    crate::fleet::peak_rss_mb(std::process::id())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs both phases. `progress` receives human-readable lines.
pub async fn run(
    exe_dir: &Path,
    cfg: &BenchConfig,
    progress: impl Fn(String),
) -> Result<BenchReport> {
    let epoch = Instant::now();
    let body = bench_body(json!({"sku": "bench-{i}", "quantity": 1}));
    let endpoint = Endpoint::start(exe_dir, "bench", cfg.messages, &body).await?;
    let queue_url = format!("{}/000000000000/bench", endpoint.url);
    let sqs = crate::sqs::sqs_client(&endpoint.url);
    progress(format!(
        "bench-sqs at {}; {} messages preloaded",
        endpoint.url, cfg.messages
    ));

    // Phase 1: throughput.
    endpoint.call("OrderfleetBench.Reset").await?;
    let noop = Arc::new(Noop {
        handled: AtomicU64::new(0),
        target: cfg.messages as u64,
        done: Notify::new(),
        latencies_us: Mutex::new(Vec::new()),
        epoch,
    });
    let stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(consumer(&sqs, &queue_url, cfg, noop.clone()).run(stop.clone()));
    let ticker = {
        let noop = noop.clone();
        let stop = stop.clone();
        let total = cfg.messages;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let n = noop.handled.load(Ordering::Relaxed);
                eprintln!("  {n}/{total} handled");
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(600), noop.done.notified())
        .await
        .context("the consumer did not drain the queue within 10 minutes")?;
    let elapsed = started.elapsed().as_secs_f64();
    stop.cancel();
    task.await??;
    let _ = ticker.await;
    let stats = endpoint.call("OrderfleetBench.Stats").await?;
    let requests = stats["total"].as_u64().unwrap_or(0);
    let msgs_per_sec = cfg.messages as f64 / elapsed;
    progress(format!(
        "throughput: {} messages in {elapsed:.2}s = {msgs_per_sec:.0} msgs/s, {requests} SQS requests",
        cfg.messages
    ));

    // Phase 2: latency at low load, on an idle long-polling consumer.
    let latency_url = format!("{}/000000000000/bench-latency", endpoint.url);
    sqs.create_queue()
        .queue_name("bench-latency")
        .send()
        .await?;
    let lat = Arc::new(Noop {
        handled: AtomicU64::new(0),
        target: cfg.latency_messages as u64,
        done: Notify::new(),
        latencies_us: Mutex::new(Vec::new()),
        epoch,
    });
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer(&sqs, &latency_url, cfg, lat.clone()).run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..cfg.latency_messages {
        let sent_us = epoch.elapsed().as_micros() as u64;
        let body =
            bench_body(json!({"sku": format!("lat-{i}"), "quantity": 1, "sent_us": sent_us}));
        sqs.send_message()
            .queue_url(&latency_url)
            .message_body(body)
            .send()
            .await?;
        tokio::time::sleep(cfg.latency_interval).await;
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while lat.handled.load(Ordering::Relaxed) < cfg.latency_messages as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("latency messages were not all handled")?;
    stop.cancel();
    task.await??;
    let mut l = lat
        .latencies_us
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    l.sort_unstable();
    endpoint.stop().await;

    Ok(BenchReport {
        messages: cfg.messages,
        elapsed_secs: elapsed,
        msgs_per_sec,
        sqs_requests: requests,
        sqs_requests_per_msg: requests as f64 / cfg.messages as f64,
        requests_by_operation: stats["requests"].clone(),
        rss_mb: peak_rss_mb(),
        p50_visible_to_start_ms: percentile(&l, 0.50),
        p99_visible_to_start_ms: percentile(&l, 0.99),
    })
}
