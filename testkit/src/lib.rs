//! # orderfleet-testkit
//!
//! What the tests and the benchmarks share, kept out of the fleet's library:
//!
//! - [`inproc`]: an in-process fleet driver: the real handlers and runtime, the outbox standing
//!   in for EventBridge and SQS.
//! - [`examples`]: a representative payload of every event type.

pub mod examples;
pub mod inproc;
