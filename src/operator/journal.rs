//! The redrive journal: an append-only JSON-lines file that makes a client-side move safe to
//! kill and rerun.
//!
//! For every batch the mover writes, each time followed by `fsync`:
//!
//! 1. `intent` records (source message id and its redrive key) **before** SendMessageBatch;
//! 2. `sent` (or `failed`) records **after** SendMessageBatch answered;
//! 3. `deleted` records after DeleteMessageBatch removed the originals from the source.
//!
//! A rerun that finds an unfinished journal for the same source and target resumes it, and
//! decides per source message id:
//!
//! | journal says | the message is | rerun does |
//! |---|---|---|
//! | nothing | only in the source | moves it if it matches |
//! | `sent` or `deleted` | in the target (and maybe still in the source) | deletes it from the source, never sends it again |
//! | `intent` only | in the source, and *maybe* in the target | sends it again: "in doubt" |
//!
//! The one window that cannot be closed on a standard queue is a crash after SQS accepted a
//! SendMessageBatch but before its `sent` record reached the disk: nothing can tell whether
//! the send happened. The rerun sends those messages (at most one batch of ten) again rather
//! than risk losing them, reports them as in doubt, and each copy carries the same
//! `orderfleet.redrive_key` attribute and an identical body, so the fleet's idempotent
//! handlers (the inbox is keyed by event id) apply it once. For a FIFO target the redrive key
//! is the MessageDeduplicationId, so SQS itself drops the copy within its five-minute window.
//! Every other crash point leaves nothing lost and nothing duplicated.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// The first line, and again at every resumption.
    Run {
        source: String,
        target: String,
        filters: Vec<String>,
        visibility_timeout_secs: u64,
        at: DateTime<Utc>,
    },
    Intent {
        message_id: String,
        key: String,
    },
    Sent {
        message_id: String,
        key: String,
        target_message_id: String,
    },
    /// The target refused the entry: it is not in the target.
    Failed {
        message_id: String,
        key: String,
        reason: String,
    },
    Deleted {
        message_id: String,
    },
    /// Stopped by Ctrl-C between batches; resumable.
    Stopped {
        at: DateTime<Utc>,
    },
    /// The move completed; a later run starts a new journal.
    Finished {
        at: DateTime<Utc>,
    },
}

/// What the journal knows about one source message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Possibly sent: the send was started but its answer was not recorded.
    Intent { key: String },
    /// In the target; the source copy may remain.
    Sent,
    /// In the target and deleted from the source.
    Deleted,
}

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    states: HashMap<String, State>,
    /// Whether this run continues an earlier, unfinished one.
    pub resumed: bool,
    /// The visibility timeout of the earlier run: how long its held messages stay hidden.
    pub previous_visibility_secs: Option<u64>,
}

