//! The `orderfleet-worker` process: builds the clients and the pool, validates every queue,
//! runs one [`Consumer`] per handler plus the process-wide lease task, outbox relay and
//! heartbeat, and turns SIGTERM/SIGINT into an orderly shutdown.

pub mod deps;
pub mod health;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::names::HandlerName;
use crate::handlers::AnyHandler;
use crate::infra::aws::Clients;
use crate::infra::topology::Topology;
use crate::runtime::backoff::RetryPolicy;
use crate::runtime::group::{GroupCommit, GroupConfig};
use crate::runtime::lease::Leases;
use crate::runtime::retention;
use crate::runtime::{self, notify, Apply, Consumer, ConsumerConfig};
use crate::store::inbox::InboxRetention;
use crate::store::outbox::{Handoff, Relay};
use crate::telemetry::emf::{Reporter, Sink};
use crate::telemetry::logging::LogFormat;
use crate::telemetry::metrics::Counters;
use crate::worker::health::Liveness;
use deps::Deps;

/// The `orderfleet-worker` command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "orderfleet-worker",
    version,
    about = "Runs orderfleet queue handlers",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct WorkerCli {
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(subcommand)]
    pub command: Option<WorkerCommand>,
}

/// Subcommands of `orderfleet-worker`; without one it runs the worker.
#[derive(Debug, clap::Subcommand)]
pub enum WorkerCommand {
    /// Exit 0 if a worker on this host is alive and not wedged, 1 otherwise (for ECS health
    /// checks; no HTTP port needed).
    Healthcheck {
        /// The liveness file the worker writes.
        #[arg(long, env = "ORDERFLEET_HEALTH_FILE", default_value_os_t = crate::worker::health::default_path())]
        health_file: std::path::PathBuf,
        /// Unhealthy when the worker has not reported for this long.
        #[arg(long, env = "ORDERFLEET_HEALTH_MAX_AGE_SECS", default_value_t = 15)]
        max_age_secs: u64,
    },
}

