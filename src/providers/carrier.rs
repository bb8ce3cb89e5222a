//! The parcel carrier behind the fulfillment handler: a trait, and the [`SandboxCarrier`] that
//! is the default.
//!
//! Every call carries the order id as its idempotency key: a carrier must give the same parcel
//! (the same tracking number) for a key it has seen, without creating a second one, and a
//! cancellation of a key it never shipped must stop any later `ship` of that key. That is what
//! lets fulfillment ask again after a crash, and stop a parcel it cannot tell was handed over.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use md5::{Digest, Md5};

use crate::domain::events::{Address, SkuQuantity};
use crate::domain::outcome::error_chain;
use crate::store::db::Cached;

/// A parcel to hand to the carrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parcel<'a> {
    /// Also the idempotency key: one order, one shipment.
    pub order_id: &'a str,
    pub address: &'a Address,
    pub lines: &'a [SkuQuantity],
}

/// What the carrier reports about a parcel it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub tracking_number: String,
    /// Where the parcel ended up, when the carrier knows at once (the sandbox always does).
    pub delivery: Option<Delivery>,
}

/// The end of a parcel's journey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// The parcel came back to the warehouse.
    Failed {
        reason: String,
    },
}

/// A carrier refused or could not be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CarrierError {
    #[error("carrier unavailable: {0}")]
    Transient(String),
    #[error("carrier refused the parcel: {0}")]
    Refused(String),
    /// The key was cancelled ([`Carrier::cancel`]) before or after it shipped; no parcel is
    /// live for it.
    #[error("the parcel was cancelled at the carrier")]
    Cancelled,
}

/// What [`Carrier::cancel`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancellation {
    /// No parcel is live for the key, now or later: it was recalled, or never created and
    /// will not be.
    Cancelled,
    /// The parcel left the depot; it cannot be stopped any more.
    TooLate,
}

