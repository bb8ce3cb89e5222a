//! In-process counters of one consumer, shared by the runtime, the heartbeat and the EMF
//! metric lines. Every dimension is bounded (handler, outcome): never a message id.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// At most this many samples of each distribution are kept per flush interval (EMF's limit on
/// values per metric); beyond that, reservoir sampling keeps a uniform sample.
pub const MAX_SAMPLES: usize = 100;

/// A uniform sample of one distribution over a flush interval, plus its exact count and sum.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Samples {
    pub values: Vec<f64>,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Samples {
    pub fn record(&mut self, v: f64) {
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1;
        self.sum += v;
        if self.values.len() < MAX_SAMPLES {
            self.values.push(v);
        } else {
            let i = fastrand::u64(0..self.count) as usize;
            if i < MAX_SAMPLES {
                self.values[i] = v;
            }
        }
    }
}

/// Distributions recorded per message.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Distributions {
    pub handler_duration_ms: Samples,
    pub message_age_ms: Samples,
    pub receive_count: Samples,
}

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
    /// Messages the consumer lets be in flight now: its adaptive target, between one full
    /// receive and `--concurrency` (see `runtime::adapt`). A group commit that counts into
    /// these counters sizes its groups from it.
    pub in_flight_target: AtomicU64,
    /// GetQueueAttributes calls made to read the backlog (only while receives come back full).
    pub backlog_reads: AtomicU64,
    /// The largest group the group commit forms now (0 when the handler does not group).
    pub group_cap: AtomicU64,
    /// Groups committed (or tried) by the group commit, and the events they held: their
    /// ratio over an interval is the mean group size.
    pub groups: AtomicU64,
    pub grouped_events: AtomicU64,
    /// Per-message distributions since the last [`Counters::take_distributions`].
    pub distributions: Mutex<Distributions>,
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
    pub in_flight_target: u64,
    pub backlog_reads: u64,
    pub group_cap: u64,
    pub groups: u64,
    pub grouped_events: u64,
}

impl Counters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Records one handled message.
    pub fn observe(&self, duration_ms: f64, age_ms: Option<f64>, receive_count: u32) {
        let mut d = self.distributions.lock().unwrap_or_else(|p| p.into_inner());
        d.handler_duration_ms.record(duration_ms);
        if let Some(age) = age_ms {
            d.message_age_ms.record(age);
        }
        d.receive_count.record(f64::from(receive_count));
    }

    /// Returns the distributions recorded since the last call and starts new ones.
    pub fn take_distributions(&self) -> Distributions {
        std::mem::take(&mut *self.distributions.lock().unwrap_or_else(|p| p.into_inner()))
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
            in_flight_target: self.in_flight_target.load(Relaxed),
            backlog_reads: self.backlog_reads.load(Relaxed),
            group_cap: self.group_cap.load(Relaxed),
            groups: self.groups.load(Relaxed),
            grouped_events: self.grouped_events.load(Relaxed),
        }
    }
}
