//! In-process counters of one consumer, shared by the runtime, the heartbeat and the EMF
//! metric lines. Every dimension is bounded (handler, outcome): never a message id.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of one handler's consumer.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub succeeded: AtomicU64,
    pub duplicates: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub released: AtomicU64,
    pub empty_receives: AtomicU64,
    pub receive_errors: AtomicU64,
    pub expired_receipts: AtomicU64,
    pub lease_extensions: AtomicU64,
    pub in_flight: AtomicU64,
    pub panics: AtomicU64,
    pub timeouts: AtomicU64,
}

/// A copy of [`Counters`] at one instant.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub received: u64,
    pub succeeded: u64,
    pub duplicates: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub released: u64,
    pub empty_receives: u64,
    pub receive_errors: u64,
    pub expired_receipts: u64,
    pub lease_extensions: u64,
    pub in_flight: u64,
    pub panics: u64,
    pub timeouts: u64,
}

impl Counters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            received: self.received.load(Relaxed),
            succeeded: self.succeeded.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            retried: self.retried.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            released: self.released.load(Relaxed),
            empty_receives: self.empty_receives.load(Relaxed),
            receive_errors: self.receive_errors.load(Relaxed),
            expired_receipts: self.expired_receipts.load(Relaxed),
            lease_extensions: self.lease_extensions.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            panics: self.panics.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
        }
    }
}
