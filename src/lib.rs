//! # orderfleet
//!
//! A fleet of SQS workers that process a retail store's orders in real time.
//!
//! # Layout
//!
//! Each folder is one layer, and a layer uses only the layers below it (`tests/it/layering.rs`
//! checks the `crate::` paths of every file against this order, top to bottom). Every module:
//!
//! 1. `src/bin/`: the two binaries; they parse arguments and hand over.
//! 2. [`worker`] (the `orderfleet-worker` process: wiring and flags in `mod.rs`,
//!    [`worker::deps`] the handlers' dependencies, [`worker::health`]) and [`cli`] (one module
//!    per `orderfleet` command: `customer`, `lake`, `migrate`, `provision`, `publish`,
//!    `report`, `seed`, `status`, `wait`, `dlq/{peek, redrive, export, import, purge, cancel}`;
//!    and
//!    [`cli::simulator`], the storefront behind `seed` and `publish`, with its
//!    [`cli::simulator::bus`] publisher).
//! 3. [`operator`]: what `status`, `dlq` and `report` do: [`operator::queue`] (naming a
//!    queue), [`operator::scan`], [`operator::message`], [`operator::filter`],
//!    [`operator::plan`], [`operator::mover`] with its crash-safe [`operator::journal`],
//!    [`operator::native`] (SQS's own redrive), [`operator::export`], [`operator::rate`],
//!    [`operator::progress`], [`operator::status`], [`operator::report`]'s invariants,
//!    [`operator::erasure`] (`customer forget`), [`operator::suppressions`] (`email
//!    suppressions`).
//! 4. [`runtime`]: the SQS consumer, written once: its settings and queue checks (`mod.rs`),
//!    [`runtime::consumer`]'s receive loops and outcomes, [`runtime::execute`]'s one-event
//!    transaction, [`runtime::group`] commit, [`runtime::lease`], [`runtime::acker`],
//!    [`runtime::backoff`], [`runtime::retention`] (the event-age rule), [`runtime::notify`]
//!    (systemd).
//! 5. [`handlers`]: the handler contract in `mod.rs` and one module per worker:
//!    [`handlers::orders`] (`saga`, `store`, `validate`), [`handlers::payments`] (`store`),
//!    [`handlers::inventory`] (`store`), [`handlers::fulfillment`],
//!    [`handlers::notifications`], [`handlers::analytics`], [`handlers::personalization`]: the
//!    business logic, knowing nothing of SQS.
//! 6. [`providers`]: the outside world: [`providers::payment`], [`providers::carrier`] and
//!    [`providers::email`] (templates, views, SMTP/SES/file transports), each with its
//!    sandbox.
//! 7. [`store`]: PostgreSQL: [`store::db`] (pool, TLS, migrations), [`store::inbox`] (and its
//!    retention), [`store::outbox`] with its relay to EventBridge, [`store::ledger`],
//!    [`store::lake`] (the lake outbox, its Firehose shipper, [`store::lake::reader`]),
//!    [`store::recommendations`].
//! 8. [`infra`] ([`infra::aws`] clients, [`infra::topology`], [`infra::provision`]) and, beside
//!    it, [`sqs`] ([`sqs::queue`] lookup and checks, [`sqs::attrs`], the message attributes
//!    the runtime writes and the operator reads).
//! 9. [`telemetry`]: [`telemetry::metrics`] counters, [`telemetry::emf`] (CloudWatch embedded
//!    metrics), [`telemetry::logging`].
//! 10. [`domain`]: what every layer speaks: [`domain::envelope`], [`domain::catalogue`],
//!     [`domain::names`], [`domain::events`], [`domain::money`], [`domain::outcome`],
//!     [`domain::redaction`] (what of an event may reach the lake or a terminal),
//!     [`domain::mask`] (email masking), [`domain::ses`] (SES's bounce and complaint events)
//!     and [`domain::deliverability`] (address hashes, unsubscribe tokens).
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
pub mod sqs;
pub mod store;
pub mod telemetry;
pub mod worker;
