//! # orderfleet
//!
//! A fleet of SQS workers that process a retail store's orders in real time.
//!
//! # Layout
//!
//! - [`runtime`]: the SQS consumer, written once: receive loops with back pressure, batched
//!   deletes, leases, typed outcomes, the DLQ, graceful shutdown, inbox retention.
//! - [`handlers`]: the business logic of each worker, one file each; knows nothing of SQS.
//! - [`outbox`]: the inbox (idempotency) and the outbox with its relay to EventBridge.
//! - [`envelope`]: the EventBridge event as it arrives in an SQS body.
//! - [`catalogue`]: every event type, its producer and consumers; drives routing.
//! - [`events`]: the typed payload of every event: money, currencies, versions.
//! - [`email`]: customer emails: templates, lettre messages, the file, SMTP and SES v2
//!   transports, address masking.
//! - [`ledger`]: the double-entry ledger of payments.
//! - [`payment_provider`], [`carrier`]: the outside world of payments and fulfillment, with
//!   deterministic sandboxes.
//! - [`topology`]: bus, queues, DLQs and rules as data; [`provision`] applies it.
//! - [`db`]: the PostgreSQL pool and migrations.
//! - [`worker`]: the `orderfleet-worker` process: wiring, signals, heartbeats.
//! - [`aws`]: AWS SDK clients from the environment.
//! - [`operator`]: what `orderfleet status` and `orderfleet dlq` do: peek, filter, redrive
//!   with a crash-safe journal, export/import, fleet status.
//! - [`simulator`]: the storefront simulator behind `orderfleet seed` and `orderfleet publish`.
//! - [`report`]: orders, stock, ledger totals and the invariants of `orderfleet report`.
//! - [`lake`]: the S3 data lake: the lake outbox, its Firehose shipper, reading it back.
//! - [`recommendations`]: "bought together" recommendations from the personalization worker's
//!   co-occurrence table.
//! - [`outcome`], [`metrics`]: typed failures and counters.

pub mod aws;
pub mod carrier;
pub mod catalogue;
pub mod cli;
pub mod db;
pub mod email;
pub mod emf;
pub mod envelope;
pub mod events;
pub mod handlers;
pub mod health;
pub mod lake;
pub mod ledger;
pub mod metrics;
pub mod operator;
pub mod outbox;
pub mod outcome;
pub mod payment_provider;
pub mod provision;
pub mod recommendations;
pub mod report;
pub mod runtime;
pub mod simulator;
pub mod topology;
pub mod worker;
