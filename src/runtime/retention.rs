//! The age rule: the oldest event a consumer may still apply.
//!
//! Every applied event leaves a row in the inbox ([`crate::store::inbox`]), which is what
//! makes a second delivery a duplicate, and rows older than the retention (default 30 days) are
//! deleted. How long is long enough cannot be bounded by SQS alone: SQS keeps a message at most
//! 14 days, but dead-lettering, `orderfleet dlq redrive` and `dlq import` each send a *new*
//! message with a fresh clock, and an EventBridge archive can be replayed from any date. So the
//! consumer does not trust the upstream to be young: an event whose EventBridge `time` is older
//! than the retention less [`CLOCK_MARGIN`] ([`max_event_age`]) is dead-lettered unapplied,
//! with a reason that says why ([`too_old`]). An inbox row is written no earlier than its
//! event's `time`, so every event younger than that still finds its row if it was applied: a
//! duplicate is never applied twice, however late or however often it comes back. Every worker
//! on one database must use the same retention.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::envelope::Envelope;

/// What separates the pruner's cutoff from the oldest event a consumer applies: room for the
/// clocks of EventBridge, the worker and PostgreSQL to disagree.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(3_600);

/// The oldest event a consumer may apply when inbox rows are kept for `keep`.
pub fn max_event_age(keep: Duration) -> Duration {
    keep.saturating_sub(CLOCK_MARGIN)
}

/// Why `event` may not be applied at `now`, if it is older than `max`: its inbox row, had it
/// been applied, may be gone, so a second application could not be told from a first.
pub fn too_old(event: &Envelope, max: Duration, now: DateTime<Utc>) -> Option<String> {
    let age = now.signed_duration_since(event.time).to_std().ok()?;
    (age > max).then(|| {
        format!(
            "event {} ({}) is from {}, {:.1} days ago; the inbox only remembers applied events \
             for {:.1} days (--inbox-retention-days less {} h), so whether this one was applied \
             cannot be told and it is not applied again. Check its order's state; to apply it \
             anyway, publish a fresh event",
            event.id,
            event.detail_type,
            event.time.to_rfc3339(),
            age.as_secs_f64() / 86_400.0,
            max.as_secs_f64() / 86_400.0,
            CLOCK_MARGIN.as_secs() / 3_600,
        )
    })
}