impl Journal {
    /// Opens `path`, resuming it when it holds an unfinished run for the same source and
    /// target, or creating it (mode 0600, directories as needed).
    pub fn open(path: &Path, header: Record) -> Result<Journal> {
        let Record::Run { source, target, .. } = &header else {
            bail!("a journal starts with a run record");
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating journal directory {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening journal {}", path.display()))?;
        super::export::sync_parent_dir(path)?;
        let replay = replay(&file, path)?;
        let mut journal = Journal {
            path: path.to_path_buf(),
            states: HashMap::new(),
            resumed: false,
            previous_visibility_secs: None,
            file: file.try_clone()?,
        };
        if let Some(first) = replay.records.first() {
            let Record::Run {
                source: s,
                target: t,
                ..
            } = first
            else {
                bail!(
                    "journal {} does not start with a run record",
                    path.display()
                );
            };
            if s != source || t != target {
                bail!(
                    "journal {} belongs to a move from {s} to {t}, not from {source} to {target}; \
                     give another --journal",
                    path.display()
                );
            }
            if matches!(replay.records.last(), Some(Record::Finished { .. })) {
                bail!(
                    "journal {} records a finished move; give a new --journal (or none) to \
                     start another",
                    path.display()
                );
            }
            journal.resumed = true;
            for r in &replay.records {
                journal.apply(r);
            }
        }
        if let Some(len) = replay.truncate_to {
            // The last line was cut by a crash mid-write: drop it, so that the file stays
            // valid JSON lines. What it was announcing had not started (see `replay`).
            file.set_len(len)
                .with_context(|| format!("repairing journal {}", path.display()))?;
        }
        journal.append(&[header])?;
        Ok(journal)
    }

    fn apply(&mut self, r: &Record) {
        match r {
            Record::Run {
                visibility_timeout_secs,
                ..
            } => {
                let prev = self.previous_visibility_secs.unwrap_or(0);
                self.previous_visibility_secs = Some(prev.max(*visibility_timeout_secs));
            }
            Record::Intent { message_id, key } => {
                self.states
                    .entry(message_id.clone())
                    .or_insert_with(|| State::Intent { key: key.clone() });
            }
            Record::Sent { message_id, .. } => {
                let s = self.states.entry(message_id.clone()).or_insert(State::Sent);
                if *s != State::Deleted {
                    *s = State::Sent;
                }
            }
            Record::Failed { message_id, .. } => {
                if matches!(self.states.get(message_id), Some(State::Intent { .. })) {
                    self.states.remove(message_id);
                }
            }
            Record::Deleted { message_id } => {
                self.states.insert(message_id.clone(), State::Deleted);
            }
            Record::Stopped { .. } | Record::Finished { .. } => {}
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends records and flushes them to disk before returning.
    pub fn append(&mut self, records: &[Record]) -> Result<()> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("writing journal {}", self.path.display()))?;
        // Records already validated above; apply keeps states in step with the file.
        for r in records {
            self.apply(r);
        }
        Ok(())
    }

    pub fn state(&self, message_id: &str) -> Option<&State> {
        self.states.get(message_id)
    }

    /// Source messages the journal has sent or may have sent but not yet deleted.
    pub fn outstanding(&self) -> Vec<String> {
        self.states
            .iter()
            .filter(|(_, s)| !matches!(s, State::Deleted))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Messages in doubt: an intent with no recorded answer.
    pub fn in_doubt(&self) -> usize {
        self.states
            .values()
            .filter(|s| matches!(s, State::Intent { .. }))
            .count()
    }
}

struct Replay {
    records: Vec<Record>,
    /// Set when the last line is cut short: the length of the file without it.
    truncate_to: Option<u64>,
}

/// Reads every record. A final line cut short by a crash is ignored: its write had not
/// returned, so what it announced (a send) had not started. A bad line elsewhere is an error.
fn replay(file: &File, path: &Path) -> Result<Replay> {
    let mut reader = BufReader::new(file.try_clone()?);
    reader.seek(SeekFrom::Start(0))?;
    let mut records = Vec::new();
    let mut lines = Vec::new();
    let mut buf = String::new();
    loop {
        buf.clear();
        if reader.read_line(&mut buf)? == 0 {
            break;
        }
        lines.push(buf.clone());
    }
    let count = lines.len();
    let mut offset = 0u64;
    let mut truncate_to = None;
    for (i, line) in lines.iter().enumerate() {
        let start = offset;
        offset += line.len() as u64;
        if line.trim().is_empty() {
            continue;
        }
        // Only a line that ends in a newline was written whole (records are written
        // line by line and fsynced).
        let parsed = if line.ends_with('\n') {
            serde_json::from_str::<Record>(line).map_err(|e| e.to_string())
        } else {
            Err("no newline".to_string())
        };
        match parsed {
            Ok(r) => records.push(r),
            Err(_) if i + 1 == count => {
                tracing::warn!(journal = %path.display(), "dropping a cut-off last journal line");
                truncate_to = Some(start);
            }
            Err(e) => bail!("journal {} line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(Replay {
        records,
        truncate_to,
    })
}

/// The newest journal in `dir` for a move from `source` to `target` that did not finish.
pub fn find_unfinished(dir: &Path, source: &str, target: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("redrive-{}-to-{}-", sanitize(source), sanitize(target));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut candidates: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".jsonl"))
        })
        .collect();
    // Names end in a sortable UTC timestamp: newest last.
    candidates.sort();
    for path in candidates.into_iter().rev() {
        let file = File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let replay = replay(&file, &path)?;
        if !matches!(replay.records.last(), Some(Record::Finished { .. })) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// A new journal path in `dir` for a move from `source` to `target`.
pub fn new_path(dir: &Path, source: &str, target: &str) -> PathBuf {
    dir.join(format!(
        "redrive-{}-to-{}-{}.jsonl",
        sanitize(source),
        sanitize(target),
        Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
    ))
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(source: &str) -> Record {
        Record::Run {
            source: source.into(),
            target: "t".into(),
            filters: vec![],
            visibility_timeout_secs: 7,
            at: Utc::now(),
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("of-journal-{}", uuid::Uuid::new_v4()));
        dir.join(name)
    }

    #[test]
    fn a_reopened_journal_remembers_what_was_sent_deleted_or_in_doubt() {
        let path = temp("j.jsonl");
        let mut j = Journal::open(&path, header("s")).unwrap();
        assert!(!j.resumed);
        let intent = |id: &str| Record::Intent {
            message_id: id.into(),
            key: format!("k-{id}"),
        };
        j.append(&[intent("a"), intent("b"), intent("c"), intent("d")])
            .unwrap();
        j.append(&[
            Record::Sent {
                message_id: "a".into(),
                key: "k-a".into(),
                target_message_id: "ta".into(),
            },
            Record::Sent {
                message_id: "b".into(),
                key: "k-b".into(),
                target_message_id: "tb".into(),
            },
            Record::Failed {
                message_id: "d".into(),
                key: "k-d".into(),
                reason: "too big".into(),
            },
        ])
        .unwrap();
        j.append(&[Record::Deleted {
            message_id: "a".into(),
        }])
        .unwrap();
        drop(j);
        // A crash mid-write leaves a cut line at the end.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"type":"intent","mess"#).unwrap();
        drop(f);

        let j = Journal::open(&path, header("s")).unwrap();
        assert!(j.resumed);
        assert_eq!(j.previous_visibility_secs, Some(7));
        assert_eq!(j.state("a"), Some(&State::Deleted));
        assert_eq!(j.state("b"), Some(&State::Sent));
        assert_eq!(j.state("c"), Some(&State::Intent { key: "k-c".into() }));
        assert_eq!(j.state("d"), None);
        assert_eq!(j.in_doubt(), 1);
        let mut out = j.outstanding();
        out.sort();
        assert_eq!(out, vec!["b", "c"]);
        // The file is still valid JSON lines after the repair.
        drop(j);
        assert!(Journal::open(&path, header("s")).is_ok());
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn a_journal_of_another_move_or_a_finished_one_is_refused() {
        let path = temp("j.jsonl");
        let mut j = Journal::open(&path, header("s")).unwrap();
        drop(Journal::open(&path, header("other")).unwrap_err());
        j.append(&[Record::Finished { at: Utc::now() }]).unwrap();
        let err = Journal::open(&path, header("s")).unwrap_err();
        assert!(err.to_string().contains("finished"), "{err}");
    }

    #[test]
    fn the_newest_unfinished_journal_of_a_move_is_found() {
        let dir = temp("x").parent().unwrap().to_path_buf();
        let old = dir.join("redrive-s-to-t-20260101T000000.000Z.jsonl");
        let new = dir.join("redrive-s-to-t-20260102T000000.000Z.jsonl");
        let mut j = Journal::open(&old, header("s")).unwrap();
        Journal::open(&new, header("s"))
            .unwrap()
            .append(&[Record::Finished { at: Utc::now() }])
            .unwrap();
        assert_eq!(find_unfinished(&dir, "s", "t").unwrap(), Some(old.clone()));
        j.append(&[Record::Finished { at: Utc::now() }]).unwrap();
        assert_eq!(find_unfinished(&dir, "s", "t").unwrap(), None);
        assert_eq!(find_unfinished(&dir, "s", "u").unwrap(), None);
    }
}
