//! Deletes, batched: receipt handles are flushed with DeleteMessageBatch when ten are waiting
//! or a few milliseconds after the first one arrived, whichever comes first. Failed entries are
//! retried; an expired receipt handle is counted and dropped (the message will come back and be
//! recognised as a duplicate by the inbox), never a crash.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::domain::outcome::error_chain;
use crate::infra::aws::CALL_TIMEOUT;
use crate::telemetry::metrics::Counters;

/// How many times a failing delete is retried before it is given up (the message then comes
/// back after its visibility timeout and is absorbed by the inbox).
const MAX_ATTEMPTS: u32 = 5;
/// DeleteMessageBatch calls in flight at once, per queue.
const MAX_CONCURRENT_BATCHES: usize = 8;

/// A handle to the acker task of one queue. Dropping every handle flushes and stops it.
#[derive(Clone)]
pub struct Acker {
    tx: mpsc::UnboundedSender<String>,
}

impl Acker {
    /// Starts the acker of `queue_url`. The returned join handle completes once every handle is
    /// dropped and every pending delete has been sent.
    pub fn spawn(
        sqs: aws_sdk_sqs::Client,
        queue_url: String,
        flush_after: Duration,
        counters: Arc<Counters>,
    ) -> (Acker, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(sqs, queue_url, flush_after, counters, rx));
        (Acker { tx }, task)
    }

    /// Queues the delete of one received message.
    pub fn delete(&self, receipt_handle: String) {
        // The receiver lives until every sender is gone, and we are a sender.
        let _ = self.tx.send(receipt_handle);
    }
}

async fn run(
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    flush_after: Duration,
    counters: Arc<Counters>,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONCURRENT_BATCHES));
    let mut in_flight = JoinSet::new();
    let mut batch: Vec<String> = Vec::with_capacity(10);
    loop {
        // Wait for the first handle of a batch, then for the rest until full or timed out.
        match rx.recv().await {
            Some(h) => batch.push(h),
            None => break,
        }
        let deadline = tokio::time::Instant::now() + flush_after;
        let mut closed = false;
        while batch.len() < 10 {
            // Take whatever is already queued without waiting.
            match rx.try_recv() {
                Ok(h) => {
                    batch.push(h);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(h)) => batch.push(h),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let permit = limit.clone().acquire_owned().await;
        let handles = std::mem::replace(&mut batch, Vec::with_capacity(10));
        let (sqs, url, counters) = (sqs.clone(), queue_url.clone(), counters.clone());
        in_flight.spawn(async move {
            let _permit = permit;
            delete_batch(&sqs, &url, handles, &counters).await;
        });
        // Reap finished batches so the set stays small.
        while in_flight.try_join_next().is_some() {}
        if closed {
            break;
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Deletes up to ten messages, retrying entries that failed for a reason other than an
/// expired receipt handle.
async fn delete_batch(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    mut handles: Vec<String>,
    counters: &Counters,
) {
    for attempt in 1..=MAX_ATTEMPTS {
        let entries: Vec<_> = handles
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(h)
                    .build()
                    .ok()
            })
            .collect();
        let call = sqs
            .delete_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send();
        // A hung call would hold one of the flush permits for good; abandon it and retry.
        let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(r) => r.map_err(|e| error_chain(&e)),
            Err(_) => Err(format!(
                "DeleteMessageBatch timed out after {CALL_TIMEOUT:?}"
            )),
        };
        match result {
            Ok(out) => {
                let mut retry = Vec::new();
                for f in out.failed() {
                    let Some(h) = f.id().parse::<usize>().ok().and_then(|i| handles.get(i)) else {
                        continue;
                    };
                    if f.code() == "ReceiptHandleIsInvalid" {
                        Counters::inc(&counters.expired_receipts);
                        tracing::warn!(code = f.code(), "delete: receipt handle expired");
                    } else {
                        retry.push(h.clone());
                    }
                }
                if retry.is_empty() {
                    return;
                }
                tracing::warn!(
                    count = retry.len(),
                    attempt,
                    "delete: entries failed; retrying"
                );
                handles = retry;
            }
            Err(error) => {
                tracing::warn!(%error, attempt, "delete: DeleteMessageBatch failed; retrying");
            }
        }
        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
    }
    tracing::error!(
        count = handles.len(),
        "delete: giving up; the messages will be redelivered and absorbed as duplicates"
    );
}
