//! The operator's toolbox behind `orderfleet status` and `orderfleet dlq`: reading, filtering,
//! moving, exporting and importing dead-lettered messages safely. The CLI modules
//! ([`crate::cli::status`], [`crate::cli::dlq`]) only parse flags and print.
//!
//! # Layout
//!
//! - [`queue`]: which queue a QUEUE argument means; counts.
//! - [`message`]: a dead-lettered message with its envelope and recorded failure.
//! - [`filter`]: the `--filter` language.
//! - [`scan`]: reading a queue without consuming it, and what that does to receive counts.
//! - [`mover`]: the client-side move; [`journal`] makes it crash-safe.
//! - [`native`]: SQS's StartMessageMoveTask family, and recognising endpoints without it.
//! - [`plan`]: peeking and dry runs.
//! - [`export`]: `export` and `import` as JSON lines.
//! - [`status`]: queue depths, CloudWatch ages, move tasks, worker heartbeats.
//! - [`rate`], [`progress`]: pacing and progress on stderr.
//! - [`watch`]: one look at a running fleet (orders, handler rates, depths, emails).

pub mod desk;
pub mod erasure;
pub mod export;
pub mod filter;
pub mod journal;
pub mod message;
pub mod mover;
pub mod native;
pub mod order;
pub mod plan;
pub mod progress;
pub mod queue;
pub mod rate;
pub mod report;
pub mod scan;
pub mod status;
pub mod suppressions;
pub mod watch;
