//! The outside world the handlers call: each a trait, a production implementation where there
//! is one, and a deterministic sandbox that is the local default.
//!
//! - [`payment`]: the payment provider (authorize, capture, void, refund).
//! - [`carrier`]: the parcel carrier (ship, cancel).
//! - [`platform`]: the shop's commerce platform (write-back of shipments, cancellations, refunds).
//! - [`email`]: customer emails: templates, lettre messages, file, SMTP and SES v2 transports.

pub mod carrier;
pub mod email;
pub mod payment;
pub mod platform;
