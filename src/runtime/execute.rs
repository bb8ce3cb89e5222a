//! One event in one transaction: the inbox claim, the handler's effects and its outbox rows
//! commit together or not at all ([`execute`]), and the [`Apply`] seam through which a consumer
//! runs it.

use std::sync::Arc;

use deadpool_postgres::Pool;

use crate::domain::envelope::Envelope;
use crate::domain::outcome::HandlerError;
use crate::handlers::{AnyHandler, Context};
use crate::store::db::OpenTransaction;
use crate::store::inbox;
use crate::store::outbox::{self, NewEvent};

/// What one message's handling came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Executed {
    /// The handler's effects committed; it emitted this many events.
    Applied { emitted: usize },
    /// The event was processed before; nothing was applied.
    Duplicate,
}

/// Runs `handler` on `event` in one transaction: the inbox claim, the handler's effects and
/// its outbox rows commit together or not at all. This is the whole exactly-once story; it
/// knows nothing of SQS and is reused by the in-process benchmark.
pub async fn execute(
    handler: &dyn AnyHandler,
    pool: &Pool,
    event: &Envelope,
    receive_count: u32,
) -> Result<Executed, HandlerError> {
    execute_handing_off(handler, pool, event, receive_count, None).await
}

/// [`execute`], publishing what the handler emitted through `handoff` once it committed (see
/// [`outbox::Handoff`]); without one, the rows wait for a relay.
pub async fn execute_handing_off(
    handler: &dyn AnyHandler,
    pool: &Pool,
    event: &Envelope,
    receive_count: u32,
    handoff: Option<&outbox::Handoff>,
) -> Result<Executed, HandlerError> {
    let open = OpenTransaction::new(pool.get().await?);
    let tx = open.tx();
    // Pipelined: the claim is sent right behind BEGIN, without waiting for it. BEGIN fails
    // only when the connection does, and then so does the claim.
    let (begun, claimed) = tokio::join!(
        tx.batch_execute("BEGIN"),
        inbox::claim(
            tx,
            handler.name(),
            event.event_key(),
            &event.detail_type,
            event.order_id()
        )
    );
    begun.map_err(|e| HandlerError::from_db("beginning a transaction", &e))?;
    match claimed {
        Ok(true) => {}
        Ok(false) => {
            roll_back(open).await;
            return Ok(Executed::Duplicate);
        }
        Err(e) => {
            roll_back(open).await;
            return Err(e);
        }
    }
    let mut cx = Context::new(tx, receive_count);
    let handled = handler.handle(event, &mut cx).await;
    let emitted = std::mem::take(&mut cx.emitted);
    let state = std::mem::take(&mut cx.batch);
    drop(cx);
    let finished = match handled {
        Ok(()) => handler.finish(tx, state).await,
        Err(e) => Err(e),
    };
    if let Err(e) = finished {
        roll_back(open).await;
        return Err(e);
    }
    let n = emitted.len();
    commit_with_outbox(open, &handler.source(), emitted, handoff).await?;
    Ok(Executed::Applied { emitted: n })
}

/// Writes `emitted` to the outbox and commits `open`'s transaction. Pipelined: the outbox
/// rows and `COMMIT` leave together. The rows' statement is prepared first, so nothing can
/// overtake it. If the insert fails, the transaction is aborted and PostgreSQL answers the
/// `COMMIT` with a rollback. With a `handoff`, the rows are written claimed and published by it
/// once committed.
pub(super) async fn commit_with_outbox(
    open: OpenTransaction,
    source: &str,
    emitted: Vec<NewEvent>,
    handoff: Option<&outbox::Handoff>,
) -> Result<(), HandlerError> {
    let tx = open.tx();
    let claim = handoff.and_then(outbox::Handoff::claim);
    let rows = match outbox::OutboxRows::prepare(tx, source, emitted, claim).await {
        Ok(rows) => rows,
        Err(e) => {
            roll_back(open).await;
            return Err(e);
        }
    };
    // With no rows to write, a prepared `SELECT 1` goes in their place: PostgreSQL answers a
    // COMMIT of an aborted transaction with a rollback, not an error, so something in front of
    // it has to fail.
    let probe = match &rows {
        Some(_) => None,
        None => match tx.prepare_cached("SELECT 1").await {
            Ok(probe) => Some(probe),
            Err(e) => {
                roll_back(open).await;
                return Err(HandlerError::from_db("preparing the commit check", &e));
            }
        },
    };
    let written = async {
        match (&rows, &probe) {
            (Some(rows), _) => rows.write(tx).await,
            (None, Some(probe)) => tx
                .query(probe, &[])
                .await
                .map(drop)
                .map_err(|e| HandlerError::from_db("checking the transaction", &e)),
            (None, None) => Ok(()),
        }
    };
    let (written, committed) = tokio::join!(written, tx.batch_execute("COMMIT"));
    committed.map_err(|e| HandlerError::from_db("committing", &e))?;
    open.finished();
    written?;
    if let (Some(handoff), Some(rows)) = (handoff, rows) {
        handoff.committed(rows);
    }
    Ok(())
}

