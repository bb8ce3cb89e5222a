//! The parcel carrier behind the fulfillment handler: a trait, and the [`SandboxCarrier`] that
//! is the default.

use async_trait::async_trait;
use md5::{Digest, Md5};

use crate::events::{Address, SkuQuantity};

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
}

/// A parcel carrier. `ship` is idempotent on the order id: asking twice gives the same
/// tracking number.
#[async_trait]
pub trait Carrier: Send + Sync + 'static {
    /// The carrier's name, recorded on the shipment.
    fn name(&self) -> &str;
    async fn ship(&self, parcel: &Parcel<'_>) -> Result<Dispatch, CarrierError>;

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
#[derive(Debug, Clone, Copy, Default)]
pub struct SandboxCarrier;

impl SandboxCarrier {
    /// The tracking number the sandbox gives `order_id`.
    pub fn tracking_number(order_id: &str) -> String {
        let digest = Md5::digest(order_id.as_bytes());
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02X}")).collect();
        format!("SBX{hex}")
    }
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
        if parcel.lines.is_empty() {
            return Err(CarrierError::Refused("the parcel is empty".into()));
        }
        let delivery = if parcel.address.postal_code == UNDELIVERABLE_POSTAL_CODE {
            Delivery::Failed {
                reason: format!(
                    "no such postal code {UNDELIVERABLE_POSTAL_CODE}; the parcel was returned"
                ),
            }
        } else {
            Delivery::Delivered
        };
        Ok(Dispatch {
            tracking_number: Self::tracking_number(parcel.order_id),
            delivery: Some(delivery),
        })
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
