//! The SQS consumer runtime, written once and shared by every handler.
//!
//! Per queue: receive loops long-poll for up to ten messages each, but only ask for as many
//! as there are free in-flight permits (back pressure); the permits follow a target that
//! grows with the queue's backlog up to `--concurrency` and shrinks back to one full receive
//! when it drains ([`adapt`]); each message runs as its own task;
//! deletes go through the batching [`acker::Acker`]; the process-wide [`lease::Leases`] keeps
//! in-flight messages invisible. A handler's typed outcome decides what happens next:
//!
//! | outcome | action |
//! |---|---|
//! | success or duplicate | delete |
//! | retry | ChangeMessageVisibility to the backoff for this receive count |
//! | retry on the last allowed receive | dead-letter as `exhausted` |
//! | permanent, poison | send the body to the DLQ with the reason, then delete |
//! | panic, timeout | retry |
//!
//! Shutdown (see [`Consumer::run`]) starts no new receive but lets the ones in flight return,
//! lets running handlers finish until the grace deadline, makes aborted messages visible at
//! once, and flushes deletes.

pub mod acker;
pub mod adapt;
pub mod backoff;
pub mod consumer;
pub mod execute;
pub mod group;
pub mod lease;
pub mod notify;
pub mod retention;

use std::time::Duration;

use anyhow::{bail, Result};

use crate::sqs::queue::QueueFacts;
use backoff::RetryPolicy;

pub use consumer::Consumer;
pub use execute::{committed, execute, execute_handing_off, Apply, Executed, Transactional};

/// How often the lease task looks for leases to extend.
pub const LEASE_TICK: Duration = Duration::from_secs(1);
/// Slack required on top of the lease tick.
const LEASE_MARGIN: Duration = Duration::from_secs(1);
/// How long past its wait time a ReceiveMessage may take before it is abandoned as stalled.
pub const RECEIVE_SLACK: Duration = Duration::from_secs(5);
/// What a stop needs after the handlers' grace: flushing deletes, releasing what was aborted,
/// the relay's last publish (2 s) and the final heartbeat.
pub const FLUSH_BUDGET: Duration = Duration::from_secs(5);

/// Settings of one queue's consumer.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub queue_url: String,
    pub dlq_url: String,
    /// Most messages handled at once: the ceiling of the adaptive in-flight target (see
    /// [`adapt`]), which starts at one full receive and grows only with the queue's backlog.
    pub concurrency: usize,
    /// Receive loops; each holds up to ten permits while it polls.
    pub receivers: usize,
    pub wait_time_secs: i32,
    /// Visibility set at receive and by each lease extension.
    pub visibility_timeout: Duration,
    pub handler_timeout: Duration,
    pub retry: RetryPolicy,
    /// The queue's maxReceiveCount: on that receive, a retry becomes a dead-letter.
    pub max_receive_count: u32,
    pub delete_flush: Duration,
    /// The longest pause of a receive loop after a receive that came back short but not empty
    /// (the rate messages arrive at sets it below that: `adapt::Arrivals`); and, at
    /// the in-flight ceiling, the longest a loop waits for a full receive's worth of slots.
    pub receive_linger: Duration,
    /// Running handlers get this long to finish after a stop is requested.
    pub shutdown_grace: Duration,
    /// Events older than this (by their EventBridge `time`) are dead-lettered unapplied: the
    /// inbox no longer remembers whether they were applied (see [`retention`]). `None` when
    /// inbox rows are kept forever.
    pub max_event_age: Option<Duration>,
}

impl ConsumerConfig {
    /// The default number of receive loops for a concurrency: enough to keep every permit busy.
    pub fn default_receivers(concurrency: usize) -> usize {
        concurrency.div_ceil(10).clamp(1, 8)
    }
}

/// Checks the settings against the queue. Every error names the flag to change.
pub fn validate(cfg: &ConsumerConfig, facts: &QueueFacts) -> Result<()> {
    if cfg.visibility_timeout < 2 * LEASE_TICK + LEASE_MARGIN {
        bail!(
            "the visibility timeout ({}s) must be at least {}s so that the lease task can extend \
             it before it runs out; raise --visibility-timeout-secs or the queue's VisibilityTimeout",
            cfg.visibility_timeout.as_secs(),
            (2 * LEASE_TICK + LEASE_MARGIN).as_secs()
        );
    }
    if cfg.handler_timeout + LEASE_MARGIN >= backoff::MAX_VISIBILITY {
        bail!(
            "--handler-timeout-secs ({}) plus a margin must stay under SQS's 12-hour visibility \
             ceiling, beyond which a lease cannot keep the message hidden",
            cfg.handler_timeout.as_secs()
        );
    }
    if cfg.shutdown_grace >= Duration::from_secs(3600) {
        bail!("--shutdown-grace-secs must be under an hour");
    }
    let waits = cfg.retry.worst_case_total(facts.max_receive_count);
    let runs = cfg.handler_timeout * facts.max_receive_count;
    if waits + runs >= facts.retention {
        bail!(
            "the retry schedule does not fit the queue: {} attempts with backoff up to {}s can take \
             {}s, but the queue keeps messages only {}s; lower --retry-cap-secs or \
             --retry-base-secs, or raise the queue's MessageRetentionPeriod",
            facts.max_receive_count,
            cfg.retry.cap.as_secs(),
            (waits + runs).as_secs(),
            facts.retention.as_secs()
        );
    }
    if cfg.concurrency == 0 || cfg.receivers == 0 {
        bail!("--concurrency and --receivers must be at least 1");
    }
    Ok(())
}
