//! The client-side move: receive from the source, send to the target in batches, delete from
//! the source only after the send succeeded, with a [`Journal`] that makes a kill and a rerun
//! neither lose nor duplicate a message (see the journal module for the exact guarantee).
//!
//! Used when filters are given (StartMessageMoveTask cannot filter) or the endpoint has no
//! native move task (moto). Messages keep their body and every message attribute byte for byte,
//! except the worker's `orderfleet.failure.*` attributes, which describe a failure that the
//! redrive is meant to leave behind: a message that fails again gets fresh ones. The move adds
//! `orderfleet.redriven_from` (source queue name), `orderfleet.redrive_count` and
//! `orderfleet.redrive_key`, as far as SQS's ten-attribute limit allows (in that order).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use aws_sdk_sqs::types::{
    MessageAttributeValue, MessageSystemAttributeName, SendMessageBatchRequestEntry,
};
use chrono::Utc;
use md5::{Digest, Md5};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::filter::{self, Filter};
use super::journal::{Journal, Record, State};
use super::message::DlqMessage;
use super::progress::Progress;
use super::queue::{self, QueueRef};
use super::rate::TokenBucket;
use super::scan::Scanner;
use crate::domain::outcome::error_chain;
use crate::sqs::attrs::{
    self, FAILURE_PREFIX, MAX_ATTRIBUTES, REDRIVEN_FROM, REDRIVE_COUNT, REDRIVE_KEY,
};

/// A point at which a test makes the mover stop as if the process had been killed.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the intents of batch N reached the journal, before SendMessageBatch.
    AfterIntent(u32),
    /// After SendMessageBatch of batch N succeeded, before the `sent` records.
    AfterSend(u32),
    /// After the `sent` records of batch N, before DeleteMessageBatch.
    AfterSent(u32),
}

/// What to move and how.
#[derive(Debug, Clone)]
pub struct MoveOptions {
    pub filters: Vec<Filter>,
    /// Move at most this many messages.
    pub limit: Option<u64>,
    /// Messages sent per second, at most.
    pub rate: Option<f64>,
    /// How long received messages stay hidden from others during the move.
    pub visibility: Duration,
    /// The journal file (created or resumed).
    pub journal: PathBuf,
    #[doc(hidden)]
    pub crash_at: Option<CrashPoint>,
}

/// What a move did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MoveReport {
    /// Distinct messages received from the source.
    pub examined: u64,
    /// Of those, messages that matched the filters.
    pub matched: u64,
    /// Messages now in the target and gone from the source, by this run.
    pub moved: u64,
    /// Messages the target refused; they stay in the source.
    pub failed: u64,
    /// Messages an earlier, killed run had sent; this run only deleted them from the source.
    pub completed_from_journal: u64,
    /// Messages an earlier run may or may not have sent, sent again (see the journal docs).
    pub in_doubt_resent: u64,
    /// Messages sent whose source copy could not be deleted yet; a rerun deletes them.
    pub undeleted: u64,
    /// Messages still hidden by another reader when the move ended (not examined).
    pub in_flight_elsewhere: u64,
    pub interrupted: bool,
    pub resumed: bool,
    pub journal: PathBuf,
    /// The first few failure reasons.
    pub errors: Vec<String>,
}

