//! The business logic of each worker, one file per handler. Handlers know nothing of SQS: they
//! get a decoded event and a database transaction, write their effects, and emit events into
//! the outbox through [`Context::emit`]. The runtime commits, acknowledges and retries.

use std::any::Any;
use std::time::Duration;

use crate::store::outbox::NewEvent;
use async_trait::async_trait;
use serde::Serialize;

use crate::domain::envelope::Envelope;
use crate::domain::outcome::HandlerError;
use crate::store::db::{Cached, Tx};

/// One worker's business logic.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// What one transaction of this handler keeps across its events: rows it already locked
    /// and read, writes it deferred to [`Handler::finish`]. Made empty ([`Default`]) at the
    /// start of every transaction and dropped with it, so nothing outlives a rollback. `()`
    /// for a handler that keeps nothing.
    type Batch: Default + Send + Sync + 'static;

    /// The handler's name: its queue suffix, its inbox key and its metrics dimension.
    fn name(&self) -> &str;

    /// The `source` of events this handler emits.
    fn source(&self) -> String {
        format!("orderfleet.{}", self.name())
    }

    /// Applies one event inside `cx.tx`. Returning an error rolls the transaction back.
    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, Self::Batch>,
    ) -> Result<(), HandlerError>;

    /// Whether several events may share one transaction
    /// ([`crate::runtime::group`]). Say yes only when handling an event is database work:
    /// in a group, events are handled one after the other, so a remote call's wait (a real
    /// payment provider, a carrier, an email) would hold up the whole group.
    fn group_commit(&self) -> bool {
        false
    }

    /// Called once at the start of a group transaction, before any of `events` is handled:
    /// takes every lock the group's events will take, in one global order (sorted keys), so
    /// that two groups never each hold what the other waits for. A lock taken later in a
    /// different order is still correct (PostgreSQL detects the deadlock and the group's
    /// events are run alone), only slower. What it read may be kept in `batch`, which the
    /// group's events see as [`Context::batch`].
    async fn lock_group(
        &self,
        _tx: &Tx,
        _events: &[&Envelope],
        _batch: &mut Self::Batch,
    ) -> Result<(), HandlerError> {
        Ok(())
    }

    /// Called once after the last event of a transaction (one event, or a group) was handled,
    /// before the commit: writes what the handler deferred in its batch. An error rolls the
    /// transaction back.
    async fn finish(&self, _tx: &Tx, _batch: Self::Batch) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// A [`Handler`] as the runtime drives it, whatever its [`Handler::Batch`]: every handler is
/// one (a blanket implementation), and `dyn AnyHandler` is what the runtime, the worker and
/// the in-process fleet hold. The batch travels between the runtime's calls as a
/// [`GroupState`], which only this implementation opens, always as the handler's own type.
#[async_trait]
pub trait AnyHandler: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn source(&self) -> String;
    fn group_commit(&self) -> bool;
    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, GroupState>,
    ) -> Result<(), HandlerError>;
    async fn lock_group(
        &self,
        tx: &Tx,
        events: &[&Envelope],
        state: &mut GroupState,
    ) -> Result<(), HandlerError>;
    async fn finish(&self, tx: &Tx, state: GroupState) -> Result<(), HandlerError>;
}

#[async_trait]
impl<H: Handler> AnyHandler for H {
    fn name(&self) -> &str {
        Handler::name(self)
    }

    fn source(&self) -> String {
        Handler::source(self)
    }

    fn group_commit(&self) -> bool {
        Handler::group_commit(self)
    }

    async fn handle(
        &self,
        event: &Envelope,
        cx: &mut Context<'_, GroupState>,
    ) -> Result<(), HandlerError> {
        let mut typed = Context {
            tx: cx.tx,
            receive_count: cx.receive_count,
            deadline: cx.deadline,
            emitted: std::mem::take(&mut cx.emitted),
            batch: std::mem::take(&mut cx.batch).into_batch::<H::Batch>(),
        };
        let result = Handler::handle(self, event, &mut typed).await;
        cx.emitted = typed.emitted;
        cx.batch = GroupState::of(typed.batch);
        result
    }

