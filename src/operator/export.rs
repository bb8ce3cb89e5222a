//! `dlq export` and `dlq import`: a queue to a JSON-lines file and back, with full fidelity.
//!
//! Each line is one [`ExportedMessage`]: the body exactly as SQS returned it, every message
//! attribute with its data type (binary values in base64), every system attribute, and the
//! message id. The file is created with mode 0600 (it holds customer data) and never
//! overwritten. Without `--delete` the messages stay in the queue (visibility reset at the end,
//! see [`super::scan`]); with it, each batch is deleted only after its lines were written and
//! fsynced — a crash in between leaves the batch both in the file and in the queue.
//!
//! Import replays a file with SendMessageBatch: the same body and message attributes, byte for
//! byte. SQS assigns new system attributes (message id, timestamps, receive count); for a FIFO
//! queue the exported MessageGroupId and MessageDeduplicationId are reused. Import is resumable:
//! next to the file it keeps a journal `<FILE>.import-<queue>.jsonl` with, per batch, the line
//! numbers it is about to send (fsynced before the send) and those sent (after). A rerun skips
//! lines sent and sends again only a batch whose answer was never recorded (the same in-doubt
//! window as a redrive, at most ten messages).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    Message, MessageAttributeValue, MessageSystemAttributeName, SendMessageBatchRequestEntry,
};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::filter::{self, Filter};
use super::message::DlqMessage;
use super::progress::Progress;
use super::queue::QueueRef;
use super::rate::TokenBucket;
use super::scan::Scanner;
use crate::domain::outcome::error_chain;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One exported message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportedMessage {
    pub message_id: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5_of_body: Option<String>,
    /// System attributes (SentTimestamp, ApproximateReceiveCount, ...).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub message_attributes: BTreeMap<String, ExportedAttribute>,
    pub source_queue: String,
    pub exported_at: DateTime<Utc>,
}

/// A message attribute: its data type (`String`, `Number`, `Binary`, or with a custom suffix
/// such as `String.json`) and its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportedAttribute {
    pub data_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string_value: Option<String>,
    /// Base64 of the bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_value: Option<String>,
}

impl ExportedMessage {
    pub fn from_message(m: &Message, source_queue: &str) -> Self {
        ExportedMessage {
            message_id: m.message_id().unwrap_or_default().to_string(),
            body: m.body().unwrap_or_default().to_string(),
            md5_of_body: m.md5_of_body().map(str::to_string),
            attributes: m
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            message_attributes: m
                .message_attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                ExportedAttribute {
                                    data_type: v.data_type().to_string(),
                                    string_value: v.string_value().map(str::to_string),
                                    binary_value: v.binary_value().map(|b| B64.encode(b.as_ref())),
                                },
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            source_queue: source_queue.to_string(),
            exported_at: Utc::now(),
        }
    }

    /// The message attributes as SendMessage takes them.
    pub fn attributes_for_send(&self) -> Result<HashMap<String, MessageAttributeValue>> {
        self.message_attributes
            .iter()
            .map(|(k, a)| {
                let binary = a
                    .binary_value
                    .as_deref()
                    .map(|b| B64.decode(b).map(Blob::new))
                    .transpose()
                    .with_context(|| format!("attribute {k}: binary_value is not base64"))?;
                let v = MessageAttributeValue::builder()
                    .data_type(&a.data_type)
                    .set_string_value(a.string_value.clone())
                    .set_binary_value(binary)
                    .build()
                    .with_context(|| format!("attribute {k}"))?;
                Ok((k.clone(), v))
            })
            .collect()
    }
}

/// What `export` reads and whether it deletes.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub filters: Vec<Filter>,
    pub limit: Option<u64>,
    pub delete: bool,
    pub visibility: Duration,
}

/// What an export did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportReport {
    pub examined: u64,
    pub exported: u64,
    pub deleted: u64,
    pub delete_failures: u64,
    pub interrupted: bool,
}

/// Creates `path` with mode 0600, refusing to overwrite, and makes its directory entry
/// durable ([`sync_parent_dir`]) before anything is written to it.
pub fn create_private(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (it must not exist yet; exports are never overwritten)",
                path.display()
            )
        })?;
    sync_parent_dir(path)?;
    Ok(file)
}

