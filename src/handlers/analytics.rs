//! analytics: archives every event on the bus to the S3 data lake.
//!
//! | event | effect | emits |
//! |---|---|---|
//! | every detail-type | its lake record in `lake_outbox`, redacted | (none) |
//!
//! Records are redacted first ([`crate::domain::redaction`]): no payment token, customers
//! under a keyed hash, addresses cut to country and postal-code prefix.
//!
//! The handler only writes the record in its transaction; the [`crate::store::lake::LakeShipper`]
//! batches pending records into PutRecordBatch calls to Firehose. [`crate::store::lake`] explains
//! why the work is split that way and what it guarantees.
//!
//! What happens if two processes, or a crash, land here: the handler calls nothing outside;
//! two processes with one event are settled by the inbox (and `lake_outbox.event_key`), and a
//! crash rolls the record back with the inbox row, so the redelivery writes it. The Firehose
//! call, and its crash window, belong to the shipper: see [`crate::store::lake`].

use async_trait::async_trait;

use crate::domain::envelope::Envelope;
use crate::domain::outcome::HandlerError;
use crate::domain::redaction::Redactor;
use crate::handlers::{Context, Handler};
use crate::store::db::Tx;
use crate::store::lake;

/// The analytics handler.
#[derive(Debug, Clone)]
pub struct Analytics {
    redactor: Redactor,
}

impl Analytics {
    /// Archives events as `redactor` leaves them (see [`crate::domain::redaction`]).
    pub fn new(redactor: Redactor) -> Self {
        Analytics { redactor }
    }
}

#[async_trait]
impl Handler for Analytics {
    /// The group's records, written in one insert by [`Handler::finish`].
    type Batch = lake::Records;

    fn name(&self) -> &str {
        "analytics"
    }

    /// Archiving is an insert into `lake_outbox` and nothing else (the shipper calls Firehose
    /// later, outside the transaction), so events share transactions. Every event of an order
    /// reaches this handler, so this is most of the fleet's transactions when it is off.
    fn group_commit(&self) -> bool {
        true
    }

    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, lake::Records>,
    ) -> Result<(), HandlerError> {
        // Any detail-type is archived, catalogued or not: the lake is the record of what was
        // on the bus. The record is written with the rest of the transaction's, at its end.
        cx.batch.add(event, &self.redactor)
    }

    async fn finish(&self, tx: &Tx, records: lake::Records) -> Result<(), HandlerError> {
        records.write(tx).await?;
        Ok(())
    }
}
