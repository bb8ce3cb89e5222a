//! The payment provider behind the payments handler: a trait, and the [`SandboxProvider`] that
//! is the default.
//!
//! Every call carries an idempotency key (`auth:<order_id>`, `capture:<order_id>`, ...). A
//! provider must return the first outcome again for a key it has seen, without moving money a
//! second time. That is what makes a retried message safe: when the provider charged but our
//! transaction rolled back, the retry sends the same key and gets the same authorization back.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::domain::events::Money;
use crate::domain::outcome::error_chain;
use crate::store::db::Cached;

/// One call to the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderRequest {
    /// Same key, same outcome: the provider applies a key at most once.
    pub idempotency_key: String,
    /// The customer's payment token from the storefront.
    pub payment_token: String,
    pub amount: Money,
    /// The authorization a capture, void or refund refers to.
    pub authorization_id: Option<String>,
}

/// What the provider decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ProviderOutcome {
    /// Done; `reference` is the provider's id for it (authorization, capture or refund id).
    Approved { reference: String },
    /// Refused for good (e.g. `card_declined`, `insufficient_funds`).
    Declined { code: String, message: String },
}

/// A call that did not reach a decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Try again later with the same key (timeouts, 5xx, rate limits).
    #[error("payment provider unavailable: {0}")]
    Transient(String),
    /// The request itself is wrong; retrying cannot help.
    #[error("payment provider refused the request: {0}")]
    Invalid(String),
}

/// A payment provider. Each method is idempotent on `req.idempotency_key`.
#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// Places a hold of `req.amount` on the customer's payment method.
    async fn authorize(&self, req: &ProviderRequest) -> Result<ProviderOutcome, ProviderError>;
    /// Takes the held amount.
    async fn capture(&self, req: &ProviderRequest) -> Result<ProviderOutcome, ProviderError>;
    /// Releases a hold that was not captured.
    async fn void(&self, req: &ProviderRequest) -> Result<ProviderOutcome, ProviderError>;
    /// Gives captured money back.
    async fn refund(&self, req: &ProviderRequest) -> Result<ProviderOutcome, ProviderError>;

    /// True when a call costs no remote wait (a sandbox without latency), so the payments
    /// handler may group several events in one transaction.
    fn answers_locally(&self) -> bool {
        false
    }
}

/// The sandbox's tokens and what they do.
pub mod tokens {
    /// Authorization is declined with `card_declined`.
    pub const DECLINE: &str = "tok_decline";
    /// Authorization is declined with `insufficient_funds`.
    pub const INSUFFICIENT_FUNDS: &str = "tok_insufficient_funds";
    /// Authorization is approved; the capture is declined with `capture_declined`.
    pub const CAPTURE_DECLINE: &str = "tok_capture_decline";
    /// `tok_flaky_N`: the first N calls for each idempotency key fail transiently, then the
    /// call succeeds.
    pub const FLAKY_PREFIX: &str = "tok_flaky_";
    /// Any other token is approved; this one is the conventional choice.
    pub const APPROVE: &str = "tok_visa";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Authorize,
    Capture,
    Void,
    Refund,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Authorize => "authorize",
            Operation::Capture => "capture",
            Operation::Void => "void",
            Operation::Refund => "refund",
        }
    }

    fn reference_prefix(self) -> &'static str {
        match self {
            Operation::Authorize => "auth_",
            Operation::Capture => "cap_",
            Operation::Void => "void_",
            Operation::Refund => "ref_",
        }
    }
}

/// A deterministic provider for local runs and tests. Its memory of each idempotency key is
/// the table `sandbox_provider_calls`, written on its own connection outside the caller's
/// transaction (a real provider is another system): it survives restarts and is shared by
/// every worker instance.
///
/// Outcomes by token (see [`tokens`]): `tok_decline` and `tok_insufficient_funds` decline an
/// authorization; `tok_capture_decline` declines the capture; `tok_flaky_N` fails the first N
/// calls of each key transiently; anything else is approved. Other captures, voids and refunds
/// are approved unless flaky. References are derived
/// from the key, so a replay returns the same one.
#[derive(Clone)]
pub struct SandboxProvider {
    pool: Pool,
    latency: Duration,
}

impl SandboxProvider {
    /// A sandbox keeping its state through `pool`, taking `latency` per call.
    ///
    /// Each call holds one connection of `pool` while the caller's handler holds another, so
    /// give the payments handler fewer concurrent messages than `pool` has connections, or give
    /// the sandbox a pool of its own.
    pub fn new(pool: Pool, latency: Duration) -> Self {
        SandboxProvider { pool, latency }
    }

