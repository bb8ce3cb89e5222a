//! The email suppression list as the operator sees it (`orderfleet email suppressions`): the
//! rows of `email_suppressions` (a keyed hash and a masked form of each address, never the
//! address) and their removal. The operator role may read and delete those rows, nothing more
//! (migration 0019); adding is the notifications worker's, from SES's reports.

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;

/// One suppressed address.
#[derive(Debug, Clone, Serialize)]
pub struct Suppression {
    pub address_hash: String,
    pub address_masked: String,
    /// `bounce` (permanent) or `complaint`.
    pub reason: String,
    /// SES's bounce subtype or complaint feedback type.
    pub detail: Option<String>,
    /// The EventBridge id of the event that suppressed the address.
    pub source_event_id: String,
    pub last_event_id: String,
    pub events: i32,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// Every suppressed address, most recently seen first.
pub async fn list(db: &impl GenericClient) -> Result<Vec<Suppression>> {
    let rows = db
        .query(
            "SELECT address_hash, address_masked, reason, detail, source_event_id,
                    last_event_id, events, first_seen, last_seen
               FROM email_suppressions ORDER BY last_seen DESC, address_hash",
            &[],
        )
        .await
        .context("reading the suppression list")?;
    Ok(rows
        .iter()
        .map(|r| Suppression {
            address_hash: r.get(0),
            address_masked: r.get(1),
            reason: r.get(2),
            detail: r.get(3),
            source_event_id: r.get(4),
            last_event_id: r.get(5),
            events: r.get(6),
            first_seen: r.get(7),
            last_seen: r.get(8),
        })
        .collect())
}

/// Removes the suppression of the address whose hash is `address_hash`. Returns what was
/// removed, `None` when the address was not suppressed.
pub async fn remove(db: &impl GenericClient, address_hash: &str) -> Result<Option<Suppression>> {
    let row = db
        .query_opt(
            "DELETE FROM email_suppressions WHERE address_hash = $1
             RETURNING address_hash, address_masked, reason, detail, source_event_id,
                       last_event_id, events, first_seen, last_seen",
            &[&address_hash],
        )
        .await
        .context("removing the suppression")?;
    Ok(row.map(|r| Suppression {
        address_hash: r.get(0),
        address_masked: r.get(1),
        reason: r.get(2),
        detail: r.get(3),
        source_event_id: r.get(4),
        last_event_id: r.get(5),
        events: r.get(6),
        first_seen: r.get(7),
        last_seen: r.get(8),
    }))
}
