//! The fleet benchmark (`make bench-fleet`): complete orders per second through the deployed
//! shape, with real processes.
//!
//! What runs, each as its own process:
//! - `orderfleet-bench-sqs`, the in-memory endpoint, serving SQS and EventBridge (rules matched
//!   as EventBridge matches them, matched events delivered into its queues in the EventBridge
//!   envelope). The workers and `orderfleet provision` reach it through the SDK's
//!   service-specific endpoint variables (`AWS_ENDPOINT_URL_SQS`, `AWS_ENDPOINT_URL_EVENTBRIDGE`);
//!   S3 and Firehose (the lake) stay on the local emulator (`AWS_ENDPOINT_URL`).
//! - PostgreSQL, with a scratch database (`orderfleet_fleet_<id>`, migrated by `orderfleet
//!   migrate`, dropped afterwards).
//! - N `orderfleet-worker` processes with their default settings: every `ORDERFLEET_*`
//!   variable of the caller is removed and `RUST_LOG` too, so they log JSON at their default
//!   level and write EMF metric lines, as in production. Default split: one process per saga
//!   handler, plus one for the rest.
//!
//! The driver seeds the catalogue (`orderfleet seed`), then runs two phases on the same fleet:
//! 1. throughput: M orders put on the bus as fast as PutEvents takes them;
//! 2. latency: orders at a fixed offered rate (default: half the first phase's rate), for
//!    placed-to-completed percentiles.
//!
//! Each phase waits until every order is completed and every queue is empty, then reads:
//! the endpoint's request counters, PostgreSQL's transaction count for the scratch database,
//! the CPU time of the workers, of PostgreSQL (the postmaster and its children) and of the
//! endpoint from `/proc`, the bytes each worker wrote to stdout and stderr (what CloudWatch
//! Logs would ingest), and what the analytics worker shipped to Firehose. Every run ends with
//! `orderfleet report`, whose invariants must hold.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use deadpool_postgres::Pool;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use orderfleet::cli::simulator::{self, PlanConfig, StorefrontEvent};
use orderfleet::domain::names::HandlerName;

use crate::cost::{Bill, Usage};
use crate::saga::{transactions, with_scratch_database};

/// The saga handlers, each in a process of its own by default.
pub const SAGA: [HandlerName; 4] = [
    HandlerName::Orders,
    HandlerName::Inventory,
    HandlerName::Payments,
    HandlerName::Fulfillment,
];

/// One process per saga handler, plus one for every other handler.
pub fn default_split() -> Vec<Vec<HandlerName>> {
    let mut split: Vec<Vec<HandlerName>> = SAGA.iter().map(|h| vec![*h]).collect();
    split.push(
        HandlerName::ALL
            .into_iter()
            .filter(|h| !SAGA.contains(h))
            .collect(),
    );
    split
}

/// Settings of one fleet benchmark.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Admin connection; the scratch database is created next to it.
    pub database_url: String,
    /// Where `orderfleet`, `orderfleet-worker` and `orderfleet-bench-sqs` are.
    pub bin_dir: PathBuf,
    /// Orders put through the fleet before anything is measured, after which the tables are
    /// analysed.
    pub warmup_orders: usize,
    /// Orders of the throughput phase.
    pub orders: usize,
    /// Orders of the latency phase (0 skips it).
    pub latency_orders: usize,
    /// Offered rate of the latency phase; default: half the throughput phase's rate.
    pub latency_rate: Option<f64>,
    /// Handlers of each worker process.
    pub split: Vec<Vec<HandlerName>>,
    /// Extra environment for every worker (`--worker-env K=V`), e.g. to compare settings.
    pub worker_env: Vec<(String, String)>,
    /// Resource prefix (queues, bus, lake stream).
    pub prefix: String,
    pub keep_database: bool,
    /// A directory to write each worker's output to (`worker-<i>-<handlers>.log`).
    pub worker_logs: Option<PathBuf>,
    /// The lake's emulator (S3 and Firehose), for its CPU time.
    pub lake_emulator_pid: Option<u32>,
    /// Longest a phase may take before the run fails.
    pub phase_timeout: Duration,
    /// Every PutEvents waits this long at the endpoint (its `--put-events-delay-ms`): a real
    /// region's round trip, which loopback does not have.
    pub put_events_delay_ms: u64,
    /// Where the run's scratch directory goes (the system's temporary directory when `None`).
    pub scratch_parent: Option<PathBuf>,
    /// Products in the catalogue (`orderfleet seed --skus`); orders draw their lines from it.
    pub skus: usize,
}