/// A parcel carrier. `ship` and `cancel` are idempotent on the order id: asking twice gives the
/// same tracking number, or the same cancellation.
#[async_trait]
pub trait Carrier: Send + Sync + 'static {
    /// The carrier's name, recorded on the shipment.
    fn name(&self) -> &str;
    async fn ship(&self, parcel: &Parcel<'_>) -> Result<Dispatch, CarrierError>;
    /// Stops the parcel of `order_id`, shipped or not yet: after [`Cancellation::Cancelled`],
    /// `ship` of that key answers [`CarrierError::Cancelled`].
    async fn cancel(&self, order_id: &str) -> Result<Cancellation, CarrierError>;

    /// Ships several parcels: one answer per parcel, in the order given, each as `ship` would
    /// give it. A carrier with a batch endpoint overrides this; the default asks one by one.
    async fn ship_all(&self, parcels: &[Parcel<'_>]) -> Vec<Result<Dispatch, CarrierError>> {
        let mut answers = Vec::with_capacity(parcels.len());
        for parcel in parcels {
            answers.push(self.ship(parcel).await);
        }
        answers
    }

    /// True when shipping costs no remote wait (the sandbox), so the fulfillment handler may
    /// group several events in one transaction.
    fn answers_locally(&self) -> bool {
        false
    }
}

/// The postal code the sandbox cannot deliver to: the parcel is returned (`DeliveryFailed`).
pub const UNDELIVERABLE_POSTAL_CODE: &str = "00000";

/// A deterministic carrier: the tracking number is `SBX` and 12 hex digits of a hash of the
/// order id; every parcel is delivered at once, except to [`UNDELIVERABLE_POSTAL_CODE`].
///
/// Its memory of each key is the table `sandbox_carrier_parcels`, written on its own
/// connection outside the caller's transaction (a real carrier is another system): it survives
/// restarts and is shared by every worker instance. A cancellation always succeeds (the
/// sandbox's parcels wait at the depot until collected, which it never simulates), and is kept
/// even for a key never shipped, so that a `ship` arriving after it is refused.
#[derive(Clone)]
pub struct SandboxCarrier {
    pool: Pool,
}

impl SandboxCarrier {
    /// A sandbox keeping its parcels through `pool`. Each call holds one connection of `pool`
    /// while the caller's handler holds another: give it a pool of its own, or a larger one.
    pub fn new(pool: Pool) -> Self {
        SandboxCarrier { pool }
    }

    /// The tracking number the sandbox gives `order_id`.
    pub fn tracking_number(order_id: &str) -> String {
        let digest = Md5::digest(order_id.as_bytes());
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02X}")).collect();
        format!("SBX{hex}")
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, CarrierError> {
        self.pool.get().await.map_err(|e| {
            CarrierError::Transient(format!("sandbox carrier connecting: {}", error_chain(&e)))
        })
    }
}

impl SandboxCarrier {
    /// Records a ship call for each of `keys` (distinct, sorted) and says, per key, whether it
    /// was cancelled before. The upsert's row locks serialise calls with one key, as a real
    /// carrier would; a cancelled key stays unshipped.
    async fn record_shipped(&self, keys: &[&str]) -> Result<HashMap<String, bool>, CarrierError> {
        let tracking: Vec<String> = keys.iter().map(|k| Self::tracking_number(k)).collect();
        let rows = self
            .client()
            .await?
            .query_cached(
                "INSERT INTO sandbox_carrier_parcels AS p
                     (idempotency_key, tracking_number, ship_calls, shipped_at)
                 SELECT k, t, 1, now() FROM unnest($1::text[], $2::text[]) AS u(k, t)
                 ON CONFLICT (idempotency_key) DO UPDATE
                     SET ship_calls = p.ship_calls + 1,
                         shipped_at = CASE WHEN p.cancelled_at IS NULL
                                           THEN coalesce(p.shipped_at, now())
                                           ELSE p.shipped_at END
                 RETURNING idempotency_key, cancelled_at IS NOT NULL",
                &[&keys, &tracking],
            )
            .await
            .map_err(|e| transient("recording the parcels", &e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// What the sandbox reports for a parcel it accepted.
    fn dispatch(parcel: &Parcel<'_>) -> Dispatch {
        let delivery = if parcel.address.postal_code == UNDELIVERABLE_POSTAL_CODE {
            Delivery::Failed {
                reason: format!(
                    "no such postal code {UNDELIVERABLE_POSTAL_CODE}; the parcel was returned"
                ),
            }
        } else {
            Delivery::Delivered
        };
        Dispatch {
            tracking_number: Self::tracking_number(parcel.order_id),
            delivery: Some(delivery),
        }
    }
}

fn transient(what: &str, e: &tokio_postgres::Error) -> CarrierError {
    CarrierError::Transient(format!("sandbox carrier {what}: {}", error_chain(e)))
}

#[async_trait]
impl Carrier for SandboxCarrier {
    fn name(&self) -> &str {
        "sandbox"
    }

    fn answers_locally(&self) -> bool {
        true
    }

    async fn ship(&self, parcel: &Parcel<'_>) -> Result<Dispatch, CarrierError> {
        self.ship_all(std::slice::from_ref(parcel))
            .await
            .pop()
            .unwrap_or_else(|| Err(CarrierError::Transient("no answer".into())))
    }

    /// One statement for the whole batch, as a carrier's batch endpoint would take it.
    async fn ship_all(&self, parcels: &[Parcel<'_>]) -> Vec<Result<Dispatch, CarrierError>> {
        // The keys to record, once each and sorted (two batches sharing keys lock their rows
        // in one order); an empty parcel is refused without being recorded.
        let keys: Vec<&str> = parcels
            .iter()
            .filter(|p| !p.lines.is_empty())
            .map(|p| p.order_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let recorded = if keys.is_empty() {
            Ok(HashMap::new())
        } else {
            self.record_shipped(&keys).await
        };
        parcels
            .iter()
            .map(|parcel| {
                if parcel.lines.is_empty() {
                    return Err(CarrierError::Refused("the parcel is empty".into()));
                }
                match &recorded {
                    Err(e) => Err(e.clone()),
                    Ok(cancelled) => match cancelled.get(parcel.order_id) {
                        Some(true) => Err(CarrierError::Cancelled),
                        Some(false) => Ok(Self::dispatch(parcel)),
                        None => Err(CarrierError::Transient(format!(
                            "sandbox carrier kept no record of {}",
                            parcel.order_id
                        ))),
                    },
                }
            })
            .collect()
    }

    async fn cancel(&self, order_id: &str) -> Result<Cancellation, CarrierError> {
        self.client()
            .await?
            .execute_cached(
                "INSERT INTO sandbox_carrier_parcels AS p
                     (idempotency_key, tracking_number, cancel_calls, cancelled_at)
                 VALUES ($1, $2, 1, now())
                 ON CONFLICT (idempotency_key) DO UPDATE
                     SET cancel_calls = p.cancel_calls + 1,
                         cancelled_at = coalesce(p.cancelled_at, now())",
                &[&order_id, &Self::tracking_number(order_id)],
            )
            .await
            .map_err(|e| transient("recording the cancellation", &e))?;
        Ok(Cancellation::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_numbers_are_stable_per_order() {
        let a = SandboxCarrier::tracking_number("ord-1");
        assert_eq!(a, SandboxCarrier::tracking_number("ord-1"));
        assert_ne!(a, SandboxCarrier::tracking_number("ord-2"));
        assert!(a.starts_with("SBX") && a.len() == 15, "{a}");
    }
}
