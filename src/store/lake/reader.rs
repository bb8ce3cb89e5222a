//! Reading the lake back (`orderfleet lake stats`), and finding its bucket.
//!
//! The delivery stream's prefix is [`crate::infra::topology::LAKE_PREFIX`]: Firehose writes
//! `events/year=YYYY/month=MM/day=DD/<stream>-<version>-<time>-<uuid>`, the day being when
//! Firehose received the records (UTC). moto 5.2.5 writes one object per PutRecordBatch,
//! synchronously, but keeps the prefix's `!{timestamp:...}` expressions literally and appends
//! its own `YYYY/MM/DD/HH/` instead. [`partition_day`] reads both layouts.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context as _, Result};
use chrono::NaiveDate;
use serde::Serialize;
use serde_json::Value;

use super::EVENTS_PREFIX;
use crate::domain::outcome::error_chain;

/// The bucket the delivery stream `stream` writes to, from its S3 destination. This finds
/// the bucket of the CloudFormation stack (whose name AWS generates) as well as a
/// provisioned one.
pub async fn resolve_bucket(firehose: &aws_sdk_firehose::Client, stream: &str) -> Result<String> {
    let out = firehose
        .describe_delivery_stream()
        .delivery_stream_name(stream)
        .send()
        .await
        .map_err(|e| {
            anyhow!(
                "describing delivery stream {stream} (run `orderfleet provision`, or give \
                 --lake-bucket): {}",
                error_chain(&e)
            )
        })?;
    let arn = out
        .delivery_stream_description()
        .and_then(|d| d.destinations().first())
        .and_then(|d| {
            d.extended_s3_destination_description()
                .map(|x| x.bucket_arn().to_string())
                .or_else(|| {
                    d.s3_destination_description()
                        .map(|x| x.bucket_arn().to_string())
                })
        })
        .with_context(|| format!("delivery stream {stream} has no S3 destination"))?;
    // arn:aws:s3:::bucket
    Ok(arn.rsplit(':').next().unwrap_or(&arn).to_string())
}

/// The UTC day a lake object's key is partitioned under: `year=YYYY/month=MM/day=DD/` (what
/// Firehose writes with our prefix), else moto's `.../YYYY/MM/DD/HH/<name>`.
pub fn partition_day(key: &str) -> Option<NaiveDate> {
    let segments: Vec<&str> = key.split('/').collect();
    let field = |name: &str| {
        segments
            .iter()
            .find_map(|s| s.strip_prefix(name).and_then(|v| v.parse::<u32>().ok()))
    };
    if let (Some(y), Some(m), Some(d)) = (field("year="), field("month="), field("day=")) {
        return NaiveDate::from_ymd_opt(i32::try_from(y).ok()?, m, d);
    }
    // moto: <literal prefix>YYYY/MM/DD/HH/<stream>-<version>-<time>-<uuid>
    let n = segments.len();
    if n < 5 {
        return None;
    }
    let num = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    let (y, m, d) = (
        num(segments[n - 5], 4)?,
        num(segments[n - 4], 2)?,
        num(segments[n - 3], 2)?,
    );
    num(segments[n - 2], 2)?;
    NaiveDate::from_ymd_opt(i32::try_from(y).ok()?, m, d)
}

/// One record read back from the lake.
#[derive(Debug, Clone)]
pub struct LakeRecord {
    /// The object it came from.
    pub key: String,
    /// The object's partition day (see [`partition_day`]).
    pub partition: Option<NaiveDate>,
    /// The record: an EventBridge envelope.
    pub event: Value,
}