    async fn lock_group(
        &self,
        tx: &Tx,
        events: &[&Envelope],
        state: &mut GroupState,
    ) -> Result<(), HandlerError> {
        let mut batch = std::mem::take(state).into_batch::<H::Batch>();
        let result = Handler::lock_group(self, tx, events, &mut batch).await;
        *state = GroupState::of(batch);
        result
    }

    async fn finish(&self, tx: &Tx, state: GroupState) -> Result<(), HandlerError> {
        Handler::finish(self, tx, state.into_batch::<H::Batch>()).await
    }
}

/// A handler's [`Handler::Batch`] between the runtime's calls, its type erased. Empty at the
/// start of every transaction.
#[derive(Default)]
pub struct GroupState(Option<Box<dyn Any + Send + Sync>>);

impl GroupState {
    fn of<B: Send + Sync + 'static>(batch: B) -> Self {
        GroupState(Some(Box::new(batch)))
    }

    /// The batch inside, or an empty one. Only [`AnyHandler`]'s implementation for `H` ever
    /// fills a state, and always with `H::Batch`: another type here is a bug in the runtime.
    fn into_batch<B: Default + 'static>(self) -> B {
        match self.0 {
            None => B::default(),
            Some(any) => match any.downcast::<B>() {
                Ok(batch) => *batch,
                Err(_) => panic!(
                    "a group state of another handler reached {}",
                    std::any::type_name::<B>()
                ),
            },
        }
    }
}

/// A state column's enum: its variants, the text each is stored as and, for states that only
/// move forward, each one's rank (`advance_to` never moves a value back, so a duplicate or a
/// stale event changes nothing). Every handler's state enum is written with it.
macro_rules! stored_states {
    (
        $(#[$doc:meta])* $vis:vis $name:ident in $what:literal {
            $($variant:ident = $text:literal $(, $rank:literal)?;)*
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name { $($variant),* }

        // Not every state is both written and read as text.
        #[allow(dead_code)]
        impl $name {
            /// The value stored in PostgreSQL.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }

            /// Reads a stored value. An unknown one (written by a newer version) is permanent.
            pub fn parse(s: &str) -> Result<Self, $crate::domain::outcome::HandlerError> {
                match s {
                    $($text => Ok($name::$variant),)*
                    other => Err($crate::domain::outcome::HandlerError::permanent(format!(
                        "unknown {} {other:?}", $what
                    ))),
                }
            }
        }

        $crate::handlers::stored_states!(@rank $name { $($variant $(, $rank)?;)* });
    };
    (@rank $name:ident { $($variant:ident;)* }) => {};
    (@rank $name:ident { $($variant:ident, $rank:literal;)* }) => {
        impl $name {
            /// How far along the value is: a value only ever replaces one of lower rank.
            pub fn rank(self) -> u8 {
                match self { $($name::$variant => $rank),* }
            }

            /// `self`, moved forward to `next` if `next` is further along.
            pub fn advance_to(self, next: Self) -> Self {
                if next.rank() > self.rank() { next } else { self }
            }
        }
    };
}
pub(crate) use stored_states;

/// The distinct order ids of `events`, sorted: the order in which group locks are taken.
pub fn sorted_order_ids<'e>(events: &[&'e Envelope]) -> Vec<&'e str> {
    let ids: std::collections::BTreeSet<&str> =
        events.iter().filter_map(|e| e.order_id()).collect();
    ids.into_iter().collect()
}

/// Takes the transaction-scoped advisory locks `<namespace>:<order id>` of `order_ids`, in
/// the order given (sort it first). Handlers serialise the events of one order with these.
pub async fn lock_order_ids(
    tx: &Tx,
    namespace: &str,
    order_ids: &[&str],
) -> Result<(), HandlerError> {
    let keys: Vec<(&str, &str)> = order_ids.iter().map(|id| (namespace, *id)).collect();
    lock_keys(tx, &keys).await
}

/// Takes the advisory lock `<namespace>:<order id>` unless `held` says this transaction has it
/// (a group takes all of its orders' locks up front), and notes it there.
pub async fn lock_order_once(
    tx: &Tx,
    held: &mut std::collections::HashSet<String>,
    namespace: &str,
    order_id: &str,
) -> Result<(), HandlerError> {
    if held.contains(order_id) {
        return Ok(());
    }
    lock_order_ids(tx, namespace, &[order_id]).await?;
    held.insert(order_id.to_string());
    Ok(())
}

