//! The AWS side of the fleet as data and clients.
//!
//! - [`aws`]: AWS SDK clients from the environment, with operation timeouts.
//! - [`topology`]: bus, queues, DLQs and rules as data, derived from the catalogue.
//! - [`provision`]: applies the topology (idempotent).

pub mod aws;
pub mod provision;
pub mod topology;
