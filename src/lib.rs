//! # orderfleet
//!
//! A fleet of SQS workers that process a retail store's orders in real time.
//!
//! # Layout
//!
//! - [`runtime`]: the SQS consumer, written once: receive loops with back pressure, batched
//!   deletes, leases, typed outcomes, the DLQ, graceful shutdown.
//! - [`handlers`]: the business logic of each worker, one file each; knows nothing of SQS.
//! - [`outbox`]: the inbox (idempotency) and the outbox with its relay to EventBridge.
//! - [`envelope`]: the EventBridge event as it arrives in an SQS body.
//! - [`catalogue`]: every event type, its producer and consumers; drives routing.
//! - [`topology`]: bus, queues, DLQs and rules as data; [`provision`] applies it.
//! - [`db`]: the PostgreSQL pool and migrations.
//! - [`worker`]: the `orderfleet-worker` process: wiring, signals, heartbeats.
//! - [`aws`]: AWS SDK clients from the environment.
//! - [`bench_sqs`]: an in-memory SQS endpoint for benchmarks.
//! - [`outcome`], [`metrics`]: typed failures and counters.

pub mod aws;
pub mod bench_sqs;
pub mod catalogue;
pub mod cli;
pub mod db;
pub mod envelope;
pub mod handlers;
pub mod metrics;
pub mod outbox;
pub mod outcome;
pub mod provision;
pub mod runtime;
pub mod topology;
pub mod worker;