/// The deterministic key of a source message in a move: the same message always gets the same
/// key, so copies sent twice can be recognised.
pub fn redrive_key(source_arn: &str, message_id: &str) -> String {
    let digest = Md5::digest(format!("{source_arn}\n{message_id}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The attributes a redriven copy carries: the original's minus `orderfleet.failure.*`, plus
/// where it came from.
pub fn redrive_attributes(
    m: &DlqMessage,
    source_name: &str,
    key: &str,
) -> HashMap<String, MessageAttributeValue> {
    let mut out: HashMap<String, MessageAttributeValue> = m
        .message
        .message_attributes()
        .map(|a| {
            a.iter()
                .filter(|(k, _)| !k.starts_with(FAILURE_PREFIX))
                .filter(|(k, _)| ![REDRIVEN_FROM, REDRIVE_COUNT, REDRIVE_KEY].contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let count = m
        .attr(REDRIVE_COUNT)
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    let ours = [
        (REDRIVEN_FROM, "String", source_name.to_string()),
        (REDRIVE_COUNT, "Number", count.to_string()),
        (REDRIVE_KEY, "String", key.to_string()),
    ];
    for (name, data_type, value) in ours {
        if out.len() >= MAX_ATTRIBUTES {
            break;
        }
        if let Some(v) = attrs::value(data_type, &value) {
            out.insert(name.to_string(), v);
        }
    }
    out
}

/// One message about to be sent.
struct Outgoing {
    message: DlqMessage,
    key: String,
    in_doubt: bool,
}

/// Moves messages from `source` to `target` on the client side. Stops between batches when
/// `stop` is cancelled. Returns an error only when it cannot go on; the journal is consistent
/// at every point, so the same command can simply be run again.
pub async fn move_messages(
    sqs: &aws_sdk_sqs::Client,
    source: &QueueRef,
    target: &QueueRef,
    opts: &MoveOptions,
    stop: &CancellationToken,
    progress: &mut Progress,
) -> Result<MoveReport> {
    let mut journal = Journal::open(
        &opts.journal,
        Record::Run {
            source: source.url.clone(),
            target: target.url.clone(),
            filters: opts.filters.iter().map(|f| f.to_string()).collect(),
            visibility_timeout_secs: opts.visibility.as_secs(),
            at: Utc::now(),
        },
    )?;
    let mut report = MoveReport {
        resumed: journal.resumed,
        journal: opts.journal.clone(),
        ..MoveReport::default()
    };
    // Messages an earlier run had in hand stay hidden until its visibility timeout ends; wait
    // that long for them before calling the move done.
    let settle_until = journal
        .previous_visibility_secs
        .filter(|_| journal.resumed)
        .map(|s| Instant::now() + Duration::from_secs(s) + Duration::from_secs(5));
    let mut scanner = Scanner::new(sqs, &source.url, opts.visibility);
    let mut bucket = opts.rate.map(TokenBucket::new);
    let batch = bucket.as_ref().map_or(10, TokenBucket::batch);
    let mut batch_no = 0u32;
    let mut was_waiting = false;

    let result = async {
        loop {
            if stop.is_cancelled() {
                report.interrupted = true;
                break;
            }
            let room = opts
                .limit
                .map_or(u64::MAX, |l| l.saturating_sub(report.moved + report.in_doubt_resent));
            if room == 0 {
                break;
            }
            // The receive is not raced against Ctrl-C: dropping it could leave messages hidden
            // that no one holds. It waits at most a second.
            let received = scanner
                .receive(batch.min(room.min(10) as usize) as i32)
                .await?;
            let idle = received.is_empty() || scanner.exhausted();
            let waiting = idle && should_wait(settle_until);
            // After a wait ends, read once more: what it waited for has just become visible.
            let scan_over = idle && !waiting && !was_waiting;
            was_waiting = waiting;
            let now = Utc::now();
            let mut to_send: Vec<Outgoing> = Vec::new();
            let mut to_delete: Vec<String> = Vec::new();
            for r in received {
                let m = DlqMessage::new(r.message);
                if r.first_time {
                    report.examined += 1;
                    progress.examined += 1;
                }
                match journal.state(m.id()).cloned() {
                    Some(State::Sent) | Some(State::Deleted) => {
                        // Already in the target: only the source copy is left to remove.
                        report.completed_from_journal += 1;
                        to_delete.push(m.id().to_string());
                    }
                    Some(State::Intent { key }) => to_send.push(Outgoing {
                        message: m,
                        key,
                        in_doubt: true,
                    }),
                    None if r.first_time
                        && (to_send.len() as u64) < room
                        && filter::all_match(&opts.filters, &m, now) =>
                    {
                        report.matched += 1;
                        let key = redrive_key(&source.arn, m.id());
                        to_send.push(Outgoing {
                            message: m,
                            key,
                            in_doubt: false,
                        });
                    }
                    // Not ours to move (or refused earlier in this run): stays held until the
                    // end so the scan moves on, then is released.
                    None => {}
                }
            }
            if !to_send.is_empty() {
                batch_no += 1;
                if let Some(b) = bucket.as_mut() {
                    let wait = b.take(to_send.len());
                    if !wait.is_zero() {
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            // Nothing of this batch is journalled yet: stopping here is clean.
                            _ = stop.cancelled() => { report.interrupted = true; break; }
                        }
                    }
                }
                send_batch(
                    sqs, source, target, opts, &mut journal, &mut report, &mut to_delete,
                    to_send, batch_no,
                )
                .await?;
            }
            if !to_delete.is_empty() {
                if crash(opts, CrashPoint::AfterSent(batch_no)) {
                    anyhow::bail!("injected crash after the sent records of batch {batch_no}");
                }
                let (deleted, failed) = scanner.delete(&to_delete).await?;
                let records: Vec<Record> = deleted
                    .iter()
                    .map(|id| Record::Deleted {
                        message_id: id.clone(),
                    })
                    .collect();
                journal.append(&records)?;
                for (id, why) in failed {
                    // The journal says sent: the next receive of it (in this run or a rerun)
                    // deletes it without sending it again.
                    tracing::warn!(message_id = %id, reason = %why, "could not delete a moved message from the source yet");
                }
            }
            progress.done = report.moved + report.in_doubt_resent;
            progress.failed = report.failed;
            progress.tick();
            if scan_over {
                break;
            }
        }
        anyhow::Ok(())
    }
    .await;

    if let Err(e) = result {
        if e.to_string().starts_with("injected crash") {
            // A simulated kill -9: no cleanup at all.
            return Err(e);
        }
        scanner.release_all().await;
        let _ = journal.append(&[Record::Stopped { at: Utc::now() }]);
        return Err(e);
    }
    scanner.release_all().await;
    report.undeleted = journal.outstanding().len() as u64;
    if let Ok(c) = queue::counts(sqs, &source.url).await {
        report.in_flight_elsewhere = c.in_flight;
    }
    let done = !report.interrupted && report.undeleted == 0 && journal.in_doubt() == 0;
    journal.append(&[if done {
        Record::Finished { at: Utc::now() }
    } else {
        Record::Stopped { at: Utc::now() }
    }])?;
    progress.done = report.moved + report.in_doubt_resent;
    progress.finish();
    Ok(report)
}

fn crash(opts: &MoveOptions, at: CrashPoint) -> bool {
    opts.crash_at == Some(at)
}

/// Whether the scan should keep polling although nothing new arrives: a resumed move keeps
/// reading until the earlier run's visibility timeout (plus a margin) has passed, because the
/// messages that run held reappear only then. The wait does not trust the queue's counts:
/// SQS's `ApproximateNumberOfMessagesNotVisible` is approximate and lags, and this run's own
/// held messages may reappear meanwhile, so a count-based shortcut can end the scan while some
/// of the dead run's messages are still hidden (seen once under load: they stayed behind).
fn should_wait(settle_until: Option<Instant>) -> bool {
    settle_until.is_some_and(|until| Instant::now() < until)
}

#[allow(clippy::too_many_arguments)]
async fn send_batch(
    sqs: &aws_sdk_sqs::Client,
    source: &QueueRef,
    target: &QueueRef,
    opts: &MoveOptions,
    journal: &mut Journal,
    report: &mut MoveReport,
    to_delete: &mut Vec<String>,
    batch: Vec<Outgoing>,
    batch_no: u32,
) -> Result<()> {
    let intents: Vec<Record> = batch
        .iter()
        .filter(|o| !o.in_doubt)
        .map(|o| Record::Intent {
            message_id: o.message.id().to_string(),
            key: o.key.clone(),
        })
        .collect();
    journal.append(&intents)?;
    if crash(opts, CrashPoint::AfterIntent(batch_no)) {
        anyhow::bail!("injected crash after the intents of batch {batch_no}");
    }
    let entries = batch
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let mut e = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(o.message.body())
                .set_message_attributes(Some(redrive_attributes(&o.message, &source.name, &o.key)));
            if target.fifo {
                let group = o
                    .message
                    .message
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                    .cloned()
                    .unwrap_or_else(|| "orderfleet-redrive".into());
                e = e.message_group_id(group).message_deduplication_id(&o.key);
            }
            e.build().context("building a send entry")
        })
        .collect::<Result<Vec<_>>>()?;
    let out = sqs
        .send_message_batch()
        .queue_url(&target.url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "SendMessageBatch to {} failed ({}); {} message(s) are in doubt in journal {}: \
                 run the same command again to finish the move",
                target.name,
                error_chain(&e),
                batch.len(),
                journal.path().display()
            )
        })?;
    if crash(opts, CrashPoint::AfterSend(batch_no)) {
        anyhow::bail!("injected crash after SendMessageBatch of batch {batch_no}");
    }
    let mut records = Vec::new();
    for ok in out.successful() {
        let Some(o) = ok.id().parse::<usize>().ok().and_then(|i| batch.get(i)) else {
            continue;
        };
        records.push(Record::Sent {
            message_id: o.message.id().to_string(),
            key: o.key.clone(),
            target_message_id: ok.message_id().to_string(),
        });
        to_delete.push(o.message.id().to_string());
        if o.in_doubt {
            report.in_doubt_resent += 1;
        } else {
            report.moved += 1;
        }
    }
    for bad in out.failed() {
        let Some(o) = bad.id().parse::<usize>().ok().and_then(|i| batch.get(i)) else {
            continue;
        };
        let reason = format!("{}: {}", bad.code(), bad.message().unwrap_or_default());
        records.push(Record::Failed {
            message_id: o.message.id().to_string(),
            key: o.key.clone(),
            reason: reason.clone(),
        });
        report.failed += 1;
        if report.errors.len() < 5 {
            report.errors.push(format!("{}: {reason}", o.message.id()));
        }
    }
    journal.append(&records)?;
    Ok(())
}
