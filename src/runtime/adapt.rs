//! How deep a consumer reaches into its queue: the in-flight target follows the backlog.
//!
//! `--concurrency` is a ceiling, not a setting. A quiet queue is consumed with [`FLOOR`]
//! messages in flight (one full receive), so few of its events wait together and the group
//! commit sees groups of one, each holding its orders' locks briefly. A queue with a backlog
//! grows its target (doubling) up to the ceiling, and with it the largest group
//! ([`group_cap`]), which is where a busy fleet's throughput comes from.
//!
//! [`Depth`] is the pure decision, fed with observations and no clock, so it is tested on its
//! own. Its rules:
//! - a receive that comes back full (as many messages as it asked for) doubles the target, at
//!   most to the ceiling, when either the last backlog reading, less what has been received
//!   since, still exceeds the target, or the receive had to wait for a free slot: every slot
//!   was taken, so the target, not the queue, was what held the consumer back. (The other
//!   loops' long polls hold slots too, so a loop can wait with few messages in flight and then
//!   double the target on a full receive of two or three: the target grows past what the
//!   queue needs, which costs nothing but larger groups when messages queue. Asking also that
//!   the messages in flight fill half the target was measured worse in the fleet benchmark:
//!   docs/BENCHMARKS.md, "What changed since the first series", item 3);
//! - the backlog (ApproximateNumberOfMessages) is only wanted after [`FULL_TO_READ`] full
//!   receives in a row and below the ceiling, so a quiet queue costs no GetQueueAttributes; the
//!   consumer reads it at most every [`BACKLOG_EVERY`];
//! - [`SHORT_TO_SHRINK`] receives in a row that come back short (or empty) halve the target,
//!   at least to the floor, and forget the backlog reading, but only if the most messages in
//!   flight since the last such decision were at most a quarter of the target. A queue that
//!   runs dry between receives but still keeps 30 messages in flight keeps a target of 64:
//!   shrinking it to the floor would make the next second's messages wait in the queue for
//!   slots, and growing back takes full receives. (With half instead of a quarter, a steady 20
//!   in flight swung the target between 20 and 40 on every few receives.)
//!
//! Doubling per full receive rather than per reading lets a large backlog reach the ceiling in
//! a few receives (the reading caps how far it goes), instead of one step every few seconds.
//! Halving needs several short receives so that one unlucky receive on a busy queue does not
//! undo the growth.
//!
//! Before the rule on messages in flight, a steady 700 messages a second (the orders queue
//! at 100 orders a second in the fleet benchmark) swung its target between 10 and 128 several
//! times in eight seconds: the queue ran dry between receives, three short receives took the
//! target back to the floor, and growing again waited for a backlog reading (one every two
//! seconds), while messages sat in the queue (docs/BENCHMARKS.md, "Latency").
//!
//! [`Arrivals`] estimates the rate messages arrive at, which sets the linger after a short
//! receive.
//!
//! [`Limit`] applies the target to the consumer's semaphore without a lock on the hot path:
//! growing adds permits; shrinking forgets the free ones and records the rest as a debt, paid
//! by permits as they come back (one atomic load per message while there is no debt).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The smallest in-flight target: one full receive.
pub const FLOOR: usize = 10;
/// Full receives in a row before the backlog is worth reading.
pub const FULL_TO_READ: u32 = 2;
/// Short or empty receives in a row that halve the target.
pub const SHORT_TO_SHRINK: u32 = 3;
/// Least time between two backlog readings of one consumer.
pub const BACKLOG_EVERY: Duration = Duration::from_secs(2);

/// The in-flight target of one consumer, between its floor and its ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Depth {
    floor: usize,
    cap: usize,
    target: usize,
    /// Messages waiting at the last reading, less those received since; `None` once stale.
    backlog: Option<u64>,
    full_in_a_row: u32,
    short_in_a_row: u32,
    /// The most messages in flight seen since the last shrink decision.
    peak_in_use: usize,
}