/// Settings of the worker daemon. Every flag has an environment variable.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Handlers to run in this process (repeat, or comma-separate).
    #[arg(
        long = "handler",
        env = "ORDERFLEET_HANDLERS",
        value_delimiter = ',',
        required_unless_present = "all"
    )]
    pub handlers: Vec<HandlerName>,
    /// Run every handler in this process (the local default).
    #[arg(long, env = "ORDERFLEET_ALL", conflicts_with = "handlers")]
    pub all: bool,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    #[command(flatten)]
    pub deps: deps::DepsArgs,
    /// Threads that run the worker's tasks (tokio's worker threads); 0: one per CPU this
    /// process may use. A worker mostly waits on SQS, PostgreSQL and EventBridge, and a fleet
    /// grows by processes (one ECS task or systemd unit per handler), so one is the default:
    /// threads that outnumber the CPUs a process gets (a 0.25-vCPU Fargate task sees two) spend
    /// the CPU on waking each other. In the fleet benchmark, five workers on two vCPUs, one
    /// thread each took about an eighth off the workers' CPU per order and about 2.8 MB off the
    /// four-handler process's peak (docs/BENCHMARKS.md). Raise it for one process given
    /// several CPUs. With one thread a handler must never block it: nothing else in the
    /// process, its own timeout and the leases included, runs until it yields. Above 0 this
    /// flag, not tokio's TOKIO_WORKER_THREADS, sets the count; at 0 tokio's default applies.
    #[arg(long, env = "ORDERFLEET_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Do not run the outbox relay in this process (run it elsewhere).
    #[arg(long, env = "ORDERFLEET_NO_RELAY")]
    pub no_relay: bool,
    /// Leave every emitted event to the relay. By default the task that commits a handler's
    /// events publishes them straight after its commit, and the relay takes only what that
    /// did not publish (see `Handoff` in `src/store/outbox.rs`). Implied by `--no-relay`.
    #[arg(long, env = "ORDERFLEET_NO_PUBLISH_ON_COMMIT")]
    pub no_publish_on_commit: bool,
    /// How long the rows a commit publishes itself stay claimed: relays leave them alone until
    /// then, and the task publishing them gives them back to the relay after half of it. After
    /// a crash between a commit and its PutEvents, the events wait this long. At least 2.
    #[arg(long, env = "ORDERFLEET_OUTBOX_CLAIM_SECS", default_value_t = 30)]
    pub outbox_claim_secs: u64,
    /// How often the relay looks for unpublished events when nothing woke it.
    #[arg(long, env = "ORDERFLEET_RELAY_POLL_MS", default_value_t = 200)]
    pub relay_poll_ms: u64,
    /// How often the worker records its heartbeat in PostgreSQL.
    #[arg(long, env = "ORDERFLEET_HEARTBEAT_SECS", default_value_t = 10)]
    pub heartbeat_secs: u64,
    /// Inbox rows (what makes a redelivered event a duplicate) older than this many days are
    /// deleted, and events older than it less an hour are dead-lettered unapplied; 0 keeps
    /// rows forever and applies events of any age. Use one value for every worker of a database.
    #[arg(long, env = "ORDERFLEET_INBOX_RETENTION_DAYS", default_value_t = 30)]
    pub inbox_retention_days: u64,
    /// How often the worker deletes inbox rows past their retention.
    #[arg(long, env = "ORDERFLEET_INBOX_PRUNE_INTERVAL_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub inbox_prune_interval_secs: u64,
    /// Connections in the PostgreSQL pool. A grouping handler holds one per transaction
    /// (--group-commit-transactions); the others one per event being applied, so this bounds
    /// how many of their events run at once. Each open connection costs the worker about
    /// 140 KB and PostgreSQL a backend (docs/BENCHMARKS.md, "Memory").
    #[arg(long, env = "ORDERFLEET_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// Most events of one handler committed in one transaction (orders, inventory, analytics,
    /// personalization without a Personalize tracker, notifications with the file outbox, and
    /// payments, fulfillment and the storefront with the sandboxes); 1 commits each event alone. A ceiling: groups are
    /// capped at the messages in flight / --group-commit-transactions, so they grow only with
    /// the queue's backlog.
    #[arg(long, env = "ORDERFLEET_GROUP_COMMIT_MAX", default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub group_commit_max: usize,
    /// Transactions of one grouping handler running at once (at most --db-pool-size). The
    /// in-flight messages are shared among them, so fewer transactions make larger groups. At
    /// 1, the next group gathers while one commits; a second group mostly waits for the first's
    /// locks (the SKUs, the customers) and in the fleet benchmark added latency and no
    /// throughput.
    #[arg(long, env = "ORDERFLEET_GROUP_COMMIT_TRANSACTIONS", default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub group_commit_transactions: usize,
    /// Where metrics go: EMF lines on stdout, PutMetricData, both, or none.
    #[arg(long, env = "ORDERFLEET_METRICS_SINK", default_value = "emf")]
    pub metrics_sink: crate::telemetry::emf::Sink,
    /// Metrics are flushed this often (PutMetricData needs at least 60).
    #[arg(long, env = "ORDERFLEET_METRICS_INTERVAL_SECS", default_value_t = 60)]
    pub metrics_interval_secs: u64,
    /// The liveness file `orderfleet-worker healthcheck` reads.
    #[arg(long, env = "ORDERFLEET_HEALTH_FILE", default_value_os_t = crate::worker::health::default_path())]
    pub health_file: std::path::PathBuf,
}

impl WorkerArgs {
    /// How long inbox rows are kept; `None` for ever.
    fn inbox_retention(&self) -> Option<Duration> {
        (self.inbox_retention_days > 0)
            .then(|| Duration::from_secs(self.inbox_retention_days.saturating_mul(86_400)))
    }