/// Ends `open`'s transaction with ROLLBACK and gives the connection back; if even that fails,
/// the connection is closed instead.
pub(super) async fn roll_back(open: OpenTransaction) {
    if open.tx().batch_execute("ROLLBACK").await.is_ok() {
        open.finished();
    }
}

/// How a consumer applies one decoded event. [`Transactional`] is the production
/// implementation; the throughput benchmark plugs in a no-op to measure the runtime alone.
#[async_trait::async_trait]
pub trait Apply: Send + Sync + 'static {
    /// The handler's name, for logs, metrics and the DLQ attributes.
    fn name(&self) -> &str;
    /// `event` is shared: a handler that keeps it past the call (a group's queue) keeps the
    /// consumer's copy rather than a deep clone of its JSON.
    async fn apply(
        &self,
        event: &Arc<Envelope>,
        receive_count: u32,
    ) -> Result<Executed, HandlerError>;

    /// Whether `event`'s effects are committed, waiting for a transaction that is committing
    /// them right now. Asked after the consumer stopped waiting for [`Apply::apply`] (its
    /// timeout) on the message's last allowed receive: an event whose group committed it after
    /// all must be acknowledged, not dead-lettered as exhausted. `None`: cannot tell.
    async fn applied(&self, _event: &Envelope) -> Option<bool> {
        None
    }
}

/// Whether `handler` has committed `event`, found by claiming it in a transaction that is then
/// rolled back: a claim of a key another transaction is inserting waits for that transaction,
/// so an event being committed right now is seen once it is. `None` on a database error.
pub async fn committed(pool: &Pool, handler: &str, event: &Envelope) -> Option<bool> {
    let open = OpenTransaction::new(pool.get().await.ok()?);
    let tx = open.tx();
    let claimed = match tx.batch_execute("BEGIN").await {
        Ok(()) => inbox::claim(
            tx,
            handler,
            event.event_key(),
            &event.detail_type,
            event.order_id(),
        )
        .await
        .ok(),
        Err(_) => None,
    };
    roll_back(open).await;
    claimed.map(|claimed| !claimed)
}

/// A handler run by [`execute`]: inbox, effects and outbox in one PostgreSQL transaction.
pub struct Transactional {
    pub handler: Arc<dyn AnyHandler>,
    pub pool: Pool,
    /// Publishes what a committed event emitted (see [`outbox::Handoff`]).
    pub handoff: Option<outbox::Handoff>,
}

impl Transactional {
    pub fn new(handler: Arc<dyn AnyHandler>, pool: Pool) -> Arc<Self> {
        Self::handing_off(handler, pool, None)
    }

    /// [`Transactional::new`], publishing on commit through `handoff`.
    pub fn handing_off(
        handler: Arc<dyn AnyHandler>,
        pool: Pool,
        handoff: Option<outbox::Handoff>,
    ) -> Arc<Self> {
        Arc::new(Transactional {
            handler,
            pool,
            handoff,
        })
    }
}

#[async_trait::async_trait]
impl Apply for Transactional {
    fn name(&self) -> &str {
        self.handler.name()
    }
    async fn apply(
        &self,
        event: &Arc<Envelope>,
        receive_count: u32,
    ) -> Result<Executed, HandlerError> {
        execute_handing_off(
            &*self.handler,
            &self.pool,
            event,
            receive_count,
            self.handoff.as_ref(),
        )
        .await
    }
    async fn applied(&self, event: &Envelope) -> Option<bool> {
        committed(&self.pool, self.handler.name(), event).await
    }
}