/// Fsyncs the directory that holds `path`. A new file's data can be fsynced and still be lost
/// in a crash if the directory entry that names it was not: `dlq export --delete` and the
/// redrive journal delete messages from SQS on the strength of what they wrote, so the file
/// must survive a power cut before the first delete.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Writes the messages of `source` to `out`.
pub async fn export(
    sqs: &aws_sdk_sqs::Client,
    source: &QueueRef,
    out: &Path,
    opts: &ExportOptions,
    stop: &CancellationToken,
    progress: &mut Progress,
) -> Result<ExportReport> {
    let file = create_private(out)?;
    let mut writer = BufWriter::new(file);
    let mut scanner = Scanner::new(sqs, &source.url, opts.visibility);
    let mut report = ExportReport::default();
    let result = async {
        while !scanner.exhausted() {
            if stop.is_cancelled() {
                report.interrupted = true;
                break;
            }
            let room = opts
                .limit
                .map_or(u64::MAX, |l| l.saturating_sub(report.exported));
            if room == 0 {
                break;
            }
            let received = scanner.receive(room.min(10) as i32).await?;
            let now = Utc::now();
            let mut batch = Vec::new();
            for r in received.into_iter().filter(|r| r.first_time) {
                report.examined += 1;
                progress.examined += 1;
                let m = DlqMessage::new(r.message);
                if (batch.len() as u64) < room && filter::all_match(&opts.filters, &m, now) {
                    serde_json::to_writer(
                        &mut writer,
                        &ExportedMessage::from_message(&m.message, &source.name),
                    )?;
                    writer.write_all(b"\n")?;
                    batch.push(m.id().to_string());
                }
            }
            writer.flush()?;
            writer
                .get_ref()
                .sync_data()
                .with_context(|| format!("writing {}", out.display()))?;
            report.exported += batch.len() as u64;
            if opts.delete && !batch.is_empty() {
                let (deleted, failed) = scanner.delete(&batch).await?;
                report.deleted += deleted.len() as u64;
                report.delete_failures += failed.len() as u64;
            }
            progress.done = report.exported;
            progress.tick();
        }
        anyhow::Ok(())
    }
    .await;
    scanner.release_all().await;
    progress.finish();
    result?;
    Ok(report)
}

/// One line of an import journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImportRecord {
    Run {
        target: String,
        file: String,
        at: DateTime<Utc>,
    },
    Intent {
        lines: Vec<u64>,
    },
    Sent {
        lines: Vec<u64>,
    },
    Failed {
        lines: Vec<u64>,
        reason: String,
    },
    Finished {
        at: DateTime<Utc>,
    },
}

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub rate: Option<f64>,
    /// Stop (as if killed) after sending this batch, before recording it: tests only.
    #[doc(hidden)]
    pub crash_after_send: Option<u32>,
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    pub lines: u64,
    pub sent: u64,
    pub already_sent: u64,
    pub in_doubt_resent: u64,
    pub failed: u64,
    pub interrupted: bool,
    pub resumed: bool,
    pub journal: PathBuf,
    pub errors: Vec<String>,
}

/// The import journal of `file` into `queue_name`.
pub fn import_journal_path(file: &Path, queue_name: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(format!(".import-{queue_name}.jsonl"));
    PathBuf::from(name)
}