/// The figures of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: &'static str,
    pub orders: usize,
    /// Orders per second offered; `None`: as fast as PutEvents takes them.
    pub offered_orders_per_sec: Option<f64>,
    /// From the first order put on the bus to the last order completed.
    pub elapsed_secs: f64,
    pub complete_orders_per_sec: f64,
    /// Placed (put on the bus) to completed (the order row's `terminal_at`).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub sqs_requests: u64,
    pub sqs_requests_per_order: f64,
    /// Messages the fleet's queues received (EventBridge deliveries), and SQS requests per one.
    pub messages_handled: u64,
    /// Messages in the DLQs at the end (none in a healthy run).
    pub dead_lettered: u64,
    pub sqs_requests_per_message: f64,
    pub sqs_requests_by_operation: HashMap<String, u64>,
    pub eventbridge_entries: u64,
    pub eventbridge_entries_per_order: f64,
    /// Events the orders put on the bus (the storefront's plus the fleet's outboxes), and
    /// PutEvents entries per one (above 1.0 only when the relay sent entries again).
    pub events_emitted: u64,
    pub eventbridge_entries_per_emitted_event: f64,
    pub db_transactions_per_order: f64,
    /// Rows inserted, updated or deleted, and WAL written, per order: the write volume a
    /// database instance must sustain.
    pub db_rows_written_per_order: f64,
    /// Statements per order (pg_stat_statements; absent when it is not loaded).
    pub db_statements_per_order: Option<f64>,
    pub wal_bytes_per_order: f64,
    pub cpu_secs_per_order: CpuSplit,
    pub log_bytes_per_order: f64,
    pub emf_bytes_per_order: f64,
    pub usage_per_order: Usage,
    pub usd_per_1000_orders: f64,
    pub largest_cost: String,
    pub bill_per_1000_orders: Bill,
}

/// CPU seconds per order, by process kind.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuSplit {
    pub workers: f64,
    pub postgres: f64,
    pub endpoint: f64,
    /// The lake's emulator (moto, for S3 and Firehose), when its pid was given.
    pub lake_emulator: f64,
}

/// What one worker process did during the whole run.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerReport {
    pub handlers: String,
    pub peak_rss_mb: f64,
    /// CPU seconds over the whole run (set-up and every phase).
    pub cpu_secs: f64,
    pub log_bytes: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub processes: usize,
    /// What the endpoint added to every PutEvents (`--put-events-delay-ms`).
    pub put_events_delay_ms: u64,
    pub throughput: PhaseReport,
    pub latency: Option<PhaseReport>,
    pub workers: Vec<WorkerReport>,
}

impl FleetReport {
    /// The one-line summary `make bench-fleet` ends with.
    pub fn summary(&self) -> Value {
        let t = &self.throughput;
        let (lat, offered) = match &self.latency {
            Some(l) => (l, l.offered_orders_per_sec),
            None => (t, None),
        };
        let round = |x: f64, places: i32| {
            let f = 10f64.powi(places);
            (x * f).round() / f
        };
        let mut summary = json!({
            "processes": self.processes,
            "orders": t.orders,
            "complete_orders_per_sec": round(t.complete_orders_per_sec, 1),
            "p50_ms": round(lat.p50_ms, 1),
            "p99_ms": round(lat.p99_ms, 1),
            "latency_offered_orders_per_sec": offered.map(|r| round(r, 1)),
            "sqs_requests_per_order": round(t.sqs_requests_per_order, 3),
            "sqs_requests_per_message": round(t.sqs_requests_per_message, 3),
            "eventbridge_entries_per_order": round(t.eventbridge_entries_per_order, 3),
            "eventbridge_entries_per_emitted_event": round(t.eventbridge_entries_per_emitted_event, 3),
            "db_transactions_per_order": round(t.db_transactions_per_order, 2),
            "db_rows_written_per_order": round(t.db_rows_written_per_order, 1),
            "db_statements_per_order": t.db_statements_per_order.map(|x| round(x, 1)),
            "wal_bytes_per_order": round(t.wal_bytes_per_order, 0),
            "rss_mb": round(self.workers.iter().map(|w| w.peak_rss_mb).fold(0.0, f64::max), 1),
            "cpu_secs_per_order": {
                "workers": round(t.cpu_secs_per_order.workers, 6),
                "postgres": round(t.cpu_secs_per_order.postgres, 6),
                "endpoint": round(t.cpu_secs_per_order.endpoint, 6),
                "lake_emulator": round(t.cpu_secs_per_order.lake_emulator, 6),
            },
            "log_bytes_per_order": round(t.log_bytes_per_order, 0),
            "usd_per_1000_orders": round(t.usd_per_1000_orders, 5),
            "largest_cost": t.largest_cost,
        });
        // Only when set, so that the figures of runs without it read as before.
        if self.put_events_delay_ms > 0 {
            summary["put_events_delay_ms"] = json!(self.put_events_delay_ms);
        }
        summary
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// Bytes a process wrote to stdout and stderr, and its last lines (for errors).
#[derive(Debug, Default)]
struct Output {
    bytes: AtomicU64,
    emf_bytes: AtomicU64,
    tail: Mutex<std::collections::VecDeque<String>>,
    /// Every line, when the run keeps the workers' logs (`--worker-logs`).
    file: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
}

impl Output {
    fn tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

fn drain(reader: impl AsyncRead + Unpin + Send + 'static, out: Arc<Output>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let n = line.len() as u64 + 1;
            out.bytes.fetch_add(n, Relaxed);
            if line.starts_with("{\"_aws\"") {
                out.emf_bytes.fetch_add(n, Relaxed);
            }
            if let Some(file) = &out.file {
                let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                let _ = writeln!(file, "{line}");
            }
            let mut tail = out.tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == 30 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    });
}

struct Proc {
    name: String,
    child: Child,
    pid: u32,
    output: Arc<Output>,
}

impl Proc {
    fn spawn(name: impl Into<String>, cmd: Command) -> Result<Proc> {
        Self::spawn_logged(name, cmd, None)
    }