/// What one receive saw, for [`Depth::on_receive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Receive {
    /// Messages it asked for.
    pub asked: usize,
    /// Messages it got.
    pub got: usize,
    /// Messages in flight once its own have started (those being handled plus `got`).
    pub in_use: usize,
    /// Whether it had to wait for a free slot before it could ask: every slot was taken.
    pub waited_for_slot: bool,
}

/// A change of the target: from, to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub from: usize,
    pub to: usize,
}

impl Depth {
    /// Starts at the floor ([`FLOOR`], or `cap` when that is smaller).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        let floor = FLOOR.min(cap);
        Depth {
            floor,
            cap,
            target: floor,
            backlog: None,
            full_in_a_row: 0,
            short_in_a_row: 0,
            peak_in_use: 0,
        }
    }

    pub fn target(&self) -> usize {
        self.target
    }

    pub fn floor(&self) -> usize {
        self.floor
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// One receive, as it saw it.
    pub fn on_receive(&mut self, r: Receive) -> Option<Change> {
        if let Some(b) = &mut self.backlog {
            *b = b.saturating_sub(r.got as u64);
        }
        self.peak_in_use = self.peak_in_use.max(r.in_use);
        if r.asked > 0 && r.got >= r.asked {
            self.short_in_a_row = 0;
            self.full_in_a_row = self.full_in_a_row.saturating_add(1);
            if r.waited_for_slot {
                return self.set(self.target * 2);
            }
            self.grow()
        } else {
            self.full_in_a_row = 0;
            self.short_in_a_row += 1;
            if self.short_in_a_row < SHORT_TO_SHRINK {
                return None;
            }
            self.short_in_a_row = 0;
            let peak = std::mem::take(&mut self.peak_in_use);
            if peak * 4 > self.target {
                return None;
            }
            self.backlog = None;
            self.set(self.target / 2)
        }
    }

    /// Whether a backlog reading would be used now: receives keep coming back full and the
    /// target can still grow. The caller adds its own pacing ([`BACKLOG_EVERY`]).
    pub fn wants_backlog(&self) -> bool {
        self.full_in_a_row >= FULL_TO_READ && self.target < self.cap
    }

    /// The queue's ApproximateNumberOfMessages, as just read.
    pub fn on_backlog(&mut self, waiting: u64) -> Option<Change> {
        self.backlog = Some(waiting);
        if self.full_in_a_row >= FULL_TO_READ {
            self.grow()
        } else {
            None
        }
    }

    fn grow(&mut self) -> Option<Change> {
        match self.backlog {
            Some(waiting) if waiting > self.target as u64 => self.set(self.target * 2),
            _ => None,
        }
    }

    fn set(&mut self, to: usize) -> Option<Change> {
        let to = to.clamp(self.floor, self.cap);
        let from = std::mem::replace(&mut self.target, to);
        (from != to).then_some(Change { from, to })
    }
}

/// The largest group a group commit forms when `target` messages are in flight and
/// `transactions` groups run at once: enough for every message in flight to be in a running
/// group, at least 1, at most `max_group` (the flag).
pub fn group_cap(target: usize, transactions: usize, max_group: usize) -> usize {
    (target / transactions.max(1)).clamp(1, max_group.max(1))
}

/// How long [`Arrivals`] counts before it takes a reading of the rate.
pub const ARRIVALS_WINDOW: Duration = Duration::from_millis(100);
/// The time constant of [`Arrivals`]' average: a reading this long weighs 63%.
pub const ARRIVALS_MEMORY: Duration = Duration::from_millis(250);

/// The rate messages arrive at, from what the receives return: the pause after a short
/// receive (the receive linger) lasts about as long as most of a full receive's worth takes
/// to gather (the consumer waits for seven of ten), and at most the `--receive-linger-ms`
/// ceiling. A queue that gets a thousand messages a second waits 7 ms between its short
/// receives, not 20: its receives still come back most of the way full (seven or more
/// instead of ten), and every hop an order crosses through that queue is quicker. A queue
/// that trickles keeps the whole linger, where its receives need it.
///
/// Messages are counted over windows of at least [`ARRIVALS_WINDOW`] (receives of several
/// loops that come back together would otherwise read as a burst), and each window's rate
/// moves the estimate by a weight that grows with the window's length ([`ARRIVALS_MEMORY`]).
/// It is fed observations with the times they were made (it reads no clock of its own), so
/// it is tested without waiting.
#[derive(Debug, Clone, Default)]
pub struct Arrivals {
    window_start: Option<Instant>,
    counted: u64,
    per_sec: Option<f64>,
}

