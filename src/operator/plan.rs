//! What a redrive would do, worked out without changing anything: `dlq peek` and
//! `dlq redrive --dry-run` read the queue through a [`Scanner`] and give every message back.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::filter::{self, Filter};
use super::message::{DlqMessage, Summary};
use super::scan::Scanner;

/// Samples a plan shows.
const SAMPLES: usize = 3;

/// Reads up to `limit` matching messages (all of them for `None`) and releases everything it
/// read. Returns the matches and how many distinct messages were examined.
pub async fn peek(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    visibility: Duration,
    filters: &[Filter],
    limit: Option<u64>,
    stop: &CancellationToken,
) -> Result<(Vec<DlqMessage>, u64)> {
    let mut scanner = Scanner::new(sqs, url, visibility);
    let mut found = Vec::new();
    let mut examined = 0u64;
    let result = async {
        while !scanner.exhausted() && !stop.is_cancelled() {
            if limit.is_some_and(|l| found.len() as u64 >= l) {
                break;
            }
            let now = Utc::now();
            for r in scanner.receive(10).await? {
                if !r.first_time {
                    continue;
                }
                examined += 1;
                let m = DlqMessage::new(r.message);
                if limit.map_or(true, |l| (found.len() as u64) < l)
                    && filter::all_match(filters, &m, now)
                {
                    found.push(m);
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    // Always give the messages back, also after an error.
    scanner.release_all().await;
    result?;
    Ok((found, examined))
}

/// A redrive's plan: what would move, grouped the ways an operator asks about.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub source: String,
    pub target: String,
    /// `native` (StartMessageMoveTask) or `client-side`.
    pub method: String,
    pub filters: Vec<String>,
    pub examined: u64,
    pub matching: u64,
    pub by_detail_type: BTreeMap<String, u64>,
    pub by_reason: BTreeMap<String, u64>,
    pub samples: Vec<Summary>,
}

impl Plan {
    /// Groups `matching` messages into a plan.
    pub fn new(
        source: &str,
        target: &str,
        method: &str,
        filters: &[Filter],
        matching: &[DlqMessage],
        examined: u64,
    ) -> Plan {
        let now = Utc::now();
        let mut by_detail_type = BTreeMap::new();
        let mut by_reason = BTreeMap::new();
        for m in matching {
            let dt = m.detail_type().unwrap_or("(not an event)").to_string();
            *by_detail_type.entry(dt).or_insert(0) += 1;
            let reason = m.reason().unwrap_or("(no reason recorded)").to_string();
            *by_reason.entry(reason).or_insert(0) += 1;
        }
        Plan {
            source: source.to_string(),
            target: target.to_string(),
            method: method.to_string(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
            examined,
            matching: matching.len() as u64,
            by_detail_type,
            by_reason,
            samples: matching
                .iter()
                .take(SAMPLES)
                .map(|m| m.summary(now))
                .collect(),
        }
    }
}
