//! # orderfleet-bench
//!
//! The benchmarks behind `make bench`, apart from the fleet so that the worker neither compiles
//! nor links what only they need.
//!
//! - [`sqs`]: a small in-memory SQS endpoint (AWS JSON 1.0), run as the
//!   `orderfleet-bench-sqs` process, for measuring a consumer without the emulator's cost.
//! - [`events`]: the same endpoint's EventBridge (AWS JSON 1.1): buses, rules matched as
//!   EventBridge matches them, and delivery of matched events into the endpoint's queues, so
//!   that a whole fleet (workers and `orderfleet provision`) can run against it.
//! - [`consumer`]: the runtime benchmark: the fleet's consumer draining that endpoint.
//! - [`saga`]: the order saga in process on real PostgreSQL, complete orders per second.
//! - [`fleet`]: complete orders per second through real worker processes, the endpoint and
//!   PostgreSQL, and what each order costs on AWS ([`cost`]); `orderfleet-bench-fleet`.
//!
//! `orderfleet-bench` runs both and prints their figures; docs/BENCHMARKS.md has the results.

pub mod consumer;
pub mod cost;
pub mod events;
pub mod fleet;
pub mod saga;
pub mod sqs;
