//! Retry delays: exponential with jitter, computed from SQS's ApproximateReceiveCount with
//! `backon`, and capped. The receive count is the attempt number, so the schedule survives
//! worker restarts: it lives in SQS, not in process memory.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// The retry schedule of a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt (before jitter).
    pub base: Duration,
    /// No delay exceeds this, jitter included.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(300),
        }
    }
}

/// SQS's limit on a visibility timeout: 12 hours.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

impl RetryPolicy {
    fn builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.base)
            .with_max_delay(self.cap)
            .with_factor(2.0)
            .without_max_times()
    }

    /// The delay after attempt `receive_count` (1-based) failed, with jitter: between the
    /// exponential step and twice it, never above the cap.
    pub fn delay(&self, receive_count: u32) -> Duration {
        let step = receive_count.clamp(1, 64) as usize;
        self.builder()
            .with_jitter()
            .build()
            .nth(step - 1)
            .unwrap_or(self.cap)
            .min(self.cap)
            .min(MAX_VISIBILITY)
    }

    /// The longest a message can spend waiting between `attempts` attempts: every delay at
    /// its jittered maximum. Used at startup to check the schedule fits in the retention.
    pub fn worst_case_total(&self, attempts: u32) -> Duration {
        self.builder()
            .build()
            .take(attempts.saturating_sub(1) as usize)
            .map(|d| (d * 2).min(self.cap))
            .sum()
    }

    /// The delay without jitter (the lower bound of [`RetryPolicy::delay`]).
    pub fn floor(&self, receive_count: u32) -> Duration {
        let step = receive_count.clamp(1, 64) as usize;
        self.builder()
            .build()
            .nth(step - 1)
            .unwrap_or(self.cap)
            .min(self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_within_jitter_and_cap() {
        let p = RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(10),
        };
        for _ in 0..200 {
            for (n, floor) in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (9, 10)] {
                let d = p.delay(n);
                assert!(d >= Duration::from_secs(floor), "attempt {n}: {d:?}");
                assert!(
                    d <= Duration::from_secs((floor * 2).min(10)),
                    "attempt {n}: {d:?}"
                );
            }
        }
        assert_eq!(p.worst_case_total(1), Duration::ZERO);
        assert_eq!(p.worst_case_total(3), Duration::from_secs(2 + 4));
    }
}
