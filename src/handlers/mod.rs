//! The business logic of each worker, one file per handler. Handlers know nothing of SQS: they
//! get a decoded event and a database transaction, write their effects, and emit events into
//! the outbox through [`Context::emit`]. The runtime commits, acknowledges and retries.

use std::any::Any;

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

    /// Emits a typed event: [`Context::emit`] under its own detail-type.
    pub fn emit_event<T: crate::domain::events::Event>(
        &mut self,
        event: &T,
    ) -> Result<(), HandlerError> {
        self.emit(T::DETAIL_TYPE, event)
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

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use deadpool_postgres::Pool;

use crate::domain::names::HandlerName;
use crate::infra::aws::Clients;
use crate::providers::carrier::{Carrier, SandboxCarrier};
use crate::providers::payment::{PaymentProvider, SandboxProvider};

/// Settings the handlers themselves need (providers, carriers, transports).
#[derive(Debug, Clone, Args, Default)]
pub struct DepsArgs {
    /// Email settings of the notifications worker (transport, sender, templates).
    #[command(flatten)]
    pub email: crate::providers::email::EmailArgs,
    /// Latency the sandbox payment provider adds to every call, to imitate a real one.
    #[arg(
        long = "sandbox-payment-latency-ms",
        env = "ORDERFLEET_SANDBOX_PAYMENT_LATENCY_MS",
        default_value_t = 0
    )]
    pub sandbox_payment_latency_ms: u64,
    /// Database where the sandbox payment provider keeps its state, through a pool of its own
    /// (the worker defaults it to DATABASE_URL: a payment holds one connection for its
    /// transaction while the sandbox takes another, so sharing one pool could starve).
    #[arg(
        long = "sandbox-payment-database-url",
        env = "ORDERFLEET_SANDBOX_PAYMENT_DATABASE_URL",
        hide_env_values = true
    )]
    pub sandbox_payment_database_url: Option<String>,
    /// Connections of the sandbox payment provider's own pool.
    #[arg(
        long = "sandbox-payment-pool-size",
        env = "ORDERFLEET_SANDBOX_PAYMENT_POOL_SIZE",
        default_value_t = 8
    )]
    pub sandbox_payment_pool_size: usize,
    /// The Firehose delivery stream the analytics worker ships the lake to; default: the
    /// topology's `<prefix>-lake`.
    #[arg(long = "firehose-stream", env = "ORDERFLEET_FIREHOSE_STREAM")]
    pub firehose_stream: Option<String>,
    /// How long lake records gather before a PutRecordBatch when the shipper has caught up
    /// (full batches of 500 leave at once).
    #[arg(
        long = "lake-flush-ms",
        env = "ORDERFLEET_LAKE_FLUSH_MS",
        default_value_t = 1000
    )]
    pub lake_flush_ms: u64,
    /// Amazon Personalize event tracker's tracking id: purchases are also sent to it with
    /// PutEvents. Empty or unset: not forwarded. (Its endpoint can be overridden with
    /// AWS_ENDPOINT_URL_PERSONALIZE_EVENTS.)
    #[arg(
        long = "personalize-tracking-id",
        env = "ORDERFLEET_PERSONALIZE_TRACKING_ID"
    )]
    pub personalize_tracking_id: Option<String>,
}

/// What handlers are built from: the pool, the AWS clients and their own settings.
#[derive(Clone)]
pub struct Deps {
    pub pool: Pool,
    pub clients: Clients,
    pub args: DepsArgs,
    /// The payment provider (the sandbox, keeping its state in `pool`'s database).
    pub payment_provider: Arc<dyn PaymentProvider>,
    /// Where payments records each provider call before making it, outside the handler's
    /// transaction (see [`payments`]): the main database, through a pool of its own in the
    /// worker so that a payment holding one connection never waits on itself for a second.
    pub payment_attempts_pool: Pool,
    /// The parcel carrier (the sandbox, keeping its parcels in the sandbox payment provider's
    /// pool, of its own in the worker).
    pub carrier: Arc<dyn Carrier>,
    /// Builds and sends customer emails (notifications).
    pub mailer: Arc<crate::providers::email::Mailer>,
    /// The Amazon Personalize event tracker, when `--personalize-tracking-id` is set.
    pub personalize: Option<personalization::PersonalizeTracker>,
}

impl Deps {
    pub async fn new(args: &DepsArgs, pool: &Pool, clients: &Clients) -> Result<Self> {
        let sandbox_pool = match &args.sandbox_payment_database_url {
            Some(url) => crate::store::db::pool(url, args.sandbox_payment_pool_size.max(1))
                .context("--sandbox-payment-database-url")?,
            None => pool.clone(),
        };
        Ok(Deps {
            payment_attempts_pool: pool.clone(),
            pool: pool.clone(),
            clients: clients.clone(),
            args: args.clone(),
            payment_provider: Arc::new(SandboxProvider::new(
                sandbox_pool.clone(),
                Duration::from_millis(args.sandbox_payment_latency_ms),
            )),
            carrier: Arc::new(SandboxCarrier::new(sandbox_pool.clone())),
            mailer: Arc::new(
                crate::providers::email::Mailer::from_args(&args.email)
                    .await
                    .context("email settings")?,
            ),
            personalize: personalize_tracker(args).await,
        })
    }

    /// The lake shipper the analytics worker needs running beside it (see [`crate::store::lake`]):
    /// to `--firehose-stream`, or else the topology's stream.
    pub fn lake_shipper(
        &self,
        topo: &crate::infra::topology::Topology,
    ) -> crate::store::lake::LakeShipper {
        crate::store::lake::LakeShipper::new(
            self.pool.clone(),
            self.clients.firehose.clone(),
            self.args
                .firehose_stream
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| topo.firehose_stream()),
            crate::store::lake::ShipperConfig {
                flush_interval: Duration::from_millis(self.args.lake_flush_ms.max(1)),
                ..crate::store::lake::ShipperConfig::default()
            },
        )
    }
}

/// The Personalize tracker from `--personalize-tracking-id`; the CloudFormation stack passes
/// an empty value to mean "none".
async fn personalize_tracker(args: &DepsArgs) -> Option<personalization::PersonalizeTracker> {
    let tracking_id = args
        .personalize_tracking_id
        .clone()
        .filter(|s| !s.trim().is_empty())?;
    let config = crate::infra::aws::sdk_config().await;
    Some(personalization::PersonalizeTracker {
        client: aws_sdk_personalizeevents::Client::new(&config),
        tracking_id,
    })
}

/// Builds the handler called `name`.
pub fn build(name: HandlerName, deps: &Deps) -> Result<Arc<dyn AnyHandler>> {
    match name {
        HandlerName::Orders => Ok(Arc::new(orders::Orders)),
        HandlerName::Inventory => Ok(Arc::new(inventory::Inventory)),
        HandlerName::Payments => Ok(Arc::new(payments::Payments::with_attempt_log(
            deps.payment_provider.clone(),
            deps.payment_attempts_pool.clone(),
        ))),
        // The intent to ship is committed outside the handler's transaction, like payments'
        // attempt log, through the same second pool.
        HandlerName::Fulfillment => Ok(Arc::new(fulfillment::Fulfillment::new(
            deps.carrier.clone(),
            deps.payment_attempts_pool.clone(),
        ))),
        HandlerName::Notifications => Ok(Arc::new(notifications::Notifications::new(
            deps.mailer.clone(),
        ))),
        HandlerName::Analytics => Ok(Arc::new(analytics::Analytics)),
        HandlerName::Personalization => Ok(Arc::new(personalization::Personalization::new(
            deps.personalize.clone(),
        ))),
    }
}