    /// [`Proc::spawn`], writing every line the process prints to `log` too.
    fn spawn_logged(name: impl Into<String>, mut cmd: Command, log: Option<&Path>) -> Result<Proc> {
        let name = name.into();
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("a child without a pid")?;
        let file = match log {
            Some(path) => Some(Mutex::new(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            ))),
            None => None,
        };
        let output = Arc::new(Output {
            file,
            ..Output::default()
        });
        if let Some(stdout) = child.stdout.take() {
            drain(stdout, output.clone());
        }
        if let Some(stderr) = child.stderr.take() {
            drain(stderr, output.clone());
        }
        Ok(Proc {
            name,
            child,
            pid,
            output,
        })
    }

    /// Fails with the process's last lines if it has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its last output:\n{}",
                self.name,
                self.output.tail()
            );
        }
        Ok(())
    }

    fn terminate(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL.
    async fn stop(&mut self, grace: Duration) {
        self.terminate();
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on every Linux platform the
/// fleet runs on).
const CLOCK_TICKS: f64 = 100.0;

/// Fields of `/proc/<pid>/stat` after the command name: (ppid, utime+stime, cutime+cstime),
/// in seconds.
fn proc_stat(pid: u32) -> Option<(u32, f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, utime..cstime fields 14..17.
    let num = |i: usize| fields.get(i - 3)?.parse::<f64>().ok();
    let ppid = fields.get(1)?.parse().ok()?;
    Some((
        ppid,
        (num(14)? + num(15)?) / CLOCK_TICKS,
        (num(16)? + num(17)?) / CLOCK_TICKS,
    ))
}

/// CPU seconds a process has used so far, its exited children included.
fn cpu_secs(pid: u32) -> f64 {
    proc_stat(pid).map_or(0.0, |(_, own, children)| own + children)
}

/// CPU seconds of the PostgreSQL server: the postmaster, its live children, and (through the
/// postmaster's children total) every backend that exited.
fn postgres_cpu_secs(postmaster: u32) -> f64 {
    let mut total = cpu_secs(postmaster);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some((ppid, own, _)) = proc_stat(pid) {
                if ppid == postmaster {
                    total += own;
                }
            }
        }
    }
    total
}

/// Peak resident set size (VmHWM) of process `pid`, in MiB; 0 when it cannot be read.
pub(crate) fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

// ---------------------------------------------------------------------------
// The endpoint's counters
// ---------------------------------------------------------------------------

/// What the endpoint's `OrderfleetBench.Stats` answers, in the parts used here.
#[derive(Debug, Clone, Default)]
struct EndpointStats {
    sqs_requests: HashMap<String, u64>,
    sqs_total: u64,
    /// SQS requests in billed 64 KB units.
    sqs_billed: u64,
    entries: u64,
    delivered: u64,
    /// Messages waiting or in flight in the work queues.
    backlog: u64,
    /// Messages in the dead-letter queues.
    dead_lettered: u64,
}

async fn endpoint_call(http: &Http, url: &str, target: &str) -> Result<EndpointStats> {
    let body = http.post(url, target).await?;
    let v: Value = serde_json::from_slice(&body).context("the endpoint's stats")?;
    let sqs_requests: HashMap<String, u64> =
        serde_json::from_value(v["requests"].clone()).unwrap_or_default();
    let (mut backlog, mut dead_lettered) = (0, 0);
    if let Some(queues) = v["queues"].as_object() {
        for (name, q) in queues {
            let n = q["visible"].as_u64().unwrap_or(0)
                + q["in_flight"].as_u64().unwrap_or(0)
                + q["delayed"].as_u64().unwrap_or(0);
            if name.ends_with("-dlq") {
                dead_lettered += n;
            } else {
                backlog += n;
            }
        }
    }
    Ok(EndpointStats {
        sqs_total: v["total"].as_u64().unwrap_or(0),
        sqs_billed: v["billed_units"]
            .as_u64()
            .unwrap_or_else(|| v["total"].as_u64().unwrap_or(0)),
        sqs_requests,
        entries: v["events"]["put_events_entries"].as_u64().unwrap_or(0),
        delivered: v["events"]["matched_deliveries"].as_u64().unwrap_or(0),
        backlog,
        dead_lettered,
    })
}

/// A minimal HTTP/1.1 client for the endpoint's two counter targets.
struct Http;

impl Http {
    async fn post(&self, url: &str, target: &str) -> Result<Vec<u8>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = url
            .strip_prefix("http://")
            .context("the endpoint URL must be http://")?
            .trim_end_matches('/');
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nX-Amz-Target: {target}\r\n\
             Content-Type: application/x-amz-json-1.0\r\nContent-Length: 2\r\n\
             Connection: close\r\n\r\n{{}}"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("an HTTP answer without a body")?;
        let head = String::from_utf8_lossy(&response[..split]);
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{target}: {}", head.lines().next().unwrap_or(""));
        }
        let body = &response[split + 4..];
        // Chunked answers: take the chunks' contents.
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            let mut out = Vec::new();
            let mut rest = body;
            loop {
                let end = rest
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .context("a bad chunk")?;
                let size = usize::from_str_radix(std::str::from_utf8(&rest[..end])?.trim(), 16)?;
                if size == 0 {
                    break;
                }
                out.extend_from_slice(&rest[end + 2..end + 2 + size]);
                rest = &rest[end + 2 + size + 2..];
            }
            return Ok(out);
        }
        Ok(body.to_vec())
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// Runs the fleet benchmark. `progress` receives human-readable lines.
pub async fn run(cfg: &FleetConfig, progress: impl Fn(String)) -> Result<FleetReport> {
    let progress = &progress;
    with_scratch_database(
        &cfg.database_url,
        ("orderfleet_fleet", "fleet"),
        cfg.keep_database,
        progress,
        |admin, name, url| async move {
            let scratch = tempdir(cfg.scratch_parent.as_deref())?;
            let result = run_in(cfg, &admin, &name, &url, &scratch, progress).await;
            let _ = std::fs::remove_dir_all(&scratch);
            result
        },
    )
    .await
}