/// Replays `from` into `target`.
pub async fn import(
    sqs: &aws_sdk_sqs::Client,
    target: &QueueRef,
    from: &Path,
    opts: &ImportOptions,
    stop: &CancellationToken,
    progress: &mut Progress,
) -> Result<ImportReport> {
    let reader =
        BufReader::new(File::open(from).with_context(|| format!("opening {}", from.display()))?);
    let journal_path = import_journal_path(from, &target.name);
    let (mut sent, mut in_doubt, resumed) = (HashSet::new(), HashSet::new(), journal_path.exists());
    if resumed {
        let text = std::fs::read_to_string(&journal_path)
            .with_context(|| format!("reading {}", journal_path.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let record = match serde_json::from_str::<ImportRecord>(line) {
                Ok(r) => r,
                // Cut short by a crash (every write starts on a fresh line, so a cut line can
                // sit anywhere). A cut intent announced a send that never started; a cut
                // `sent` leaves its lines in doubt, and they are sent again.
                Err(_) => {
                    tracing::warn!(journal = %journal_path.display(), line = i + 1, "skipping a cut-off journal line");
                    continue;
                }
            };
            match record {
                ImportRecord::Intent { lines } => in_doubt.extend(lines),
                ImportRecord::Sent { lines } => {
                    for l in lines {
                        in_doubt.remove(&l);
                        sent.insert(l);
                    }
                }
                ImportRecord::Failed { lines, .. } => {
                    for l in lines {
                        in_doubt.remove(&l);
                    }
                }
                ImportRecord::Finished { .. } => bail!(
                    "{} was already imported into {} (journal {}); delete the journal to import it again",
                    from.display(),
                    target.name,
                    journal_path.display()
                ),
                ImportRecord::Run { .. } => {}
            }
        }
    }
    let mut journal = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&journal_path)
        .with_context(|| format!("opening {}", journal_path.display()))?;
    let mut write = |r: &ImportRecord| -> Result<()> {
        let mut line = serde_json::to_vec(r)?;
        line.push(b'\n');
        // A cut-off line from a crash would glue to ours: start on a fresh line.
        line.insert(0, b'\n');
        journal.write_all(&line)?;
        journal.sync_data()?;
        Ok(())
    };
    write(&ImportRecord::Run {
        target: target.url.clone(),
        file: from.display().to_string(),
        at: Utc::now(),
    })?;
    let mut report = ImportReport {
        resumed,
        journal: journal_path.clone(),
        ..ImportReport::default()
    };
    let mut bucket = opts.rate.map(TokenBucket::new);
    let batch_size = bucket.as_ref().map_or(10, TokenBucket::batch);
    let mut pending: Vec<(u64, ExportedMessage)> = Vec::new();
    let mut batch_no = 0u32;
    let mut lines = reader.lines();
    let mut line_no = 0u64;
    loop {
        let next = lines.next();
        if let Some(line) = next.as_ref() {
            let line = line
                .as_ref()
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", from.display()))?;
            line_no += 1;
            if line.trim().is_empty() {
                continue;
            }
            report.lines += 1;
            if sent.contains(&line_no) {
                report.already_sent += 1;
                continue;
            }
            let m: ExportedMessage = serde_json::from_str(line).with_context(|| {
                format!(
                    "{} line {line_no} is not an exported message",
                    from.display()
                )
            })?;
            pending.push((line_no, m));
            if pending.len() < batch_size {
                continue;
            }
        }
        if !pending.is_empty() {
            if stop.is_cancelled() {
                report.interrupted = true;
                break;
            }
            if let Some(b) = bucket.as_mut() {
                let wait = b.take(pending.len());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => { report.interrupted = true; break; }
                }
            }
            batch_no += 1;
            let batch = std::mem::take(&mut pending);
            let numbers: Vec<u64> = batch.iter().map(|(n, _)| *n).collect();
            write(&ImportRecord::Intent {
                lines: numbers.clone(),
            })?;
            let entries = batch
                .iter()
                .enumerate()
                .map(|(i, (_, m))| {
                    let mut e = SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(&m.body)
                        .set_message_attributes(Some(m.attributes_for_send()?));
                    if target.fifo {
                        let sys =
                            |k: MessageSystemAttributeName| m.attributes.get(k.as_str()).cloned();
                        e = e
                            .message_group_id(
                                sys(MessageSystemAttributeName::MessageGroupId)
                                    .unwrap_or_else(|| "orderfleet-import".into()),
                            )
                            .message_deduplication_id(
                                sys(MessageSystemAttributeName::MessageDeduplicationId)
                                    .unwrap_or_else(|| m.message_id.clone()),
                            );
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
                        "SendMessageBatch to {} failed ({}); lines {numbers:?} are in doubt: run the same import again to finish",
                        target.name,
                        error_chain(&e)
                    )
                })?;
            if opts.crash_after_send == Some(batch_no) {
                bail!("injected crash after sending batch {batch_no}");
            }
            let ok: Vec<u64> = out
                .successful()
                .iter()
                .filter_map(|s| {
                    s.id()
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| numbers.get(i).copied())
                })
                .collect();
            let doubted = ok.iter().filter(|n| in_doubt.contains(n)).count() as u64;
            report.in_doubt_resent += doubted;
            report.sent += ok.len() as u64 - doubted;
            write(&ImportRecord::Sent { lines: ok })?;
            let failed: Vec<u64> = out
                .failed()
                .iter()
                .filter_map(|f| {
                    if report.errors.len() < 5 {
                        report.errors.push(format!(
                            "{}: {}",
                            f.code(),
                            f.message().unwrap_or_default()
                        ));
                    }
                    f.id()
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| numbers.get(i).copied())
                })
                .collect();
            if !failed.is_empty() {
                report.failed += failed.len() as u64;
                let reason = report.errors.first().cloned().unwrap_or_default();
                write(&ImportRecord::Failed {
                    lines: failed,
                    reason,
                })?;
            }
            progress.examined = report.lines;
            progress.done = report.sent + report.in_doubt_resent;
            progress.failed = report.failed;
            progress.tick();
        }
        if next.is_none() {
            break;
        }
    }
    if !report.interrupted && report.failed == 0 {
        write(&ImportRecord::Finished { at: Utc::now() })?;
    }
    progress.finish();
    Ok(report)
}