    /// How a consumer applies events: in groups ([`GroupCommit`]) when the handler's work is
    /// all database work and grouping is on, else one transaction per event.
    fn applier(
        &self,
        handler: Arc<dyn AnyHandler>,
        pool: &Pool,
        cfg: &ConsumerConfig,
        counters: &Arc<Counters>,
        handoff: Option<Handoff>,
    ) -> Arc<dyn Apply> {
        if self.group_commit_max > 1 && handler.group_commit() {
            Arc::new(
                GroupCommit::counting_into(
                    handler,
                    pool.clone(),
                    GroupConfig {
                        max_group: self.group_commit_max,
                        transactions: self.group_commit_transactions.min(self.db_pool_size),
                        timeout: cfg.handler_timeout,
                    },
                    counters.clone(),
                )
                .handing_off(handoff),
            )
        } else {
            runtime::Transactional::handing_off(handler, pool.clone(), handoff)
        }
    }
}

/// Settings shared by the worker and the CLI.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Prefix of every resource name: the bus, queues `<prefix>-<handler>` and DLQs.
    #[arg(long, env = "ORDERFLEET_PREFIX", default_value = "orderfleet")]
    pub prefix: String,
    /// Log format: `json` (one object per line, for CloudWatch Logs) or `pretty`.
    #[arg(long, env = "ORDERFLEET_LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
}

/// Settings of each queue consumer.
#[derive(Debug, Clone, Args)]
pub struct ConsumerArgs {
    /// Most messages handled at once per handler. A ceiling: the consumer keeps one full
    /// receive (10) in flight and grows towards this only while its queue has a backlog.
    #[arg(long, env = "ORDERFLEET_CONCURRENCY", default_value_t = 128)]
    pub concurrency: usize,
    /// Receive loops per handler; default: concurrency / 10, at least 1, at most 8.
    #[arg(long, env = "ORDERFLEET_RECEIVERS")]
    pub receivers: Option<usize>,
    /// Long-poll wait of each ReceiveMessage (0-20).
    #[arg(long, env = "ORDERFLEET_WAIT_TIME_SECS", default_value_t = 20, value_parser = clap::value_parser!(i32).range(0..=20))]
    pub wait_time_secs: i32,
    /// Visibility timeout set at receive and renewed by the lease; default: the queue's.
    #[arg(long, env = "ORDERFLEET_VISIBILITY_TIMEOUT_SECS")]
    pub visibility_timeout_secs: Option<u64>,
    /// A handler running longer than this is abandoned and its message retried.
    #[arg(long, env = "ORDERFLEET_HANDLER_TIMEOUT_SECS", default_value_t = 30)]
    pub handler_timeout_secs: u64,
    /// First retry delay; doubles with each receive, with jitter.
    #[arg(long, env = "ORDERFLEET_RETRY_BASE_SECS", default_value_t = 2)]
    pub retry_base_secs: u64,
    /// Longest retry delay.
    #[arg(long, env = "ORDERFLEET_RETRY_CAP_SECS", default_value_t = 300)]
    pub retry_cap_secs: u64,
    /// Deletes wait at most this long to fill a batch of ten. A later delete costs nothing
    /// but a longer lease (the message is handled and committed); a fuller batch saves SQS
    /// requests.
    #[arg(long, env = "ORDERFLEET_DELETE_FLUSH_MS", default_value_t = 50)]
    pub delete_flush_ms: u64,
    /// While messages trickle in (receives come back short, or full only right after such a
    /// wait), one receive loop at a time receives, and after a receive that returned some
    /// messages but fewer than it asked for it waits before the next one: about as long as
    /// seven messages take to arrive at the rate they have been arriving, and at most this
    /// long. Receives come back fuller (fewer SQS requests per message) for at most this much
    /// latency per hop. A receive that returned nothing long-polls again at once, so a quiet
    /// queue answers its first message without delay.
    /// At the in-flight ceiling with a backlog, a loop also waits up to this long for ten free
    /// slots before it receives, rather than asking for the one or two a finishing handler
    /// just freed. 0 turns both waits off.
    #[arg(long, env = "ORDERFLEET_RECEIVE_LINGER_MS", default_value_t = 20)]
    pub receive_linger_ms: u64,
    /// On SIGTERM, once the receives in flight have returned, running handlers (and those the
    /// last receives returned) get this long to finish.
    #[arg(long, env = "ORDERFLEET_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    /// How long the supervisor waits after SIGTERM before it kills the process: ECS's
    /// `stopTimeout`, systemd's `TimeoutStopSec`. The worker refuses to start unless the wait
    /// time, 5 s of receive slack, the shutdown grace and 5 s to flush fit inside it.
    #[arg(long, env = "ORDERFLEET_STOP_TIMEOUT_SECS", default_value_t = 60)]
    pub stop_timeout_secs: u64,
}

