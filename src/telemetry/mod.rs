//! What the fleet tells its operators: counters, their CloudWatch embedded-metric lines, and
//! the process's logging.

pub mod emf;
pub mod logging;
pub mod metrics;
