//! The business logic of each worker, one file per handler. Handlers know nothing of SQS: they
//! get a decoded event and a database transaction, write their effects, and emit events into
//! the outbox through [`Context::emit`]. The runtime commits, acknowledges and retries.

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use serde::Serialize;
use serde_json::Value;

use crate::envelope::Envelope;
use crate::outcome::HandlerError;

/// One worker's business logic.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The handler's name: its queue suffix, its inbox key and its metrics dimension.
    fn name(&self) -> &str;

    /// The `source` of events this handler emits.
    fn source(&self) -> String {
        format!("orderfleet.{}", self.name())
    }

    /// Applies one event inside `cx.tx`. Returning an error rolls the transaction back.
    async fn handle(&self, event: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError>;
}

/// An event a handler asks to publish once its transaction commits.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub detail_type: String,
    pub detail: Value,
}

/// What a handler sees besides the event: its transaction, and where to put what it emits.
pub struct Context<'a> {
    pub tx: &'a Transaction<'a>,
    /// SQS's ApproximateReceiveCount for this delivery (1 on the first).
    pub receive_count: u32,
    pub(crate) emitted: Vec<NewEvent>,
}

impl<'a> Context<'a> {
    pub fn new(tx: &'a Transaction<'a>, receive_count: u32) -> Self {
        Context {
            tx,
            receive_count,
            emitted: Vec::new(),
        }
    }

    /// Queues an event for the outbox. It is written in this handler's transaction, so it is
    /// published if and only if the handler's effects commit.
    pub fn emit(&mut self, detail_type: &str, detail: &impl Serialize) -> Result<(), HandlerError> {
        let detail = serde_json::to_value(detail)
            .map_err(|e| HandlerError::permanent(format!("serialising {detail_type}: {e}")))?;
        if !detail.is_object() {
            return Err(HandlerError::permanent(format!(
                "{detail_type} detail must be a JSON object"
            )));
        }
        self.emitted.push(NewEvent {
            detail_type: detail_type.to_string(),
            detail,
        });
        Ok(())
    }

    /// The events emitted so far.
    pub fn emitted(&self) -> &[NewEvent] {
        &self.emitted
    }
}

pub mod inventory;

use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use deadpool_postgres::Pool;

use crate::aws::Clients;
use crate::topology::HandlerName;

/// Settings the handlers themselves need (providers, carriers, transports).
#[derive(Debug, Clone, Args, Default)]
pub struct DepsArgs {}

/// What handlers are built from: the pool, the AWS clients and their own settings.
#[derive(Clone)]
pub struct Deps {
    pub pool: Pool,
    pub clients: Clients,
    pub args: DepsArgs,
}

impl Deps {
    pub async fn new(args: &DepsArgs, pool: &Pool, clients: &Clients) -> Result<Self> {
        Ok(Deps {
            pool: pool.clone(),
            clients: clients.clone(),
            args: args.clone(),
        })
    }
}

/// Builds the handler called `name`.
pub fn build(name: HandlerName, _deps: &Deps) -> Result<Arc<dyn Handler>> {
    match name {
        HandlerName::Inventory => Ok(Arc::new(inventory::Inventory)),
        other => anyhow::bail!(
            "handler {other} is not implemented in this build; run the implemented handlers with --handler"
        ),
    }
}
