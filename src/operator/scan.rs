//! Reading a queue without consuming it: the receive loop shared by `peek`, dry runs,
//! `export` and client-side moves.
//!
//! # What peeking does to receive counts
//!
//! SQS has no "peek": the only way to read a message is ReceiveMessage, and every receive
//! increments the message's ApproximateReceiveCount and hides it for the visibility timeout.
//! On a queue with a redrive policy, a receive that takes the count past maxReceiveCount moves
//! the message to that queue's DLQ — which is how the console's "poll for messages" can push
//! messages along. A DLQ normally has no redrive policy of its own (ours have none), so nothing
//! moves there, but the count still rises and the message is hidden from other readers.
//!
//! A [`Scanner`] therefore receives with a short visibility timeout, keeps every message it has
//! seen hidden until the scan ends (so that a second receive returns new messages instead of
//! the same ten again), and then resets the visibility of all of them to 0 with
//! ChangeMessageVisibilityBatch, so they are visible to others at once. The receive count shown
//! by `peek` includes the peek's own receive. Reading a *work* queue this way is still a
//! receive: it counts towards that queue's maxReceiveCount, so the tools only read DLQs
//! unless told otherwise.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Result;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
    MessageSystemAttributeName,
};
use tokio::time::Instant;

use crate::domain::outcome::error_chain;

/// Receive rounds that bring nothing new before a scan counts the queue as read.
const QUIET_ROUNDS: u32 = 2;
/// Long-poll wait of each receive: long enough that SQS answers from all its servers
/// (a short poll samples a subset and can return nothing while messages exist).
const WAIT_SECS: i32 = 1;

/// One received message, and whether this scan had seen it before (its visibility expired
/// during the scan and SQS returned it again).
#[derive(Debug)]
pub struct Received {
    pub message: Message,
    pub first_time: bool,
}

/// Receives from one queue, remembering what it holds so it can give it all back.
pub struct Scanner {
    sqs: aws_sdk_sqs::Client,
    url: String,
    visibility_secs: i32,
    /// The latest receipt handle of every message this scan holds, and when it was received.
    held: HashMap<String, (String, Instant)>,
    seen: HashSet<String>,
    quiet_rounds: u32,
    /// Receives made (each one raised the receive count of what it returned).
    pub receives: u64,
}

impl Scanner {
    /// A scanner that hides what it reads for `visibility` (at least 1 s).
    pub fn new(sqs: &aws_sdk_sqs::Client, url: &str, visibility: Duration) -> Self {
        Scanner {
            sqs: sqs.clone(),
            url: url.to_string(),
            visibility_secs: visibility.as_secs().clamp(1, 43_200) as i32,
            held: HashMap::new(),
            seen: HashSet::new(),
            quiet_rounds: 0,
            receives: 0,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Receives up to `max` (1..=10) messages, with all system and message attributes.
    pub async fn receive(&mut self, max: i32) -> Result<Vec<Received>> {
        let out = self
            .sqs
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10))
            .visibility_timeout(self.visibility_secs)
            .wait_time_seconds(WAIT_SECS)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("receiving from {}: {}", self.url, error_chain(&e)))?;
        self.receives += 1;
        let mut fresh = false;
        let mut result = Vec::new();
        for message in out.messages.unwrap_or_default() {
            let (Some(id), Some(receipt)) = (message.message_id(), message.receipt_handle()) else {
                continue;
            };
            self.held
                .insert(id.to_string(), (receipt.to_string(), Instant::now()));
            let first_time = self.seen.insert(id.to_string());
            fresh |= first_time;
            result.push(Received {
                message,
                first_time,
            });
        }
        self.quiet_rounds = if fresh { 0 } else { self.quiet_rounds + 1 };
        Ok(result)
    }

    /// True once receives stopped bringing messages this scan had not seen.
    pub fn exhausted(&self) -> bool {
        self.quiet_rounds >= QUIET_ROUNDS
    }

    /// Messages this scan holds whose visibility timeout has not run out yet: the part of
    /// the queue's in-flight count that is ours. (A held message whose timeout ran out is
    /// visible again, though this scan still remembers it.)
    pub fn held_in_flight(&self) -> usize {
        let visibility = std::time::Duration::from_secs(self.visibility_secs as u64);
        self.held
            .values()
            .filter(|(_, at)| at.elapsed() < visibility)
            .count()
    }

    /// Deletes messages (by id, with their latest receipt). Returns the ids deleted and the
    /// failures. Deleted messages are no longer held.
    pub async fn delete(&mut self, ids: &[String]) -> Result<(Vec<String>, Vec<(String, String)>)> {
        let mut deleted = Vec::new();
        let mut failed = Vec::new();
        for chunk in ids.chunks(10) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, id)| {
                    let (receipt, _) = self.held.get(id)?;
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .build()
                        .ok()
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            let out = self
                .sqs
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("deleting from {}: {}", self.url, error_chain(&e)))?;
            for ok in out.successful() {
                if let Some(id) = ok.id().parse::<usize>().ok().and_then(|i| chunk.get(i)) {
                    self.held.remove(id);
                    deleted.push(id.clone());
                }
            }
            for bad in out.failed() {
                if let Some(id) = bad.id().parse::<usize>().ok().and_then(|i| chunk.get(i)) {
                    failed.push((id.clone(), bad.message().unwrap_or(bad.code()).to_string()));
                }
            }
        }
        Ok((deleted, failed))
    }

    /// Makes every held message visible again at once. Returns how many were released.
    /// A handle that went stale (the message's visibility ran out and someone else received
    /// it) cannot be reset; that message is already visible or held by its new reader.
    pub async fn release_all(&mut self) -> usize {
        let held: Vec<(String, String)> = self.held.drain().map(|(id, (r, _))| (id, r)).collect();
        let mut released = 0;
        for chunk in held.chunks(10) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, (_, receipt))| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .visibility_timeout(0)
                        .build()
                        .ok()
                })
                .collect();
            match self
                .sqs
                .change_message_visibility_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) => {
                    released += out.successful().len();
                    for bad in out.failed() {
                        tracing::debug!(code = bad.code(), "visibility reset refused");
                    }
                }
                Err(e) => tracing::warn!(
                    queue = %self.url,
                    error = %error_chain(&e),
                    "could not reset visibility; the messages reappear when their visibility timeout ends"
                ),
            }
        }
        released
    }
}
