//! Leases: one task per process keeps every in-flight message invisible while its handler
//! runs, extending visibility with ChangeMessageVisibilityBatch before it runs out. SQS caps
//! a message's total invisibility at 12 hours from its receipt; the lease stops there.
//!
//! Each tick sends one call per queue and batch of ten, all at once, each bounded by the
//! lease's call timeout: a hung call (one queue's endpoint stalls, a connection that never
//! answers) is abandoned after that time and retried on a later tick, and never holds up the
//! other batches. The timeout is well under half of any sensible visibility timeout, the margin
//! at which a lease is extended, so an abandoned call still leaves time for the retry.
//!
//! Rivals and crashes: a lease only ever extends this process's own receipt handles; another
//! process holding the same message (after a visibility lapse) has another handle, and SQS
//! refuses the stale one (`ReceiptHandleIsInvalid`, counted). A call that timed out here may
//! still have been applied by SQS: that only makes the message invisible for longer, which the
//! next extension or the delete settles. A crash leaves nothing to clean up: the messages
//! become visible when their last extension runs out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::outcome::error_chain;
use crate::runtime::backoff::MAX_VISIBILITY;
use crate::telemetry::metrics::Counters;

struct Lease {
    queue_url: Arc<str>,
    receipt: String,
    received_at: Instant,
    visible_at: Instant,
    extend_by: Duration,
    counters: Arc<Counters>,
}

/// How long one ChangeMessageVisibilityBatch may take before it is abandoned.
pub const LEASE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The registry of in-flight messages of this process.
#[derive(Clone)]
pub struct Leases {
    // A std Mutex: critical sections are a few map operations and never cross an await.
    inner: Arc<Mutex<HashMap<u64, Lease>>>,
    next_id: Arc<AtomicU64>,
    call_timeout: Duration,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            inner: Arc::default(),
            next_id: Arc::default(),
            call_timeout: LEASE_CALL_TIMEOUT,
        }
    }
}

/// Removes its lease when dropped, so no path can leave a lease behind.
pub struct LeaseGuard {
    leases: Leases,
    id: u64,
}

impl LeaseGuard {
    /// The receipt handle the lease currently extends: the newest copy's, once a second copy
    /// was adopted (see [`Leases::adopt`]). SQS honours only the newest handle of a message.
    pub fn receipt(&self) -> Option<String> {
        self.leases.lock().get(&self.id).map(|l| l.receipt.clone())
    }

    /// The lease's id, for [`Leases::adopt`].
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.leases.lock().remove(&self.id);
    }
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Lease>> {
        // A poisoned map is still a valid map: leases hold no invariants across entries.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a message received at `received_at` with `visibility`.
    pub fn hold(
        &self,
        queue_url: Arc<str>,
        receipt: String,
        received_at: Instant,
        visibility: Duration,
        counters: Arc<Counters>,
    ) -> LeaseGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Lease {
                queue_url,
                receipt,
                received_at,
                visible_at: received_at + visibility,
                extend_by: visibility,
                counters,
            },
        );
        LeaseGuard {
            leases: self.clone(),
            id,
        }
    }

    /// A second copy of a leased message was received (its visibility ran out, or SQS handed it
    /// out twice): from now on the lease keeps that copy hidden, through its receipt handle,
    /// which is also the one the message's outcome is sent with. Without this the copy in hand
    /// would come back after its visibility timeout, again and again while the first copy
    /// runs, each time raising the receive count towards the DLQ. False if the lease is gone.
    pub fn adopt(&self, id: u64, receipt: String, received_at: Instant) -> bool {
        match self.lock().get_mut(&id) {
            Some(l) => {
                l.receipt = receipt;
                l.visible_at = received_at + l.extend_by;
                true
            }
            None => false,
        }
    }

    /// The same registry, abandoning each extension call after `timeout` (tests use a short
    /// one).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs until `stop`, checking every `tick` for leases whose remaining visibility is under
    /// half their extension, and extending them.
    pub async fn run(self, sqs: aws_sdk_sqs::Client, tick: Duration, stop: CancellationToken) {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            self.extend_due(&sqs).await;
        }
    }

    /// Extends every lease that is due. Public so tests can drive it one step at a time.
    pub async fn extend_due(&self, sqs: &aws_sdk_sqs::Client) {
        let now = Instant::now();
        // (lease id, receipt, new visibility) grouped by queue.
        let mut due: HashMap<Arc<str>, Vec<(u64, String, Duration)>> = HashMap::new();
        {
            let mut map = self.lock();
            let mut ceilinged = Vec::new();
            for (id, l) in map.iter() {
                if l.visible_at.saturating_duration_since(now) > l.extend_by / 2 {
                    continue;
                }
                let ceiling = l.received_at + MAX_VISIBILITY;
                let left = ceiling.saturating_duration_since(now);
                if left < Duration::from_secs(1) {
                    ceilinged.push(*id);
                    continue;
                }
                due.entry(l.queue_url.clone()).or_default().push((
                    *id,
                    l.receipt.clone(),
                    l.extend_by.min(left),
                ));
            }
            for id in ceilinged {
                map.remove(&id);
                tracing::warn!("lease: message reached the 12-hour visibility ceiling; it will become visible again");
            }
        }
        // All batches at once: each is bounded by the call timeout, so this returns within it
        // whatever one endpoint does.
        let calls = due.iter().flat_map(|(queue_url, items)| {
            items
                .chunks(10)
                .map(move |chunk| self.extend_chunk(sqs, queue_url, chunk, now))
        });
        futures_util::future::join_all(calls).await;
    }

    async fn extend_chunk(
        &self,
        sqs: &aws_sdk_sqs::Client,
        queue_url: &str,
        chunk: &[(u64, String, Duration)],
        now: Instant,
    ) {
        let entries: Vec<_> = chunk
            .iter()
            .filter_map(|(id, receipt, by)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(id.to_string())
                    .receipt_handle(receipt)
                    .visibility_timeout(by.as_secs().max(1) as i32)
                    .build()
                    .ok()
            })
            .collect();
        let call = sqs
            .change_message_visibility_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send();
        let out = match tokio::time::timeout(self.call_timeout, call).await {
            Ok(Ok(out)) => out,
            // The next tick tries again; the margin of half a visibility timeout allows it.
            Ok(Err(e)) => {
                tracing::warn!(queue_url, error = %error_chain(&e), "lease: ChangeMessageVisibilityBatch failed");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    queue_url,
                    timeout_ms = self.call_timeout.as_millis() as u64,
                    "lease: ChangeMessageVisibilityBatch timed out; abandoned"
                );
                return;
            }
        };
        let mut map = self.lock();
        for ok in out.successful() {
            if let Some(l) = ok.id().parse().ok().and_then(|id: u64| map.get_mut(&id)) {
                let by = chunk
                    .iter()
                    .find(|(id, _, _)| id.to_string() == ok.id())
                    .map(|c| c.2)
                    .unwrap_or(l.extend_by);
                l.visible_at = now + by;
                Counters::inc(&l.counters.lease_extensions);
            }
        }
        for f in out.failed() {
            tracing::warn!(code = f.code(), "lease: extension failed for one message");
            if let Some(l) = f.id().parse().ok().and_then(|id: u64| map.get(&id)) {
                if f.code() == "ReceiptHandleIsInvalid" {
                    Counters::inc(&l.counters.expired_receipts);
                }
            }
        }
    }
}