impl Arrivals {
    /// A receive that came back at `at` with `got` messages (none when it was empty).
    pub fn on_receive(&mut self, at: Instant, got: usize) {
        let Some(start) = self.window_start else {
            // Whatever the first receive returned arrived before anyone was counting.
            self.window_start = Some(at);
            return;
        };
        self.counted += got as u64;
        let elapsed = at.saturating_duration_since(start);
        if elapsed < ARRIVALS_WINDOW {
            return;
        }
        let rate = self.counted as f64 / elapsed.as_secs_f64();
        // An average that forgets with time, not with readings: a window of 100 ms moves it a
        // third of the way, twenty quiet seconds of a long poll all the way.
        let weight = 1.0 - (-elapsed.as_secs_f64() / ARRIVALS_MEMORY.as_secs_f64()).exp();
        self.per_sec = Some(match self.per_sec {
            None => rate,
            Some(before) => before + (rate - before) * weight,
        });
        self.window_start = Some(at);
        self.counted = 0;
    }

    /// Messages a second, once a window has been read.
    pub fn per_sec(&self) -> Option<f64> {
        self.per_sec
    }

    /// The pause after a short receive: the time `want` messages take to arrive at the
    /// estimated rate, at most `ceiling` (also the answer before the first reading, and for a
    /// queue nothing arrives at).
    pub fn linger(&self, want: usize, ceiling: Duration) -> Duration {
        match self.per_sec {
            Some(rate) if rate > 0.0 => {
                Duration::try_from_secs_f64(want as f64 / rate).map_or(ceiling, |d| d.min(ceiling))
            }
            _ => ceiling,
        }
    }
}

/// The consumer's in-flight limit: a semaphore whose permits follow the target.
pub struct Limit {
    permits: Arc<Semaphore>,
    /// Permits to forget as they come back, owed by a shrink that found them in use.
    debt: AtomicUsize,
}

impl Limit {
    pub fn new(target: usize) -> Self {
        Limit {
            permits: Arc::new(Semaphore::new(target)),
            debt: AtomicUsize::new(0),
        }
    }

    pub fn semaphore(&self) -> &Arc<Semaphore> {
        &self.permits
    }

    /// Moves the number of permits from `change.from` to `change.to`. Calls must be serialised
    /// (the consumer makes them under its [`Depth`] lock) and follow the targets in order, so
    /// that permits in use plus free never exceed the larger of the two targets.
    pub fn apply(&self, change: Change) {
        if change.to > change.from {
            let mut more = change.to - change.from;
            // Cancel debt first: those permits are still out, and now may stay.
            let owed = self
                .debt
                .fetch_update(Relaxed, Relaxed, |d| Some(d.saturating_sub(more)))
                .unwrap_or(0);
            more -= owed.min(more);
            if more > 0 {
                self.permits.add_permits(more);
            }
        } else {
            let fewer = change.from - change.to;
            let forgotten = self.permits.forget_permits(fewer);
            if fewer > forgotten {
                self.debt.fetch_add(fewer - forgotten, Relaxed);
            }
        }
    }

    /// Gives a permit back, or forgets it while a shrink is owed one.
    pub fn give_back(&self, permit: OwnedSemaphorePermit) {
        if self.debt.load(Relaxed) > 0
            && self
                .debt
                .fetch_update(Relaxed, Relaxed, |d| d.checked_sub(1))
                .is_ok()
        {
            permit.forget();
        }
        // Otherwise dropped here, back into the pool.
    }