impl ConsumerArgs {
    /// The longest a stop can take: the receives in flight run to their end (wait time plus
    /// slack), then handlers get the grace, then deletes, releases and the outbox are flushed.
    pub fn stop_budget(&self) -> Duration {
        Duration::from_secs(self.wait_time_secs.max(0) as u64)
            + runtime::RECEIVE_SLACK
            + Duration::from_secs(self.shutdown_grace_secs)
            + runtime::FLUSH_BUDGET
    }

    /// Refuses settings whose stop cannot finish before the supervisor kills the process: that
    /// kill would strand messages in flight for their visibility timeout.
    pub fn check_stop_budget(&self) -> Result<()> {
        let budget = self.stop_budget();
        if budget >= Duration::from_secs(self.stop_timeout_secs) {
            bail!(
                "a stop can take {}s (--wait-time-secs {} + {}s receive slack + \
                 --shutdown-grace-secs {} + {}s to flush), which does not fit in \
                 --stop-timeout-secs {} (ECS stopTimeout / systemd TimeoutStopSec); lower the \
                 wait time or the grace, or raise the stop timeout (and the supervisor's with it)",
                budget.as_secs(),
                self.wait_time_secs,
                runtime::RECEIVE_SLACK.as_secs(),
                self.shutdown_grace_secs,
                runtime::FLUSH_BUDGET.as_secs(),
                self.stop_timeout_secs
            );
        }
        Ok(())
    }

    /// The consumer settings for a queue, given what the queue says about itself.
    pub fn config(&self, facts: &crate::sqs::queue::QueueFacts) -> ConsumerConfig {
        ConsumerConfig {
            queue_url: facts.queue_url.clone(),
            dlq_url: facts.dlq_url.clone(),
            concurrency: self.concurrency,
            receivers: self
                .receivers
                .unwrap_or_else(|| ConsumerConfig::default_receivers(self.concurrency)),
            wait_time_secs: self.wait_time_secs,
            visibility_timeout: self
                .visibility_timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(facts.visibility_timeout),
            handler_timeout: Duration::from_secs(self.handler_timeout_secs),
            retry: RetryPolicy {
                base: Duration::from_secs(self.retry_base_secs.max(1)),
                cap: Duration::from_secs(self.retry_cap_secs.max(1)),
            },
            max_receive_count: facts.max_receive_count,
            delete_flush: Duration::from_millis(self.delete_flush_ms),
            receive_linger: Duration::from_millis(self.receive_linger_ms),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            max_event_age: None,
        }
    }
}

/// Checks the database is reachable and migrated, with an error that says what to run.
pub async fn check_schema(pool: &Pool) -> Result<()> {
    let client = pool
        .get()
        .await
        .context("cannot connect to PostgreSQL; check DATABASE_URL (locally: `make up`)")?;
    let latest = crate::store::db::MIGRATIONS
        .last()
        .map(|m| m.0)
        .unwrap_or(0);
    let have: Option<i32> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .ok()
        .and_then(|r| r.get(0));
    if have != Some(latest) {
        bail!(
            "the database schema is at version {:?} but this build needs {latest}; run `orderfleet migrate`",
            have
        );
    }
    Ok(())
}