    async fn call(
        &self,
        op: Operation,
        req: &ProviderRequest,
    ) -> Result<ProviderOutcome, ProviderError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let transient = |what: &str, e: &(dyn std::error::Error + 'static)| {
            ProviderError::Transient(format!("sandbox {what}: {}", error_chain(e)))
        };
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| transient("connecting", &e))?;
        // One statement per call: it counts the call and, unless this call is one of the
        // simulated failures, records the outcome; a replay finds the outcome already there
        // and gets it back unchanged. The row lock of the upsert serialises concurrent calls
        // with one key, as a real provider would.
        let outcome = decide(op, req);
        let decision = serde_json::to_value(&outcome)
            .map_err(|e| ProviderError::Invalid(format!("encoding the sandbox result: {e}")))?;
        let failing_calls =
            i32::try_from(flaky_failures(&req.payment_token).unwrap_or(0)).unwrap_or(i32::MAX);
        let row = client
            .query_opt_cached(
                "INSERT INTO sandbox_provider_calls AS c
                     (idempotency_key, operation, payment_token, amount_minor, currency, attempts,
                      result, decided_at)
                 VALUES ($1, $2, $3, $4, $5, 1,
                         CASE WHEN 1 > $6 THEN $7::jsonb END, CASE WHEN 1 > $6 THEN now() END)
                 ON CONFLICT (idempotency_key) DO UPDATE
                     SET attempts = c.attempts + 1, last_call_at = now(),
                         result = coalesce(c.result, CASE WHEN c.attempts + 1 > $6 THEN $7::jsonb END),
                         decided_at = coalesce(c.decided_at, CASE WHEN c.attempts + 1 > $6 THEN now() END)
                     WHERE c.operation = EXCLUDED.operation
                 RETURNING attempts, result",
                &[
                    &req.idempotency_key,
                    &op.as_str(),
                    &req.payment_token,
                    &req.amount.amount_minor,
                    &req.amount.currency.as_str(),
                    &failing_calls,
                    &decision,
                ],
            )
            .await
            .map_err(|e| transient("recording the call", &e))?;
        let Some(row) = row else {
            return Err(ProviderError::Invalid(format!(
                "idempotency key {} was used for another operation than {}",
                req.idempotency_key,
                op.as_str()
            )));
        };
        let (attempts, result): (i32, Option<serde_json::Value>) = (row.get(0), row.get(1));
        match result {
            Some(result) => serde_json::from_value(result).map_err(|e| {
                ProviderError::Invalid(format!("stored sandbox result is unreadable: {e}"))
            }),
            None => Err(ProviderError::Transient(format!(
                "sandbox: simulated outage, call {attempts} of {failing_calls} failing calls for {}",
                req.idempotency_key
            ))),
        }
    }
}

/// N of a `tok_flaky_N` token.
fn flaky_failures(token: &str) -> Option<u32> {
    token.strip_prefix(tokens::FLAKY_PREFIX)?.parse().ok()
}

fn decide(op: Operation, req: &ProviderRequest) -> ProviderOutcome {
    if op == Operation::Authorize {
        match req.payment_token.as_str() {
            tokens::DECLINE => {
                return ProviderOutcome::Declined {
                    code: "card_declined".into(),
                    message: "the card was declined".into(),
                }
            }
            tokens::INSUFFICIENT_FUNDS => {
                return ProviderOutcome::Declined {
                    code: "insufficient_funds".into(),
                    message: "the card has insufficient funds".into(),
                }
            }
            _ => {}
        }
    }
    if op == Operation::Capture && req.payment_token == tokens::CAPTURE_DECLINE {
        return ProviderOutcome::Declined {
            code: "capture_declined".into(),
            message: "the capture was declined".into(),
        };
    }
    ProviderOutcome::Approved {
        reference: reference(op, &req.idempotency_key),
    }
}

/// A stable provider reference for a key: the same key always yields the same id.
fn reference(op: Operation, key: &str) -> String {
    let digest = Md5::digest(key.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{}{hex}", op.reference_prefix())
}

#[async_trait]
impl PaymentProvider for SandboxProvider {
    fn answers_locally(&self) -> bool {
        self.latency.is_zero()
    }

    async fn authorize(&self, req: &ProviderRequest) -> Result<ProviderOutcome, ProviderError> {
        self.call(Operation::Authorize, req).await
    }
    async fn capture(&self, req: &ProviderRequest) -> Result<ProviderOutcome, ProviderError> {
        self.call(Operation::Capture, req).await
    }
    async fn void(&self, req: &ProviderRequest) -> Result<ProviderOutcome, ProviderError> {
        self.call(Operation::Void, req).await
    }
    async fn refund(&self, req: &ProviderRequest) -> Result<ProviderOutcome, ProviderError> {
        self.call(Operation::Refund, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flaky_tokens_name_their_failure_count() {
        assert_eq!(flaky_failures("tok_flaky_3"), Some(3));
        assert_eq!(flaky_failures("tok_flaky_x"), None);
        assert_eq!(flaky_failures("tok_visa"), None);
    }

    #[test]
    fn references_are_stable_per_key() {
        assert_eq!(
            reference(Operation::Authorize, "auth:o1"),
            reference(Operation::Authorize, "auth:o1")
        );
        assert_ne!(
            reference(Operation::Authorize, "auth:o1"),
            reference(Operation::Authorize, "auth:o2")
        );
        assert!(reference(Operation::Capture, "k").starts_with("cap_"));
    }
}