/// The run's scratch directory, under `parent` or the system's temporary directory: the
/// workers' health files and the emails they write where a deployment would call SES
/// (`--email-outbox-dir`), about 10,000 files a run.
fn tempdir(parent: Option<&Path>) -> Result<PathBuf> {
    let dir = parent
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("orderfleet-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The environment every process of the fleet gets: the caller's, without any `ORDERFLEET_*`
/// setting or `RUST_LOG` (so the workers run on their defaults), with the scratch database,
/// the prefix and the endpoint for SQS and EventBridge.
fn fleet_command(program: &Path, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str() {
            if k.starts_with("ORDERFLEET_") || k == "RUST_LOG" || k.starts_with("DATABASE_URL") {
                cmd.env_remove(k);
            }
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

async fn run_checked(what: &str, mut cmd: Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn start_endpoint(bin_dir: &Path, put_events_delay_ms: u64) -> Result<(Proc, String)> {
    let mut cmd = Command::new(bin_dir.join("orderfleet-bench-sqs"));
    cmd.args(["--port", "0", "--host", "127.0.0.1"]);
    cmd.arg(format!("--put-events-delay-ms={put_events_delay_ms}"));
    let mut endpoint = Proc::spawn("orderfleet-bench-sqs", cmd)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        endpoint.check_alive()?;
        let tail = endpoint.output.tail();
        if let Some(url) = tail
            .lines()
            .find_map(|l| l.split("listening on ").nth(1))
            .map(|u| u.trim().to_string())
        {
            return Ok((endpoint, url));
        }
        if Instant::now() > deadline {
            bail!("the endpoint did not say where it listens:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_in(
    cfg: &FleetConfig,
    admin: &Pool,
    name: &str,
    url: &str,
    scratch: &Path,
    progress: &impl Fn(String),
) -> Result<FleetReport> {
    let (mut endpoint, endpoint_url) =
        start_endpoint(&cfg.bin_dir, cfg.put_events_delay_ms).await?;
    progress(format!("fleet: endpoint at {endpoint_url}"));
    let hash_key = std::env::var("ORDERFLEET_LAKE_HASH_KEY").unwrap_or_else(|_| {
        // A fresh 32-byte key for this run's lake.
        (0..4)
            .map(|_| format!("{:016x}", fastrand::u64(..)))
            .collect()
    });
    let mut env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), url.into()),
        ("ORDERFLEET_PREFIX".into(), cfg.prefix.clone()),
        ("AWS_ENDPOINT_URL_SQS".into(), endpoint_url.clone()),
        ("AWS_ENDPOINT_URL_EVENTBRIDGE".into(), endpoint_url.clone()),
        ("ORDERFLEET_LAKE_HASH_KEY".into(), hash_key),
    ];
    let cli = cfg.bin_dir.join("orderfleet");
    run_checked("orderfleet migrate", {
        let mut c = fleet_command(&cli, &env);
        c.arg("migrate");
        c
    })
    .await?;
    // Statements are counted by pg_stat_statements when the server loads it (the local stack
    // does); without it the run goes on and reports no statement count.
    if let Ok(db) = orderfleet::store::db::pool(url, 1)?.get().await {
        let _ = db
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await;
    }
    run_checked("orderfleet provision", {
        let mut c = fleet_command(&cli, &env);
        c.arg("provision");
        c
    })
    .await?;

    // The workers, on their defaults.
    let outbox = scratch.join("outbox");
    let mut workers = Vec::new();
    for (i, handlers) in cfg.split.iter().enumerate() {
        let list = handlers
            .iter()
            .map(|h| h.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut wenv = env.clone();
        wenv.push((
            "ORDERFLEET_HEALTH_FILE".into(),
            scratch
                .join(format!("worker-{i}.health"))
                .display()
                .to_string(),
        ));
        wenv.push((
            "ORDERFLEET_EMAIL_OUTBOX_DIR".into(),
            outbox.display().to_string(),
        ));
        wenv.extend(cfg.worker_env.iter().cloned());
        let mut cmd = fleet_command(&cfg.bin_dir.join("orderfleet-worker"), &wenv);
        cmd.args(["--handler", &list]);
        if let Some(dir) = &cfg.worker_logs {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log = cfg
            .worker_logs
            .as_ref()
            .map(|dir| dir.join(format!("worker-{i}-{}.log", list.replace(',', "+"))));
        workers.push(Proc::spawn_logged(
            format!("orderfleet-worker --handler {list}"),
            cmd,
            log.as_deref(),
        )?);
    }
    env.extend(cfg.worker_env.iter().cloned());
    progress(format!(
        "fleet: {} worker processes: {}",
        workers.len(),
        cfg.split
            .iter()
            .map(|hs| hs.iter().map(|h| h.as_str()).collect::<Vec<_>>().join("+"))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let result = phases(
        cfg,
        admin,
        name,
        url,
        &env,
        (&mut endpoint, &endpoint_url),
        &mut workers,
        progress,
    )
    .await;
    let peaks: Vec<WorkerReport> = workers
        .iter()
        .map(|w| WorkerReport {
            handlers: w
                .name
                .trim_start_matches("orderfleet-worker --handler ")
                .into(),
            peak_rss_mb: peak_rss_mb(w.pid),
            cpu_secs: cpu_secs(w.pid),
            log_bytes: w.output.bytes.load(Relaxed),
        })
        .collect();
    // All at once: each drains its long polls (up to the wait time) before it exits.
    for w in &workers {
        w.terminate();
    }
    for w in &mut workers {
        w.stop(Duration::from_secs(30)).await;
    }
    endpoint.stop(Duration::from_secs(5)).await;
    let (throughput, latency) = result?;
    Ok(FleetReport {
        put_events_delay_ms: cfg.put_events_delay_ms,
        processes: workers.len(),
        throughput,
        latency,
        workers: peaks,
    })
}

#[allow(clippy::too_many_arguments)]
async fn phases(
    cfg: &FleetConfig,
    admin: &Pool,
    name: &str,
    url: &str,
    env: &[(String, String)],
    (endpoint, endpoint_url): (&mut Proc, &str),
    workers: &mut [Proc],
    progress: &impl Fn(String),
) -> Result<(PhaseReport, Option<PhaseReport>)> {
    let products = simulator::catalogue(cfg.skus);
    let units = simulator::units_for(
        cfg.warmup_orders + cfg.orders + cfg.latency_orders,
        products.len(),
    );
    let cli = cfg.bin_dir.join("orderfleet");
    run_checked("orderfleet seed", {
        let mut c = fleet_command(&cli, env);
        c.args([
            "seed",
            "--skus",
            &cfg.skus.to_string(),
            "--units",
            &units.to_string(),
            "--timeout-secs",
            "120",
        ]);
        c
    })
    .await?;
    for w in workers.iter_mut() {
        w.check_alive()?;
    }
    progress(format!(
        "fleet: catalogue seeded ({} SKUs, {units} units each)",
        products.len()
    ));

    let pool = orderfleet::store::db::pool(url, 2)?;
    let postmaster = {
        let db = pool.get().await?;
        let backend: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        proc_stat(backend as u32)
            .map(|(ppid, _, _)| ppid)
            .context("reading the PostgreSQL backend's parent")?
    };
    // The driver puts the storefront's events on the endpoint's bus, as the workers' relays do.
    let sdk = orderfleet::infra::aws::sdk_config().await;
    let events = aws_sdk_eventbridge::Client::from_conf(
        aws_sdk_eventbridge::config::Builder::from(&sdk)
            .endpoint_url(endpoint_url)
            .build(),
    );
    let bus = cfg.prefix.clone();
    let ctx = PhaseCtx {
        admin,
        name,
        pool: &pool,
        endpoint_url,
        endpoint_pid: endpoint.pid,
        emulator_pid: cfg.lake_emulator_pid,
        postmaster,
        events: &events,
        bus: &bus,
        timeout: cfg.phase_timeout,
        products: &products,
    };

    // A shop's database is not empty: orders flow through a warm fleet whose tables have
    // statistics. On empty tables the planner's generic plans (kept by every connection's
    // statement cache) scan whole tables, which costs more with every order until autovacuum
    // analyses them (a minute or more).
    if cfg.warmup_orders > 0 {
        let warm = ctx
            .phase("warm-up", "w", cfg.warmup_orders, None, workers, progress)
            .await?;
        pool.get()
            .await?
            .batch_execute("ANALYZE")
            .await
            .context("analysing the scratch database")?;
        progress(format!(
            "fleet: warm-up: {} orders at {:.0}/s; tables analysed",
            warm.orders, warm.complete_orders_per_sec
        ));
    }
    let throughput = ctx
        .phase("throughput", "t", cfg.orders, None, workers, progress)
        .await?;
    progress(format!(
        "fleet: throughput phase: {:.0} complete orders/s",
        throughput.complete_orders_per_sec
    ));
    let latency = if cfg.latency_orders > 0 {
        let rate = cfg
            .latency_rate
            .unwrap_or(throughput.complete_orders_per_sec / 2.0)
            .max(1.0);
        Some(
            ctx.phase(
                "latency",
                "l",
                cfg.latency_orders,
                Some(rate),
                workers,
                progress,
            )
            .await?,
        )
    } else {
        None
    };

    // Every invariant of the report must hold.
    run_checked("orderfleet report", {
        let mut c = fleet_command(&cli, env);
        c.args(["report", "--json"]);
        c
    })
    .await
    .context("the fleet's invariants after the run")?;
    Ok((throughput, latency))
}

struct PhaseCtx<'a> {
    admin: &'a Pool,
    name: &'a str,
    pool: &'a Pool,
    endpoint_url: &'a str,
    endpoint_pid: u32,
    emulator_pid: Option<u32>,
    postmaster: u32,
    events: &'a aws_sdk_eventbridge::Client,
    bus: &'a str,
    timeout: Duration,
    /// The seeded catalogue, which orders draw their lines from.
    products: &'a [simulator::Product],
}

/// One bigint from the admin connection, for database `name`.
async fn admin_row(admin: &Pool, sql: &str, name: &str) -> Result<i64> {
    let client = admin.get().await.context("admin connection")?;
    let row = client
        .query_one(sql, &[&name])
        .await
        .with_context(|| format!("reading {sql}"))?;
    Ok(row.get(0))
}

/// How long PostgreSQL may take to publish a backend's transaction counts (PG 15 flushes
/// them at most once a second while busy and within 10 s once idle).
const STATS_SETTLE: Duration = Duration::from_secs(11);

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    xacts: i64,
    /// Rows inserted, updated and deleted in the scratch database.
    rows_written: i64,
    /// The server's WAL position, in bytes.
    wal_bytes: i64,
    /// Statements executed in the scratch database (pg_stat_statements), when it is loaded.
    statements: Option<i64>,
    workers_cpu: f64,
    postgres_cpu: f64,
    endpoint_cpu: f64,
    emulator_cpu: f64,
    log_bytes: u64,
    emf_bytes: u64,
    outbox_events: i64,
    lake_records: i64,
    lake_bytes: i64,
    lake_billed_bytes: i64,
    emails: i64,
    at: Instant,
}

impl PhaseCtx<'_> {
    async fn snapshot(&self, workers: &[Proc]) -> Result<Snapshot> {
        let db = self.pool.get().await?;
        let row = db
            .query_one(
                "SELECT (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM outbox_id_seq),
                        (SELECT count(*) FROM lake_outbox WHERE shipped_at IS NOT NULL),
                        (SELECT coalesce(sum(octet_length(record) + 1), 0)::bigint
                           FROM lake_outbox WHERE shipped_at IS NOT NULL),
                        (SELECT coalesce(sum(((octet_length(record) + 1 + 5119) / 5120) * 5120), 0)::bigint
                           FROM lake_outbox WHERE shipped_at IS NOT NULL),
                        (SELECT count(*) FROM emails)",
                &[],
            )
            .await
            .context("counting the outbox, the lake and the emails")?;
        Ok(Snapshot {
            xacts: transactions(self.admin, self.name).await?,
            rows_written: admin_row(
                self.admin,
                "SELECT (tup_inserted + tup_updated + tup_deleted)::bigint
                   FROM pg_stat_database WHERE datname = $1",
                self.name,
            )
            .await?,
            wal_bytes: admin_row(
                self.admin,
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint WHERE $1 <> ''",
                self.name,
            )
            .await?,
            workers_cpu: workers.iter().map(|w| cpu_secs(w.pid)).sum(),
            postgres_cpu: postgres_cpu_secs(self.postmaster),
            endpoint_cpu: cpu_secs(self.endpoint_pid),
            emulator_cpu: self.emulator_pid.map_or(0.0, cpu_secs),
            log_bytes: workers.iter().map(|w| w.output.bytes.load(Relaxed)).sum(),
            emf_bytes: workers
                .iter()
                .map(|w| w.output.emf_bytes.load(Relaxed))
                .sum(),
            statements: match db
                .query_one(
                    "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
                      WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    &[],
                )
                .await
            {
                Ok(row) => Some(row.get(0)),
                Err(_) => None,
            },
            outbox_events: row.get(0),
            lake_records: row.get(1),
            lake_bytes: row.get(2),
            lake_billed_bytes: row.get(3),
            emails: row.get(4),
            at: Instant::now(),
        })
    }

    /// Waits for PostgreSQL's counts to settle, then zeroes the endpoint's counters.
    async fn settle(&self, workers: &[Proc]) -> Result<(Snapshot, u64)> {
        let first = transactions(self.admin, self.name).await?;
        tokio::time::sleep(STATS_SETTLE).await;
        let second = transactions(self.admin, self.name).await?;
        // Transactions the idle fleet commits per second (heartbeats, the relays' polls), so
        // that the settle window after a phase is not charged to its orders.
        let idle_per_sec = (second - first).max(0) as f64 / STATS_SETTLE.as_secs_f64();
        endpoint_call(&Http, self.endpoint_url, "OrderfleetBench.Reset").await?;
        let snap = self.snapshot(workers).await?;
        Ok((snap, idle_per_sec.round() as u64))
    }

    async fn phase(
        &self,
        phase: &'static str,
        tag: &str,
        orders: usize,
        rate: Option<f64>,
        workers: &mut [Proc],
        progress: &impl Fn(String),
    ) -> Result<PhaseReport> {
        let (before, idle_per_sec) = self.settle(workers).await?;
        let run_id = format!("{tag}{}", simulator::new_run_id());
        let plan = simulator::plan_orders(
            &PlanConfig {
                orders,
                seed: 1,
                run_id: run_id.clone(),
                regular_only: true,
            },
            self.products,
        )?;
        let prefix = simulator::Plan::order_id_prefix(&run_id);
        progress(format!(
            "fleet: {phase} phase: {orders} orders {}",
            rate.map_or("as fast as PutEvents takes them".to_string(), |r| format!(
                "at {r:.0}/s"
            ))
        ));
        let published = Arc::new(Mutex::new(HashMap::with_capacity(orders)));
        let started = Instant::now();
        let mut publisher = tokio::spawn(publish(
            self.events.clone(),
            self.bus.to_string(),
            plan.events,
            rate,
            published.clone(),
        ));
        // Wait for every order to reach a terminal state.
        let deadline = started + self.timeout;
        // Every id with the prefix sorts between the prefix and the prefix followed by the
        // highest character (ids are ASCII).
        let prefix_end = format!("{prefix}\u{10FFFF}");
        let mut published_all = false;
        let completed = loop {
            for w in workers.iter_mut() {
                w.check_alive()?;
            }
            if !published_all && publisher.is_finished() {
                // A publisher that failed ends the phase at once, with its error.
                (&mut publisher).await.context("the publisher")??;
                published_all = true;
            }
            let db = self.pool.get().await?;
            let row = db
                .query_one(
                    // A range on the primary key (see the sleep below for how often).
                    "SELECT count(*) FILTER (WHERE status = 'completed'),
                            count(*) FILTER (WHERE terminal_at IS NOT NULL)
                       FROM orders WHERE id >= $1 AND id < $2",
                    &[&prefix, &prefix_end],
                )
                .await?;
            let (completed, terminal): (i64, i64) = (row.get(0), row.get(1));
            if terminal as usize >= orders {
                break completed;
            }
            if Instant::now() > deadline {
                bail!("{phase} phase: only {terminal} of {orders} orders finished in {:?}; the workers' last lines:\n{}",
                    self.timeout,
                    workers.iter().map(|w| format!("== {}\n{}", w.name, w.output.tail())).collect::<Vec<_>>().join("\n"));
            }
            // PostgreSQL's CPU is measured, and a poll reads every order of the phase (about
            // 4.5 ms of its CPU for 3,000 orders), so the driver polls seldom until the end is
            // near. The phase's time comes from the orders' own `terminal_at`, not from when a
            // poll saw them.
            let near_end = terminal as usize * 10 >= orders * 9;
            tokio::time::sleep(Duration::from_millis(if near_end { 100 } else { 500 })).await;
        };
        if !published_all {
            publisher.await.context("the publisher")??;
        }
        if completed as usize != orders {
            bail!("{phase} phase: {completed} of {orders} orders completed; every regular order should");
        }
        // The rest of the fleet (emails, the lake, recommendations) finishes its messages.
        loop {
            let stats = endpoint_call(&Http, self.endpoint_url, "OrderfleetBench.Stats").await?;
            if stats.backlog == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{phase} phase: {} messages still queued after the orders finished",
                    stats.backlog
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Everything the phase did, counted before the counters settle.
        let stats = endpoint_call(&Http, self.endpoint_url, "OrderfleetBench.Stats").await?;
        let cpu_end = self.snapshot(workers).await?;
        let drained = cpu_end.at;
        // The lake ships about once a second; wait for what this phase archived.
        let mut after = cpu_end;
        for _ in 0..50 {
            let db = self.pool.get().await?;
            let pending: i64 = db
                .query_one(
                    "SELECT count(*) FROM lake_outbox WHERE shipped_at IS NULL",
                    &[],
                )
                .await?
                .get(0);
            if pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(STATS_SETTLE).await;
        let settled = self.snapshot(workers).await?;
        let idle_xacts =
            (idle_per_sec as f64 * settled.at.duration_since(drained).as_secs_f64()).round() as i64;
        after.xacts = settled.xacts - idle_xacts;
        after.rows_written = settled.rows_written;
        after.lake_records = settled.lake_records;
        after.lake_bytes = settled.lake_bytes;
        after.lake_billed_bytes = settled.lake_billed_bytes;
        after.log_bytes = settled.log_bytes;
        after.emf_bytes = settled.emf_bytes;

        // Latency: put on the bus to terminal_at.
        let db = self.pool.get().await?;
        let rows = db
            .query(
                "SELECT id, terminal_at FROM orders WHERE id >= $1 AND id < $2",
                &[&prefix, &prefix_end],
            )
            .await?;
        let sent = published.lock().unwrap_or_else(|e| e.into_inner());
        let mut latencies: Vec<f64> = Vec::with_capacity(rows.len());
        let mut last_done = SystemTime::UNIX_EPOCH;
        for row in &rows {
            let id: String = row.get(0);
            let done: SystemTime = row.get(1);
            last_done = last_done.max(done);
            if let Some(at) = sent.get(&id) {
                if let Ok(d) = done.duration_since(*at) {
                    latencies.push(d.as_secs_f64() * 1000.0);
                }
            }
        }
        let first_sent = sent
            .values()
            .min()
            .copied()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            if latencies.is_empty() {
                return 0.0;
            }
            let i = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
            latencies[i.clamp(1, latencies.len()) - 1]
        };
        let elapsed = last_done
            .duration_since(first_sent)
            .unwrap_or_default()
            .as_secs_f64()
            .max(1e-3);

        let n = orders as f64;
        let emitted = (after.outbox_events - before.outbox_events) as u64 + orders as u64;
        let usage = Usage {
            sqs_requests: stats.sqs_billed as f64 / n,
            eventbridge_entries: stats.entries as f64 / n,
            firehose_billed_bytes: (after.lake_billed_bytes - before.lake_billed_bytes) as f64 / n,
            firehose_bytes: (after.lake_bytes - before.lake_bytes) as f64 / n,
            firehose_records: (after.lake_records - before.lake_records) as f64 / n,
            emails: (after.emails - before.emails) as f64 / n,
            put_metric_data_calls: 0.0,
            log_bytes: (after.log_bytes - before.log_bytes) as f64 / n,
        };
        let bill = Bill::per_1000(&usage);
        Ok(PhaseReport {
            phase,
            orders,
            offered_orders_per_sec: rate,
            elapsed_secs: elapsed,
            complete_orders_per_sec: n / elapsed,
            p50_ms: pct(50.0),
            p99_ms: pct(99.0),
            max_ms: pct(100.0),
            sqs_requests: stats.sqs_total,
            sqs_requests_per_order: stats.sqs_total as f64 / n,
            messages_handled: stats.delivered,
            dead_lettered: stats.dead_lettered,
            sqs_requests_per_message: stats.sqs_total as f64 / stats.delivered.max(1) as f64,
            sqs_requests_by_operation: stats.sqs_requests,
            eventbridge_entries: stats.entries,
            eventbridge_entries_per_order: stats.entries as f64 / n,
            events_emitted: emitted,
            eventbridge_entries_per_emitted_event: stats.entries as f64 / emitted.max(1) as f64,
            db_transactions_per_order: (after.xacts - before.xacts) as f64 / n,
            db_rows_written_per_order: (after.rows_written - before.rows_written) as f64 / n,
            db_statements_per_order: after
                .statements
                .zip(before.statements)
                .map(|(a, b)| (a - b) as f64 / n),
            wal_bytes_per_order: (after.wal_bytes - before.wal_bytes) as f64 / n,
            cpu_secs_per_order: CpuSplit {
                workers: (cpu_end.workers_cpu - before.workers_cpu) / n,
                postgres: (cpu_end.postgres_cpu - before.postgres_cpu) / n,
                endpoint: (cpu_end.endpoint_cpu - before.endpoint_cpu) / n,
                lake_emulator: (cpu_end.emulator_cpu - before.emulator_cpu) / n,
            },
            log_bytes_per_order: usage.log_bytes,
            emf_bytes_per_order: (after.emf_bytes - before.emf_bytes) as f64 / n,
            usd_per_1000_orders: bill.total,
            largest_cost: bill.largest().to_string(),
            usage_per_order: usage,
            bill_per_1000_orders: bill,
        })
    }
}

/// Puts the orders on the bus, ten per PutEvents call: back to back without a rate, else each
/// order at its own moment (`start + i / rate`). Records when each order went out.
async fn publish(
    events: aws_sdk_eventbridge::Client,
    bus: String,
    plan: Vec<StorefrontEvent>,
    rate: Option<f64>,
    sent: Arc<Mutex<HashMap<String, SystemTime>>>,
) -> Result<()> {
    let order_id = |e: &StorefrontEvent| e.detail["order_id"].as_str().map(str::to_string);
    match rate {
        None => {
            // A few calls in flight at once, as a storefront's webhooks would be.
            let chunks: Vec<Vec<StorefrontEvent>> = plan
                .chunks(simulator::PUT_EVENTS_BATCH)
                .map(|c| c.to_vec())
                .collect();
            let queue = Arc::new(Mutex::new(chunks.into_iter()));
            let mut tasks = Vec::new();
            for _ in 0..4 {
                let (queue, events, bus, sent) =
                    (queue.clone(), events.clone(), bus.clone(), sent.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let next: Option<Vec<StorefrontEvent>> =
                            queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                        let Some(chunk) = next else {
                            return Ok::<_, anyhow::Error>(());
                        };
                        let now = SystemTime::now();
                        {
                            let mut sent = sent.lock().unwrap_or_else(|e| e.into_inner());
                            for e in &chunk {
                                if let Some(id) = order_id(e) {
                                    sent.insert(id, now);
                                }
                            }
                        }
                        simulator::put_events(&events, &bus, &chunk).await?;
                    }
                }));
            }
            for t in tasks {
                t.await??;
            }
        }
        Some(rate) => {
            let start = Instant::now();
            let mut next = 0usize;
            while next < plan.len() {
                let due =
                    ((start.elapsed().as_secs_f64() * rate).floor() as usize + 1).min(plan.len());
                if due > next {
                    let end = due.min(next + simulator::PUT_EVENTS_BATCH);
                    let chunk = &plan[next..end];
                    let now = SystemTime::now();
                    {
                        let mut sent = sent.lock().unwrap_or_else(|e| e.into_inner());
                        for e in chunk {
                            if let Some(id) = order_id(e) {
                                sent.insert(id, now);
                            }
                        }
                    }
                    simulator::put_events(&events, &bus, chunk).await?;
                    next = end;
                } else {
                    let at = start + Duration::from_secs_f64(next as f64 / rate);
                    tokio::time::sleep_until(at.into()).await;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_split_is_one_process_per_saga_handler_and_one_for_the_rest() {
        let split = default_split();
        assert_eq!(split.len(), 5);
        assert_eq!(split[0], vec![HandlerName::Orders]);
        let all: Vec<HandlerName> = split.concat();
        for h in HandlerName::ALL {
            assert_eq!(all.iter().filter(|x| **x == h).count(), 1, "{h}");
        }
        assert!(split[4].contains(&HandlerName::Storefront));
    }

    #[test]
    fn this_process_reads_its_own_cpu_and_peak_memory() {
        let pid = std::process::id();
        let (ppid, _, _) = proc_stat(pid).expect("own stat");
        assert!(ppid > 0);
        let _ = (0..2_000_000u64).fold(0u64, |a, b| a.wrapping_add(b * b));
        assert!(peak_rss_mb(pid) > 1.0);
    }
}