/// Takes the transaction-scoped advisory locks `<namespace>:<key>` of `keys`, in the order
/// given, in one statement.
pub async fn lock_keys(tx: &Tx, keys: &[(&str, &str)]) -> Result<(), HandlerError> {
    if keys.is_empty() {
        return Ok(());
    }
    let (namespaces, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    tx.execute_cached(
        "SELECT pg_advisory_xact_lock(hashtextextended(ns || ':' || id, 0))
           FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(ns, id, n) ORDER BY n",
        &[&namespaces, &ids],
    )
    .await
    .map_err(|e| HandlerError::from_db("taking advisory locks", &e))?;
    Ok(())
}

/// What a handler sees besides the event: its transaction, and where to put what it emits.
pub struct Context<'a, B = ()> {
    pub tx: &'a Tx,
    /// SQS's ApproximateReceiveCount for this delivery (1 on the first).
    pub receive_count: u32,
    /// When the runtime stops waiting for this handler (its handler timeout); `None` when no
    /// limit applies (tests driving a handler directly).
    pub deadline: Option<tokio::time::Instant>,
    pub(crate) emitted: Vec<NewEvent>,
    /// What this transaction keeps across its events: the handler's [`Handler::Batch`].
    pub batch: B,
}

tokio::task_local! {
    /// The deadline of the handler running in this task, set by the runtime around it and read
    /// by [`Context::new`].
    pub static DEADLINE: tokio::time::Instant;
}

/// Time kept back from an outside call's timeout for the handler to record the call's result
/// and commit.
pub const COMMIT_MARGIN: Duration = Duration::from_secs(2);

impl<'a, B: Default> Context<'a, B> {
    pub fn new(tx: &'a Tx, receive_count: u32) -> Self {
        Context {
            tx,
            receive_count,
            deadline: DEADLINE.try_with(|d| *d).ok(),
            emitted: Vec::new(),
            batch: B::default(),
        }
    }
}

/// The reason given when [`Context::bounded`] ran out of time for `what`.
pub fn out_of_time(what: &str, limit: Duration) -> String {
    if limit.is_zero() {
        format!("{what} not started: the handler's time is nearly up")
    } else {
        format!(
            "{what} did not answer within {}ms (the handler's time left)",
            limit.as_millis()
        )
    }
}

impl<B> Context<'_, B> {
    /// The timeout for an outside call (payment provider, carrier, email) whose own timeout is
    /// `own`: the smaller of that and the handler's time left less [`COMMIT_MARGIN`]. A call
    /// that outlived the handler would be abandoned when the runtime stops waiting, after the
    /// outside system may have acted, and repeated on the retry; bounded, it ends first, with
    /// time left to record what it did and commit. Zero means: do not start the call.
    pub fn call_timeout(&self, own: Duration) -> Duration {
        match self.deadline {
            Some(deadline) => own.min(
                deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .saturating_sub(COMMIT_MARGIN),
            ),
            None => own,
        }
    }

    /// Runs an outside call bounded by [`Context::call_timeout`]. `Err(limit)` when it did not
    /// answer within `limit`, or was not started because no time was left (`limit` zero).
    pub async fn bounded<F: std::future::Future>(
        &self,
        own: Duration,
        call: F,
    ) -> Result<F::Output, Duration> {
        let limit = self.call_timeout(own);
        if limit.is_zero() {
            return Err(limit);
        }
        tokio::time::timeout(limit, call).await.map_err(|_| limit)
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

    /// Emits a typed event: [`Context::emit`] under its own detail-type, stamped with the
    /// version this build emits ([`crate::domain::events::Event::VERSION`]).
    pub fn emit_event<T: crate::domain::events::Event>(
        &mut self,
        event: &T,
    ) -> Result<(), HandlerError> {
        self.emit(T::DETAIL_TYPE, event)?;
        if let Some(detail) = self
            .emitted
            .last_mut()
            .and_then(|e| e.detail.as_object_mut())
        {
            detail.insert("version".into(), T::VERSION.into());
        }
        Ok(())
    }

    /// The events emitted so far.
    pub fn emitted(&self) -> &[NewEvent] {
        &self.emitted
    }
}

pub mod analytics;
pub mod fulfillment;
pub mod inventory;
pub mod notifications;
pub mod orders;
pub mod payments;
pub mod personalization;
pub mod storefront;