/// The runtime a worker runs on: `threads` worker threads (`--worker-threads`), or tokio's own
/// default when it is 0 (one per CPU this process may use).
pub fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs the worker until SIGTERM or SIGINT. Returns once shutdown completed.
pub async fn run(args: WorkerArgs) -> Result<()> {
    let stop = CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested; draining");
        signal_stop.cancel();
    });
    run_until(args, stop).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only be killed; never stop on our own.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Runs the worker until `stop` is cancelled.
pub async fn run_until(args: WorkerArgs, stop: CancellationToken) -> Result<()> {
    let names: Vec<HandlerName> = if args.all {
        HandlerName::ALL.to_vec()
    } else {
        let mut v = args.handlers.clone();
        v.dedup();
        v
    };
    if matches!(args.metrics_sink, Sink::Cloudwatch | Sink::Both) && args.metrics_interval_secs < 60
    {
        bail!("--metrics-interval-secs must be at least 60 with the PutMetricData sink (one call per worker per minute); use --metrics-sink emf for shorter intervals");
    }
    args.consumer.check_stop_budget()?;
    if args.metrics_interval_secs == 0 {
        bail!("--metrics-interval-secs must be at least 1");
    }
    let topo = Topology::with_prefix(&args.common.prefix);
    let sdk = crate::infra::aws::sdk_config().await;
    let clients = Clients::new(&sdk);
    let pool = crate::store::db::pool(&args.common.database_url, args.db_pool_size)?;
    check_schema(&pool).await?;
    // The sandbox payment provider gets a pool of its own unless told otherwise: each payment
    // holds a connection for its transaction while the provider needs another, and sharing one
    // pool would let busy payments starve themselves.
    let mut deps_args = args.deps.clone();
    if deps_args.sandbox_payment_database_url.is_none() {
        deps_args.sandbox_payment_database_url = Some(args.common.database_url.clone());
    }
    let mut deps = Deps::new(&deps_args, &pool, &clients).await?;
    deps.payment_attempts_pool = crate::store::db::pool(&args.common.database_url, 8)?;

    // Validate every queue before consuming any.
    let mut consumers = Vec::new();
    let leases = Leases::default();
    // Each worker publishes what its own handlers emitted, under their sources and no other:
    // its role may put only those on the bus. A worker whose handlers emit nothing runs none.
    // The orders worker also publishes the support desk's events (`relayed_sources`).
    let mut sources: Vec<String> = names
        .iter()
        .flat_map(|n| crate::domain::catalogue::relayed_sources(*n))
        .collect();
    sources.dedup();
    let run_relay = !args.no_relay && !sources.is_empty();
    let relay = Relay::new(
        pool.clone(),
        clients.events.clone(),
        topo.bus_name.clone(),
        sources,
    );
    // Publishing on commit is the relay's fast lane: with no relay here, there is none.
    if args.outbox_claim_secs < 2 {
        bail!("--outbox-claim-secs must be at least 2");
    }
    let handoff = (run_relay && !args.no_publish_on_commit)
        .then(|| relay.handoff_claiming(Duration::from_secs(args.outbox_claim_secs)));
    let mut all_counters = Vec::new();
    for name in &names {
        let queue = topo.queue_name(*name);
        let facts = crate::sqs::queue::inspect_queue(&clients.sqs, &queue).await?;
        let mut cfg = args.consumer.config(&facts);
        cfg.max_event_age = args.inbox_retention().map(retention::max_event_age);
        runtime::validate(&cfg, &facts)
            .with_context(|| format!("handler {name} (queue {queue})"))?;
        let handler: Arc<dyn AnyHandler> = deps::build(*name, &deps)?;
        let counters = Arc::new(Counters::default());
        all_counters.push((*name, counters.clone()));
        let handler = args.applier(handler, &pool, &cfg, &counters, handoff.clone());
        consumers.push(Consumer {
            cfg,
            sqs: clients.sqs.clone(),
            handler,
            leases: leases.clone(),
            counters,
            // A hand-off wakes the relay itself for what it does not publish.
            relay_wake: (run_relay && handoff.is_none()).then(|| relay.waker()),
        });
    }

    let background = CancellationToken::new();
    let lease_task = tokio::spawn(leases.clone().run(
        clients.sqs.clone(),
        runtime::LEASE_TICK,
        background.clone(),
    ));
    let relay_task = run_relay.then(|| {
        tokio::spawn(relay.clone().run(
            background.clone(),
            Duration::from_millis(args.relay_poll_ms),
        ))
    });
    // The lake shipper batches what the analytics handler archived into PutRecordBatch calls
    // (see crate::store::lake). It stops with the background tasks, after the consumers, so it still
    // ships what the last handlers committed.
    let lake_task = names
        .contains(&HandlerName::Analytics)
        .then(|| tokio::spawn(deps.lake_shipper(&topo).run(background.clone())));
    let heartbeat = Heartbeat::new(pool.clone(), &names, all_counters);
    let heartbeat_task = tokio::spawn(heartbeat.clone().run(
        Duration::from_secs(args.heartbeat_secs.max(1)),
        background.clone(),
    ));
    let retention_task = args.inbox_retention().map(|keep| {
        tokio::spawn(InboxRetention::new(pool.clone(), keep).run(
            Duration::from_secs(args.inbox_prune_interval_secs),
            background.clone(),
        ))
    });
    let watchdog_task = notify::watchdog_interval().map(|every| {
        let bg = background.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = bg.cancelled() => return,
                    _ = tick.tick() => notify::notify("WATCHDOG=1"),
                }
            }
        })
    });

    let reporter = Reporter {
        sink: args.metrics_sink,
        interval: Duration::from_secs(args.metrics_interval_secs),
        consumers: heartbeat
            .counters
            .iter()
            .map(|(h, c)| (h.to_string(), c.clone()))
            .collect(),
        cloudwatch: matches!(args.metrics_sink, Sink::Cloudwatch | Sink::Both)
            .then(|| aws_sdk_cloudwatch::Client::new(&sdk)),
        pool: pool.clone(),
        outbox: run_relay,
    };
    let metrics_stop = CancellationToken::new();
    let reporter_task = tokio::spawn(reporter.run(metrics_stop.clone()));
    let liveness = Liveness::new(args.health_file.clone());
    let liveness_task = tokio::spawn(liveness.clone().run(
        heartbeat.counters.clone(),
        leases.clone(),
        background.clone(),
    ));

    let mut running = tokio::task::JoinSet::new();
    for c in consumers {
        tracing::info!(
            handler = c.handler.name(),
            concurrency = c.cfg.concurrency,
            receivers = c.cfg.receivers,
            visibility_timeout_secs = c.cfg.visibility_timeout.as_secs(),
            max_receive_count = c.cfg.max_receive_count,
            "consumer started"
        );
        running.spawn(c.run(stop.clone()));
    }
    notify::notify("READY=1");
    tracing::info!(handlers = ?names.iter().map(|h| h.as_str()).collect::<Vec<_>>(), "worker ready");

    stop.cancelled().await;
    notify::notify("STOPPING=1");
    let mut result = Ok(());
    while let Some(done) = running.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(anyhow::anyhow!("consumer task: {e}")),
        }
    }
    // Hand-offs still in flight get a second: the relay's drain below publishes what they
    // handed back, and rows of one that outlasts it wait for their claim to run out.
    if let Some(handoff) = &handoff {
        handoff.finish(Duration::from_secs(1)).await;
    }
    background.cancel();
    let _ = lease_task.await;
    if let Some(t) = lake_task {
        let _ = t.await;
    }
    if let Some(t) = relay_task {
        let _ = t.await;
        // Publish what the last handlers committed, briefly; anything left waits for the next
        // relay, in this process or another.
        if let Err(e) = relay.drain(Duration::from_secs(2)).await {
            tracing::warn!(error = %format!("{e:#}"), "final outbox drain failed; events stay in the outbox");
        }
    }
    if let Some(t) = watchdog_task {
        let _ = t.await;
    }
    if let Some(t) = retention_task {
        let _ = t.await;
    }
    let _ = heartbeat_task.await;
    let _ = liveness_task.await;
    liveness.remove();
    heartbeat.beat(true).await;
    metrics_stop.cancel();
    let _ = reporter_task.await;
    tracing::info!("worker stopped");
    result
}

