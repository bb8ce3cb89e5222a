//! # orderfleet
//!
//! A fleet of SQS workers that process a retail store's orders in real time.
//!
//! # Layout
//!
//! Each folder is one layer, and a layer uses only the layers below it (`tests/it` checks the
//! `use crate::` lines of every file against this order, top to bottom):
//!
//! 1. `src/bin/`: the two binaries; they parse arguments and hand over.
//! 2. [`worker`] (the `orderfleet-worker` process: wiring, arguments, dependencies, signals,
//!    heartbeats, [`worker::health`]) and [`cli`] (one file per `orderfleet` command, and the
//!    storefront [`cli::simulator`] behind `seed` and `publish`).
//! 3. [`operator`]: what `orderfleet status`, `dlq` and `report` do: peek, filter, redrive with a
//!    crash-safe journal, export/import, fleet status, [`operator::report`]'s invariants.
//! 4. [`runtime`]: the SQS consumer, written once: receive loops with back pressure, batched
//!    deletes, leases, typed outcomes, the DLQ, group commit, graceful shutdown, retention.
//! 5. [`handlers`]: the handler contract in `mod.rs` and one module per worker: the business
//!    logic, knowing nothing of SQS.
//! 6. [`providers`]: the outside world: the payment provider, the carrier and customer email,
//!    each with its sandbox.
//! 7. [`store`]: PostgreSQL: the pool and migrations, the inbox and the outbox with its relay to
//!    EventBridge, the double-entry ledger, the lake outbox and its Firehose shipper, the
//!    recommendations table.
//! 8. [`infra`]: AWS clients, the topology (bus, queues, DLQs, rules as data) and provisioning.
//! 9. [`telemetry`]: counters, CloudWatch embedded metrics, logging.
//! 10. [`domain`]: what every layer speaks: the envelope, the event catalogue and handler names,
//!     typed events and money, typed outcomes.
//!
//! The benchmarks (`bench/`), the in-process test fleet (`testkit/`) and the CloudFormation
//! generator (`xtask/`) are packages of their own in the workspace.

pub mod cli;
pub mod domain;
pub mod handlers;
pub mod infra;
pub mod operator;
pub mod providers;
pub mod runtime;
pub mod store;
pub mod telemetry;
pub mod worker;