impl LakeRecord {
    /// The record's detail-type.
    pub fn detail_type(&self) -> &str {
        self.event
            .get("detail-type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The logical event it archives: `detail.event_id` for the fleet's own events, else the
    /// EventBridge `id` (as [`Envelope::event_key`]).
    pub fn event_key(&self) -> &str {
        self.event
            .get("detail")
            .and_then(|d| d.get("event_id"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .or_else(|| self.event.get("id").and_then(Value::as_str))
            .unwrap_or("")
    }

    /// The UTC day of the event's `time`.
    pub fn day(&self) -> Option<NaiveDate> {
        let time = self.event.get("time").and_then(Value::as_str)?;
        chrono::DateTime::parse_from_rfc3339(time)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc).date_naive())
    }
}

/// Everything read back from the lake bucket under `events/`, in memory: for tests and small
/// lakes. `orderfleet lake stats` uses [`LakeStats::gather`], which keeps no record.
pub async fn read(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<(Vec<LakeRecord>, Lake)> {
    let mut records = Vec::new();
    let lake = for_each_record(s3, bucket, |r| records.push(r)).await?;
    Ok((records, lake))
}

/// Hands every record of the lake bucket under `events/` to `each`, object by object (listing
/// paginates; one object's body is in memory at a time). Lines that are not JSON objects are
/// counted in `unreadable`, not handed over.
pub async fn for_each_record(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    mut each: impl FnMut(LakeRecord),
) -> Result<Lake> {
    let mut lake = Lake {
        bucket: bucket.to_string(),
        objects: 0,
        unreadable: 0,
    };
    let mut pages = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(EVENTS_PREFIX)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page =
            page.map_err(|e| anyhow!("listing lake bucket {bucket}: {}", error_chain(&e)))?;
        for object in page.contents() {
            let Some(key) = object.key() else { continue };
            let body = s3
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| anyhow!("reading lake object {key}: {}", error_chain(&e)))?
                .body
                .collect()
                .await
                .with_context(|| format!("reading lake object {key}"))?
                .into_bytes();
            lake.objects += 1;
            let partition = partition_day(key);
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice::<Value>(line) {
                    Ok(event) if event.is_object() => each(LakeRecord {
                        key: key.to_string(),
                        partition,
                        event,
                    }),
                    _ => lake.unreadable += 1,
                }
            }
        }
    }
    Ok(lake)
}

/// Where records were read from.
#[derive(Debug, Clone, Serialize)]
pub struct Lake {
    pub bucket: String,
    /// Objects read.
    pub objects: u64,
    /// Lines that were not JSON objects.
    pub unreadable: u64,
}

/// What `orderfleet lake stats` reports.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LakeStats {
    pub bucket: String,
    pub objects: u64,
    /// Records (lines) read, copies included.
    pub records: u64,
    /// Distinct events (by detail-type and event key) among them.
    pub distinct_events: u64,
    /// Records that repeat an event already counted (see the module header on when Firehose
    /// or a crash can cause them).
    pub duplicates: u64,
    pub unreadable: u64,
    /// Distinct events per detail-type.
    pub by_detail_type: BTreeMap<String, u64>,
    /// Distinct events per UTC day of their `time` (`YYYY-MM-DD`).
    pub by_day: BTreeMap<String, u64>,
    /// Records per partition day of their object key (`YYYY-MM-DD`, or `unpartitioned`).
    pub by_partition: BTreeMap<String, u64>,
}

impl LakeStats {
    /// Counts the lake bucket's records as they are read, keeping none of them: its memory is
    /// one object's body and one key per distinct event.
    pub async fn gather(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<LakeStats> {
        let mut counter = Counter::default();
        let lake = for_each_record(s3, bucket, |r| counter.add(&r)).await?;
        Ok(counter.finish(&lake))
    }

    /// Counts `records` read from `lake`.
    pub fn from_records(lake: &Lake, records: &[LakeRecord]) -> LakeStats {
        let mut counter = Counter::default();
        for r in records {
            counter.add(r);
        }
        counter.finish(lake)
    }
}

/// [`LakeStats`] being counted.
#[derive(Default)]
struct Counter {
    seen: std::collections::HashSet<(String, String)>,
    stats: LakeStats,
}

impl Counter {
    fn add(&mut self, r: &LakeRecord) {
        let stats = &mut self.stats;
        stats.records += 1;
        let partition = r
            .partition
            .map(|d| d.to_string())
            .unwrap_or_else(|| "unpartitioned".into());
        *stats.by_partition.entry(partition).or_default() += 1;
        // A producer may reuse one id across detail-types: the pair is the event.
        if !self
            .seen
            .insert((r.detail_type().to_string(), r.event_key().to_string()))
        {
            stats.duplicates += 1;
            return;
        }
        stats.distinct_events += 1;
        *stats
            .by_detail_type
            .entry(r.detail_type().to_string())
            .or_default() += 1;
        let day = r
            .day()
            .map(|d| d.to_string())
            .unwrap_or_else(|| "unknown".into());
        *stats.by_day.entry(day).or_default() += 1;
    }

    fn finish(self, lake: &Lake) -> LakeStats {
        LakeStats {
            bucket: lake.bucket.clone(),
            objects: lake.objects,
            unreadable: lake.unreadable,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_partition_layouts_give_the_day() {
        let day = NaiveDate::from_ymd_opt(2026, 3, 7);
        assert_eq!(
            partition_day(
                "events/year=2026/month=03/day=07/orderfleet-lake-1-2026-03-07-10-00-00-abc"
            ),
            day
        );
        assert_eq!(
            partition_day("events/year=!{timestamp:yyyy}/month=!{timestamp:MM}/day=!{timestamp:dd}/2026/03/07/10/s-1-2026-03-07-10-00-00-abc"),
            day
        );
        assert_eq!(partition_day("events/whatever"), None);
    }
}