/// The worker's row in `worker_heartbeats`, kept fresh for `orderfleet status` and the
/// health check.
#[derive(Clone)]
pub struct Heartbeat {
    pool: Pool,
    id: Uuid,
    handlers: Vec<String>,
    pub(crate) counters: Arc<Vec<(HandlerName, Arc<Counters>)>>,
    started: chrono::DateTime<chrono::Utc>,
}

impl Heartbeat {
    fn new(pool: Pool, names: &[HandlerName], counters: Vec<(HandlerName, Arc<Counters>)>) -> Self {
        Heartbeat {
            pool,
            id: Uuid::new_v4(),
            handlers: names.iter().map(|h| h.to_string()).collect(),
            counters: Arc::new(counters),
            started: chrono::Utc::now(),
        }
    }

    async fn run(self, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.beat(false).await,
            }
        }
    }

    async fn beat(&self, stopping: bool) {
        let (mut processed, mut failed) = (0i64, 0i64);
        for (_, c) in self.counters.iter() {
            let s = c.snapshot();
            processed += (s.succeeded + s.duplicates) as i64;
            failed += s.dead_lettered as i64 + s.retried as i64;
        }
        let host = hostname();
        let result = async {
            let client = self.pool.get().await?;
            client
                .execute(
                    "INSERT INTO worker_heartbeats
                       (worker_id, handlers, host, pid, version, started_at, last_seen_at, processed, failed, stopped_at)
                     VALUES ($1, $2, $3, $4, $5, $6, now(), $7, $8, CASE WHEN $9 THEN now() END)
                     ON CONFLICT (worker_id) DO UPDATE SET last_seen_at = now(),
                       processed = EXCLUDED.processed, failed = EXCLUDED.failed,
                       stopped_at = EXCLUDED.stopped_at",
                    &[
                        &self.id,
                        &self.handlers,
                        &host,
                        &(std::process::id() as i32),
                        &env!("CARGO_PKG_VERSION"),
                        &self.started,
                        &processed,
                        &failed,
                        &stopping,
                    ],
                )
                .await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %format!("{e:#}"), "heartbeat failed");
        }
    }
}

/// This machine's host name, for heartbeats.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn a_worker_runs_on_one_thread_unless_told_otherwise() {
        let cli = super::WorkerCli::try_parse_from(["orderfleet-worker", "--handler", "orders"])
            .expect("parses");
        if std::env::var_os("ORDERFLEET_WORKER_THREADS").is_none() {
            assert_eq!(cli.worker.worker_threads, 1);
        }
        let one = super::runtime(1).expect("runtime");
        assert_eq!(one.metrics().num_workers(), 1);
        let per_cpu = super::runtime(0).expect("runtime");
        assert_eq!(
            per_cpu.metrics().num_workers(),
            std::thread::available_parallelism().map_or(1, usize::from)
        );
        let cli = super::WorkerCli::try_parse_from([
            "orderfleet-worker",
            "--handler",
            "orders",
            "--worker-threads",
            "3",
        ])
        .expect("parses");
        let three = super::runtime(cli.worker.worker_threads).expect("runtime");
        assert_eq!(three.metrics().num_workers(), 3);
    }
}