    /// Permits in use plus free ones, less the debt: what the limit is now.
    #[cfg(test)]
    fn effective(&self, in_use: usize) -> usize {
        self.permits.available_permits() + in_use - self.debt.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full receive of ten that found a free slot at once, with `in_use` in flight after it.
    fn full(d: &mut Depth) -> Option<Change> {
        d.on_receive(got(10, 10, 10))
    }

    fn got(asked: usize, got: usize, in_use: usize) -> Receive {
        Receive {
            asked,
            got,
            in_use,
            waited_for_slot: false,
        }
    }

    #[test]
    fn a_quiet_queue_stays_at_the_floor_and_never_reads_the_backlog() {
        let mut d = Depth::new(512);
        for _ in 0..1000 {
            assert_eq!(d.on_receive(got(10, 1, 1)), None);
            assert_eq!(d.on_receive(got(10, 0, 0)), None);
            assert!(!d.wants_backlog());
        }
        assert_eq!(d.target(), FLOOR);
        assert_eq!(group_cap(d.target(), 2, 256), 5);
    }

    #[test]
    fn full_receives_without_a_backlog_reading_do_not_grow() {
        let mut d = Depth::new(512);
        assert!(!d.wants_backlog());
        assert_eq!(full(&mut d), None);
        assert_eq!(full(&mut d), None);
        assert!(d.wants_backlog());
        assert_eq!(d.target(), FLOOR);
    }

    #[test]
    fn a_big_backlog_grows_the_target_to_the_cap_and_no_further() {
        let mut d = Depth::new(512);
        full(&mut d);
        full(&mut d);
        assert_eq!(d.on_backlog(100_000), Some(Change { from: 10, to: 20 }));
        let mut seen = vec![d.target()];
        for _ in 0..100 {
            if let Some(c) = full(&mut d) {
                seen.push(c.to);
            }
        }
        assert_eq!(seen, vec![20, 40, 80, 160, 320, 512]);
        assert_eq!(d.target(), 512);
        assert!(!d.wants_backlog(), "at the cap the backlog is not read");
        assert_eq!(d.on_backlog(1_000_000), None);
        assert_eq!(group_cap(d.target(), 2, 256), 256);
        assert_eq!(group_cap(d.target(), 4, 256), 128);
    }

    #[test]
    fn growth_stops_where_the_backlog_reading_runs_out() {
        let mut d = Depth::new(512);
        full(&mut d);
        full(&mut d);
        // 60 waiting: 10 -> 20 at the reading; the next full receive leaves 50 > 20 -> 40;
        // the one after leaves 40, not more than 40.
        d.on_backlog(60);
        assert_eq!(d.target(), 20);
        assert_eq!(full(&mut d), Some(Change { from: 20, to: 40 }));
        assert_eq!(full(&mut d), None);
        assert_eq!(full(&mut d), None);
        assert_eq!(d.target(), 40);
        assert!(d.wants_backlog(), "a fresh reading may allow more");
    }

    #[test]
    fn a_draining_backlog_shrinks_the_target_back_to_the_floor() {
        let mut d = Depth::new(512);
        full(&mut d);
        full(&mut d);
        d.on_backlog(1_000_000);
        while full(&mut d).is_some() {}
        assert_eq!(d.target(), 512);
        // One or two short receives on a busy queue change nothing.
        assert_eq!(d.on_receive(got(10, 7, 7)), None);
        assert_eq!(d.on_receive(got(10, 3, 3)), None);
        assert_eq!(full(&mut d), None);
        assert_eq!(d.target(), 512);
        // Then the queue runs dry.
        let mut seen = Vec::new();
        for _ in 0..100 {
            if let Some(c) = d.on_receive(got(10, 2, 2)) {
                seen.push(c.to);
            }
        }
        assert_eq!(seen, vec![256, 128, 64, 32, 16, 10]);
        assert_eq!(d.target(), FLOOR);
        // And the stale reading is gone: full receives alone do not grow it again.
        assert_eq!(full(&mut d), None);
        assert_eq!(full(&mut d), None);
        assert_eq!(d.target(), FLOOR);
    }

    #[test]
    fn a_steady_stream_that_runs_dry_between_receives_keeps_the_depth_it_uses() {
        let mut d = Depth::new(128);
        full(&mut d);
        full(&mut d);
        d.on_backlog(1_000_000);
        while full(&mut d).is_some() {}
        assert_eq!(d.target(), 128);
        // 700 messages a second at 26 ms each: about 20 in flight, up to 30 in a burst, and
        // most receives come back short because the queue runs dry between them.
        let mut seen = Vec::new();
        for i in 0..1000 {
            let r = if i % 4 == 0 {
                got(10, 10, 30)
            } else {
                got(10, 4, 15 + i % 10)
            };
            if let Some(c) = d.on_receive(r) {
                seen.push(c.to);
            }
        }
        assert_eq!(
            seen,
            vec![64],
            "it settles where 30 in flight use a quarter or more"
        );
        assert_eq!(d.target(), 64);
        assert_eq!(group_cap(d.target(), 2, 64), 32);
        // When the stream stops, the target goes back to the floor.
        for _ in 0..12 {
            d.on_receive(got(10, 0, 0));
        }
        assert_eq!(d.target(), FLOOR);
    }

    #[test]
    fn a_full_receive_that_waited_for_a_slot_doubles_the_target_without_a_reading() {
        let mut d = Depth::new(100);
        let saturated = Receive {
            waited_for_slot: true,
            ..got(10, 10, 10)
        };
        assert!(!d.wants_backlog());
        assert_eq!(d.on_receive(saturated), Some(Change { from: 10, to: 20 }));
        assert_eq!(d.on_receive(saturated), Some(Change { from: 20, to: 40 }));
        // A short receive after waiting says the queue, not the target, ran out: no growth.
        assert_eq!(
            d.on_receive(Receive {
                got: 6,
                ..saturated
            }),
            None
        );
        assert_eq!(d.on_receive(saturated), Some(Change { from: 40, to: 80 }));
        assert_eq!(d.on_receive(saturated), Some(Change { from: 80, to: 100 }));
        assert_eq!(d.on_receive(saturated), None, "never past the ceiling");
        // A full receive that found its slots free does not grow the target without a reading.
        let mut d = Depth::new(100);
        assert_eq!(full(&mut d), None);
        assert_eq!(full(&mut d), None);
        assert_eq!(d.target(), FLOOR);
    }

    #[test]
    fn a_cap_under_the_floor_is_a_fixed_depth() {
        let mut d = Depth::new(4);
        assert_eq!((d.floor(), d.target()), (4, 4));
        d.on_receive(got(4, 4, 4));
        d.on_receive(got(4, 4, 4));
        assert!(!d.wants_backlog());
        assert_eq!(d.on_backlog(1000), None);
        assert_eq!(group_cap(d.target(), 4, 256), 1);
    }

    const CEILING: Duration = Duration::from_millis(20);

    /// Receives of `got` messages every `every`, `n` of them, from `start`; the time after.
    fn steady(a: &mut Arrivals, start: Instant, every: Duration, got: usize, n: u32) -> Instant {
        let mut at = start;
        for _ in 0..n {
            at += every;
            a.on_receive(at, got);
        }
        at
    }

    fn millis(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    #[test]
    fn before_any_reading_the_linger_is_the_ceiling() {
        let mut a = Arrivals::default();
        assert_eq!(a.linger(10, CEILING), CEILING);
        // One receive starts the count; what it returned is not counted.
        a.on_receive(Instant::now(), 10);
        assert_eq!((a.per_sec(), a.linger(10, CEILING)), (None, CEILING));
    }

    #[test]
    fn a_thousand_messages_a_second_linger_the_time_ten_take_to_arrive() {
        let mut a = Arrivals::default();
        // Ten messages every 10 ms for two seconds.
        steady(&mut a, Instant::now(), Duration::from_millis(10), 10, 200);
        let rate = a.per_sec().unwrap();
        assert!((rate - 1000.0).abs() < 1.0, "{rate}");
        let linger = millis(a.linger(10, CEILING));
        assert!((linger - 10.0).abs() < 0.1, "{linger}");
        // A receive that may take fewer waits for fewer.
        assert!((millis(a.linger(5, CEILING)) - 5.0).abs() < 0.1);
    }

    #[test]
    fn a_queue_that_trickles_keeps_the_whole_linger() {
        let mut a = Arrivals::default();
        // Two messages every 20 ms: a hundred a second, ten of which take 100 ms.
        steady(&mut a, Instant::now(), Duration::from_millis(20), 2, 100);
        assert_eq!(a.linger(10, CEILING), CEILING);
    }

    #[test]
    fn receives_that_come_back_together_do_not_read_as_a_burst() {
        let mut a = Arrivals::default();
        let start = Instant::now();
        a.on_receive(start, 0);
        // Eight loops' receives of ten, all within one millisecond, then nothing until the
        // window closes 100 ms later: 80 messages in 100 ms, not in one millisecond.
        for i in 0..8 {
            a.on_receive(start + Duration::from_micros(100 * i), 10);
        }
        a.on_receive(start + ARRIVALS_WINDOW, 0);
        let rate = a.per_sec().unwrap();
        assert!((rate - 800.0).abs() < 1.0, "{rate}");
    }

    #[test]
    fn a_quiet_spell_forgets_a_busy_rate_at_once() {
        let mut a = Arrivals::default();
        let at = steady(&mut a, Instant::now(), Duration::from_millis(5), 25, 200);
        assert!(a.linger(10, CEILING) < Duration::from_millis(3));
        // A long poll that waited its 20 seconds and came back with one message.
        a.on_receive(at + Duration::from_secs(20), 1);
        assert_eq!(a.linger(10, CEILING), CEILING);
        // A short window moves the average only part of the way: one burst is not a rate.
        let mut b = Arrivals::default();
        let at = steady(&mut b, Instant::now(), Duration::from_millis(100), 10, 30);
        b.on_receive(at + ARRIVALS_WINDOW, 1000);
        let rate = b.per_sec().unwrap();
        assert!(rate > 1000.0 && rate < 5000.0, "{rate}");
    }

    #[test]
    fn group_cap_is_at_least_one_and_at_most_the_flag() {
        assert_eq!(group_cap(10, 4, 256), 2);
        assert_eq!(group_cap(3, 4, 256), 1);
        assert_eq!(group_cap(512, 1, 256), 256);
        assert_eq!(group_cap(512, 0, 0), 1);
    }

    #[tokio::test]
    async fn the_limit_never_exceeds_the_target_and_pays_its_debt_as_permits_return() {
        let limit = Limit::new(10);
        let sem = limit.semaphore().clone();
        limit.apply(Change { from: 10, to: 40 });
        assert_eq!(sem.available_permits(), 40);
        // 30 in use, then a shrink to 20: the 10 free go at once, 10 more are owed.
        let held: Vec<_> = (0..30)
            .map(|_| sem.clone().try_acquire_owned().unwrap())
            .collect();
        limit.apply(Change { from: 40, to: 20 });
        assert_eq!(sem.available_permits(), 0);
        assert_eq!(limit.effective(30), 20);
        let mut held = held.into_iter();
        for p in held.by_ref().take(15) {
            limit.give_back(p);
        }
        // 10 forgotten, 5 back in the pool: 15 in use + 5 free = 20.
        assert_eq!(sem.available_permits(), 5);
        assert_eq!(limit.effective(15), 20);
        // Growing while nothing is owed adds permits.
        limit.apply(Change { from: 20, to: 25 });
        assert_eq!(sem.available_permits(), 10);
        for p in held {
            limit.give_back(p);
        }
        assert_eq!(sem.available_permits(), 25);
    }

    #[tokio::test]
    async fn growing_while_in_debt_cancels_the_debt_first() {
        let limit = Limit::new(20);
        let sem = limit.semaphore().clone();
        let held: Vec<_> = (0..20)
            .map(|_| sem.clone().try_acquire_owned().unwrap())
            .collect();
        limit.apply(Change { from: 20, to: 10 });
        limit.apply(Change { from: 10, to: 15 });
        assert_eq!(sem.available_permits(), 0);
        for p in held {
            limit.give_back(p);
        }
        assert_eq!(sem.available_permits(), 15);
    }
}
