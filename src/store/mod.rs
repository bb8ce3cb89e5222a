//! PostgreSQL, and what the fleet keeps in it beside the handlers' own tables.
//!
//! - [`db`]: the pool, TLS, migrations and the transaction wrapper.
//! - [`inbox`]: the processed-message table that makes every handler idempotent, and its
//!   retention.
//! - [`outbox`]: the events handlers emit, and the relay that publishes them to EventBridge.
//! - [`ledger`]: the double-entry ledger of payments.
//! - [`lake`]: the lake outbox, its Firehose shipper, and reading the lake back.
//! - [`operator_actions`]: the support desk's audited refunds and cancellations.
//! - [`recommendations`]: "bought together" from the personalization worker's co-occurrences.

pub mod db;
pub mod inbox;
pub mod lake;
pub mod ledger;
pub mod operator_actions;
pub mod outbox;
pub mod recommendations;
