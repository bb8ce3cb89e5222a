//! `--rate PER_SEC`: a token bucket that paces sends.

use std::time::Duration;

use tokio::time::Instant;

/// Tokens refill at `rate` per second up to `capacity`; taking more than are there is allowed
/// and returns how long to wait before acting, so the average never exceeds the rate.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `rate` messages a second. The capacity (burst) is one second's worth,
    /// between 1 and 10 (one batch).
    pub fn new(rate: f64) -> Self {
        let rate = rate.max(0.001);
        let capacity = rate.clamp(1.0, 10.0);
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    /// The largest batch worth asking for at once.
    pub fn batch(&self) -> usize {
        (self.capacity.floor() as usize).clamp(1, 10)
    }

    /// Takes `n` tokens; returns how long to wait before using them.
    pub fn take(&mut self, n: usize) -> Duration {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_one_burst_then_paces_at_the_rate() {
        let mut b = TokenBucket::new(5.0);
        assert_eq!(b.batch(), 5);
        assert_eq!(b.take(5), Duration::ZERO);
        let wait = b.take(5);
        assert!((wait.as_secs_f64() - 1.0).abs() < 0.05, "{wait:?}");
        // Unpaid debt adds up: a third batch right away waits two seconds.
        let wait = b.take(5);
        assert!((wait.as_secs_f64() - 2.0).abs() < 0.05, "{wait:?}");
    }

    #[test]
    fn the_batch_stays_between_one_and_ten() {
        assert_eq!(TokenBucket::new(0.5).batch(), 1);
        assert_eq!(TokenBucket::new(300.0).batch(), 10);
    }
}
