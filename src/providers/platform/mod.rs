//! Writing back to the shop's commerce platform: what the storefront handler tells the platform
//! when the fleet ships, cancels or refunds one of its orders. A trait, [`PlatformApi`], with
//! an implementation per platform ([`shopify::Shopify`], [`commercetools::Commercetools`]) and
//! the [`Sandbox`] that records calls in PostgreSQL for local runs.
//!
//! Idempotency. Neither platform takes an idempotency key on these calls, so each
//! implementation first reads what the order already has (a fulfillment with the tracking
//! number, a cancellation, a refund carrying the call's key) and only acts when it is missing.
//! The storefront handler records every call before it is made (`platform_calls`), so a retry
//! after a crash right after the call finds the effect and returns it instead of acting twice.

use async_trait::async_trait;
use deadpool_postgres::Pool;

use crate::domain::events::{Money, PlatformOrder};
use crate::domain::platform::Platform;
use crate::store::db::Cached;

pub mod commercetools;
pub mod http;
pub mod shopify;

/// One write-back call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub order: PlatformOrder,
    /// The call's key: the same key is the same call, applied at most once.
    pub idempotency_key: String,
}

/// What to write back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The order shipped with `carrier` under `tracking_number`.
    Fulfill {
        carrier: String,
        tracking_number: String,
    },
    /// The order is cancelled (money and stock are the fleet's to settle, not the platform's).
    Cancel { reason: String },
    /// `amount` was refunded to the customer.
    Refund { amount: Money },
}

impl Action {
    /// The operation's name in `platform_calls`.
    pub fn operation(&self) -> &'static str {
        match self {
            Action::Fulfill { .. } => "fulfill",
            Action::Cancel { .. } => "cancel",
            Action::Refund { .. } => "refund",
        }
    }
}

/// A call that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    /// Try again later (network, 5xx, throttled, a concurrent change of the order).
    #[error("{0}")]
    Retry(String),
    /// The platform refused the request; retrying cannot help (bad credentials, an order it
    /// does not have, a user error it names).
    #[error("{0}")]
    Refused(String),
}

/// A commerce platform's API, as far as writing back goes. Each call is idempotent on
/// [`Call::idempotency_key`].
#[async_trait]
pub trait PlatformApi: Send + Sync + 'static {
    fn platform(&self) -> Platform;
    /// Applies `action` to the order; returns the platform's id of what it made or found.
    async fn apply(&self, call: &Call, action: &Action) -> Result<String, PlatformError>;

    /// True when a call costs no remote wait (the sandbox), so the storefront handler may
    /// group several events in one transaction.
    fn answers_locally(&self) -> bool {
        false
    }
}

/// The default for local runs: records each call in `sandbox_platform_calls` once per key and
/// answers as the platform would, so `make run` needs no shop.
pub struct Sandbox {
    platform: Platform,
    pool: Pool,
}

impl Sandbox {
    pub fn new(platform: Platform, pool: Pool) -> Self {
        Sandbox { platform, pool }
    }
}

#[async_trait]
impl PlatformApi for Sandbox {
    fn platform(&self) -> Platform {
        self.platform
    }

    fn answers_locally(&self) -> bool {
        true
    }

    async fn apply(&self, call: &Call, action: &Action) -> Result<String, PlatformError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| PlatformError::Retry(format!("sandbox platform: {e}")))?;
        let reference = format!("sandbox-{}-{}", action.operation(), call.idempotency_key);
        let row = client
            .query_one_cached(
                "INSERT INTO sandbox_platform_calls (idempotency_key, platform, order_ref,
                                                     operation, reference)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (idempotency_key) DO UPDATE SET calls = sandbox_platform_calls.calls + 1
                 RETURNING reference",
                &[
                    &call.idempotency_key,
                    &self.platform.as_str(),
                    &call.order.id,
                    &action.operation(),
                    &reference,
                ],
            )
            .await
            .map_err(|e| PlatformError::Retry(format!("sandbox platform: {e}")))?;
        Ok(row.get(0))
    }
}
