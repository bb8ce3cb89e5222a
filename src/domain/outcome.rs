//! Typed handler outcomes: what the runtime must do with a message when a handler fails.
//!
//! Classification happens where a library error is converted (see the `From` impls and
//! [`HandlerError::from_db`]), never by downcasting later.

use std::time::Duration;

/// Why a message failed, and therefore what happens to it next.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A transient failure: the message becomes visible again after a backoff (or after
    /// `after`, when the handler knows better), and SQS redelivers it.
    #[error("retryable: {reason}")]
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The message is well formed but can never succeed (unknown detail-type, a business rule
    /// that forbids it). It goes straight to the DLQ with the reason.
    #[error("permanent: {reason}")]
    Permanent { reason: String },
    /// The message could not be decoded at all. It goes straight to the DLQ with the reason.
    #[error("poison: {reason}")]
    Poison { reason: String },
}

/// The failure kind recorded on a dead-lettered message (`orderfleet.failure.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Permanent,
    Poison,
    /// Retries ran out: the message reached maxReceiveCount while still failing.
    Exhausted,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Permanent => "permanent",
            FailureKind::Poison => "poison",
            FailureKind::Exhausted => "exhausted",
        }
    }
}

impl HandlerError {
    pub fn retry(reason: impl Into<String>) -> Self {
        HandlerError::Retry {
            reason: reason.into(),
            after: None,
        }
    }

    pub fn retry_after(reason: impl Into<String>, after: Duration) -> Self {
        HandlerError::Retry {
            reason: reason.into(),
            after: Some(after),
        }
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        HandlerError::Permanent {
            reason: reason.into(),
        }
    }

    pub fn poison(reason: impl Into<String>) -> Self {
        HandlerError::Poison {
            reason: reason.into(),
        }
    }

    /// Short, bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            HandlerError::Retry { .. } => "retry",
            HandlerError::Permanent { .. } => "permanent",
            HandlerError::Poison { .. } => "poison",
        }
    }

    /// Classifies a PostgreSQL error. Connection loss, serialization failures, deadlocks and
    /// resource exhaustion are worth retrying; data and integrity errors are not, because the
    /// same message will hit them again.
    pub fn from_db(context: &str, err: &tokio_postgres::Error) -> Self {
        let reason = format!("{context}: {}", error_chain(err));
        match err.code() {
            None => HandlerError::retry(reason), // closed connection, I/O error
            Some(code) => {
                let c = code.code();
                let transient = c.starts_with("08") // connection exception
                    || c.starts_with("40") // transaction rollback: serialization, deadlock
                    || c.starts_with("53") // insufficient resources
                    || c.starts_with("57") // operator intervention: admin shutdown
                    || c == "55P03"; // lock not available
                if transient {
                    HandlerError::retry(reason)
                } else {
                    HandlerError::permanent(reason)
                }
            }
        }
    }
}

impl From<tokio_postgres::Error> for HandlerError {
    fn from(err: tokio_postgres::Error) -> Self {
        HandlerError::from_db("database", &err)
    }
}

impl From<deadpool_postgres::PoolError> for HandlerError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        // Every pool error (timeout, refused connection) is about availability, not about the
        // message, so it is worth retrying.
        HandlerError::retry(format!("database pool: {}", error_chain(&err)))
    }
}

/// Renders an error with its whole cause chain: `outer: inner: root`.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
