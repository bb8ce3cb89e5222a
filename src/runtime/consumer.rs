//! The receive loops and what happens to each message: a consumer long-polls its queue with
//! back pressure, runs each message as its own task under a lease, and turns the handler's
//! outcome into a delete, a visibility change for the retry, or a dead-letter with the reason.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::acker::Acker;
use super::adapt::{self, Arrivals, Depth, Limit};
use super::backoff;
use super::execute::{Apply, Executed};
use super::lease::{LeaseGuard, Leases};
use super::retention;
use super::{ConsumerConfig, RECEIVE_SLACK};
use crate::domain::catalogue;
use crate::domain::envelope::Envelope;
use crate::domain::mask;
use crate::domain::outcome::{error_chain, FailureKind, HandlerError};
use crate::sqs::attrs::{self, receive_count};
use crate::telemetry::metrics::Counters;

/// Longest failure reason kept on a dead-lettered message.
const MAX_REASON_BYTES: usize = 1024;

/// One queue's consumer.
pub struct Consumer {
    pub cfg: ConsumerConfig,
    pub sqs: aws_sdk_sqs::Client,
    pub handler: Arc<dyn Apply>,
    pub leases: Leases,
    pub counters: Arc<Counters>,
    /// Poked after a commit that wrote to the outbox.
    pub relay_wake: Option<Arc<Notify>>,
}

struct Shared {
    cfg: ConsumerConfig,
    sqs: aws_sdk_sqs::Client,
    handler: Arc<dyn Apply>,
    leases: Leases,
    counters: Arc<Counters>,
    relay_wake: Option<Arc<Notify>>,
    queue_url: Arc<str>,
    acker: Acker,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    /// SQS message ids being handled by this consumer, with the lease of the copy in hand. SQS
    /// (and the emulator, under concurrent receives) may hand out a message again while a copy
    /// is still in flight; the second copy is not handled (the message is handled, and
    /// dead-lettered, once) but adopted by the first copy's lease (see [`Leases::adopt`]).
    in_flight_ids: std::sync::Mutex<HashMap<String, u64>>,
    /// Set while receives come back short or empty (or full only because a linger came
    /// before them): messages arrive slower than the loops could take them. Then one loop at
    /// a time receives (it holds `turn` through its receive and its linger), so a trickle is
    /// not split into receives of one message each, and a quiet queue has one long poll open,
    /// not one per loop.
    trickling: std::sync::atomic::AtomicBool,
    /// The turn, and whether its last holder lingered after its receive: then the next
    /// holder's receive comes back full because it waited, not because of a backlog. Only a
    /// holder reads or sets it; a loop receiving outside the turn (no trickle) neither
    /// discounts its receive nor marks a linger.
    turn: tokio::sync::Mutex<bool>,
    /// How many messages may be in flight: the permits, and the target they follow.
    limit: Limit,
    depth: std::sync::Mutex<Pacing>,
}

/// The in-flight target, the pacing of backlog readings and the arrival rate that sets the
/// linger, changed once per receive (never per message) under one lock.
struct Pacing {
    depth: Depth,
    arrivals: Arrivals,
    /// When the last backlog reading started; a reading is under way while `reading`.
    last_read: Option<Instant>,
    reading: bool,
}

impl Consumer {
    /// Consumes until `stop` is cancelled, then shuts down in order:
    /// 1. the receive loops start no new receive; the ones in flight run to their end (SQS
    ///    would still hand messages to an aborted poll and hide them for the visibility
    ///    timeout), and the messages they return are handled like any other;
    /// 2. running handlers get `shutdown_grace` to finish; after that they are aborted and
    ///    their messages made visible again at once;
    /// 3. pending deletes are flushed.
    pub async fn run(self, stop: CancellationToken) -> Result<()> {
        let (acker, acker_task) = Acker::spawn(
            self.sqs.clone(),
            self.cfg.queue_url.clone(),
            self.cfg.delete_flush,
            self.counters.clone(),
        );
        let depth = Depth::new(self.cfg.concurrency);
        self.counters
            .in_flight_target
            .store(depth.target() as u64, Relaxed);
        let shared = Arc::new(Shared {
            queue_url: Arc::from(self.cfg.queue_url.as_str()),
            cfg: self.cfg,
            sqs: self.sqs,
            handler: self.handler,
            leases: self.leases,
            counters: self.counters,
            relay_wake: self.relay_wake,
            acker,
            stop: stop.clone(),
            hard_stop: CancellationToken::new(),
            in_flight_ids: Default::default(),
            trickling: std::sync::atomic::AtomicBool::new(true),
            turn: tokio::sync::Mutex::new(false),
            limit: Limit::new(depth.target()),
            depth: std::sync::Mutex::new(Pacing {
                depth,
                last_read: None,
                reading: false,
                arrivals: Arrivals::default(),
            }),
        });
        let tracker = TaskTracker::new();
        let mut receivers = tokio::task::JoinSet::new();
        for _ in 0..shared.cfg.receivers {
            receivers.spawn(receive_loop(shared.clone(), tracker.clone()));
        }
        while receivers.join_next().await.is_some() {}

        tracker.close();
        let handler = shared.handler.name().to_string();
        if tokio::time::timeout(shared.cfg.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                handler,
                running = tracker.len(),
                "shutdown grace ran out; aborting running handlers and releasing their messages"
            );
            shared.hard_stop.cancel();
            tracker.wait().await;
        }
        drop(shared);
        // The acker ends once the last handle (held by `shared`) is gone and its queue is flushed.
        acker_task.await.context("acker task")?;
        tracing::info!(handler, "consumer stopped");
        Ok(())
    }
}

async fn receive_loop(shared: Arc<Shared>, tracker: TaskTracker) {
    let mut error_backoff = Duration::from_millis(200);
    let permits = shared.limit.semaphore().clone();
    loop {
        // While the queue trickles, loops take turns (see `Shared::trickling`).
        let mut turn = if shared.trickling.load(Relaxed) {
            tokio::select! {
                biased;
                _ = shared.stop.cancelled() => return,
                turn = shared.turn.lock() => Some(turn),
            }
        } else {
            None
        };
        // Back pressure: wait for one free slot, then take up to nine more that are free now.
        // The slots are the in-flight target's: a loop the target does not need waits here
        // rather than in a long poll.
        // A loop that has to wait here had every slot taken: the in-flight target, not the
        // queue, is what holds the consumer back (see `adapt`).
        let (first, waited_for_slot) = match permits.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(tokio::sync::TryAcquireError::Closed) => return,
            Err(tokio::sync::TryAcquireError::NoPermits) => tokio::select! {
                // Biased: once stopped, no new receive starts even if a permit is free.
                biased;
                _ = shared.stop.cancelled() => return,
                p = permits.clone().acquire_owned() => match p { Ok(p) => (p, true), Err(_) => return },
            },
        };
        let mut held = vec![first];
        take_free_permits(&permits, &mut held);
        // At the in-flight ceiling with a backlog (the last receive came back full), slots
        // come back one at a time as handlers finish, and a receive then would ask for one or
        // two messages. Wait up to the linger for a full receive's worth of slots instead:
        // the messages wait in the queue either way, and the receive costs a tenth as much.
        let full_receive = full_receive(&shared.cfg);
        if held.len() < full_receive
            && !shared.trickling.load(Relaxed)
            && !shared.cfg.receive_linger.is_zero()
        {
            let want = (full_receive - held.len()) as u32;
            let more = tokio::select! {
                biased;
                _ = shared.stop.cancelled() => {
                    for permit in held {
                        shared.limit.give_back(permit);
                    }
                    return;
                }
                more = tokio::time::timeout(
                    shared.cfg.receive_linger,
                    permits.clone().acquire_many_owned(want),
                ) => more,
            };
            if let Ok(Ok(mut more)) = more {
                while more.num_permits() > 1 {
                    held.extend(more.split(1));
                }
                held.push(more);
            }
            take_free_permits(&permits, &mut held);
        }
        let request = shared
            .sqs
            .receive_message()
            .queue_url(&*shared.queue_url)
            .max_number_of_messages(held.len() as i32)
            .wait_time_seconds(shared.cfg.wait_time_secs)
            .visibility_timeout(shared.cfg.visibility_timeout.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send();
        // Not raced against the stop: SQS keeps serving a receive whose client went away, so
        // an abandoned poll could still take messages and hide them for the visibility timeout.
        // A receive in flight at a stop runs to its end (at most the wait time); its messages
        // are handled within the shutdown grace. Only a receive that outlives its wait time by
        // RECEIVE_SLACK is abandoned, as stalled.
        let limit = Duration::from_secs(shared.cfg.wait_time_secs.max(0) as u64) + RECEIVE_SLACK;
        let result = match tokio::time::timeout(limit, request).await {
            Ok(r) => r.map_err(|e| error_chain(&e)),
            Err(_) => Err(format!(
                "ReceiveMessage did not answer within {}s",
                limit.as_secs()
            )),
        };
        let received_at = Instant::now();
        match result {
            Ok(out) => {
                error_backoff = Duration::from_millis(200);
                let messages = out.messages.unwrap_or_default();
                if messages.is_empty() {
                    Counters::inc(&shared.counters.empty_receives);
                }
                let short = !messages.is_empty() && messages.len() < held.len();
                // A receive that came back full right after a linger filled up during the
                // pause: that is what the pause was for, not a sign of a backlog. The loops
                // keep taking turns until a receive that did not wait comes back full too;
                // otherwise every loop would start a long poll of its own, and during the next
                // linger those polls would take the messages one at a time.
                let after_linger = turn.as_deref_mut().is_some_and(std::mem::take);
                let backlog = !messages.is_empty() && messages.len() >= held.len() && !after_linger;
                shared.trickling.store(!backlog, Relaxed);
                let seen = observe_receive(
                    &shared,
                    received_at,
                    adapt::Receive {
                        asked: held.len(),
                        got: messages.len(),
                        in_use: shared.counters.in_flight.load(Relaxed) as usize + messages.len(),
                        waited_for_slot,
                    },
                );
                let mut held = held.into_iter();
                for (msg, permit) in messages.into_iter().zip(held.by_ref()) {
                    Counters::inc(&shared.counters.received);
                    tracker.spawn(process(shared.clone(), msg, received_at, permit));
                }
                // Surplus permits go back (or pay a shrink's debt).
                for permit in held {
                    shared.limit.give_back(permit);
                }
                if seen.read_backlog {
                    read_backlog_now(&shared).await;
                }
                // Messages are arriving, but slower than this loop receives them: let a few
                // more gather before asking again, about as long as a full receive's worth
                // takes to arrive (see `adapt::Arrivals`).
                let linger = short && !seen.linger.is_zero();
                if let Some(lingered) = turn.as_deref_mut() {
                    *lingered = linger;
                }
                if linger {
                    tokio::select! {
                        _ = shared.stop.cancelled() => return,
                        _ = tokio::time::sleep(seen.linger) => {}
                    }
                }
            }
            Err(e) => {
                // A failed receive brought nothing a linger had gathered.
                if let Some(lingered) = turn.as_deref_mut() {
                    *lingered = false;
                }
                Counters::inc(&shared.counters.receive_errors);
                tracing::warn!(
                    handler = shared.handler.name(),
                    error = %e,
                    backoff_ms = error_backoff.as_millis() as u64,
                    "receive failed; backing off"
                );
                for permit in held {
                    shared.limit.give_back(permit);
                }
                if shared.stop.is_cancelled() {
                    return;
                }
                let jittered = error_backoff.mul_f64(1.0 + fastrand::f64());
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    _ = tokio::time::sleep(jittered) => {}
                }
                error_backoff = (error_backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Adds to `held` the permits that are free now, up to ten in all (one receive's worth).
fn take_free_permits(permits: &Arc<tokio::sync::Semaphore>, held: &mut Vec<OwnedSemaphorePermit>) {
    while held.len() < 10 {
        match permits.clone().try_acquire_owned() {
            Ok(p) => held.push(p),
            Err(_) => break,
        }
    }
}

/// The most messages one receive asks for: SQS's ten, or fewer under a smaller ceiling.
fn full_receive(cfg: &ConsumerConfig) -> usize {
    10.min(cfg.concurrency)
}

/// How many messages a linger waits for: seven of a receive's ten. A receive that comes back
/// full is followed at once by another (it may have left messages behind), which on a steady
/// stream mostly catches one or two; a pause that aims short of full (the timer rounds it up,
/// and arrivals come in bursts) keeps to about one receive per pause, and the wait is shorter
/// too.
fn linger_for(cfg: &ConsumerConfig) -> usize {
    (full_receive(cfg) * 7 / 10).max(1)
}

/// What a receive decided: whether to read the backlog now, and how long to linger if it came
/// back short.
struct Seen {
    read_backlog: bool,
    linger: Duration,
}

/// Feeds one receive to the in-flight target (applying a change) and to the arrival rate.
/// Says whether this loop should now read the queue's backlog (at most one reading at a time,
/// and one every [`adapt::BACKLOG_EVERY`]) and how long a linger after it would be.
fn observe_receive(shared: &Shared, at: Instant, receive: adapt::Receive) -> Seen {
    let mut p = shared.depth.lock().unwrap_or_else(|e| e.into_inner());
    p.arrivals.on_receive(at.into_std(), receive.got);
    let linger = p
        .arrivals
        .linger(linger_for(&shared.cfg), shared.cfg.receive_linger);
    if let Some(change) = p.depth.on_receive(receive) {
        apply_change(shared, change, None);
    }
    let due = p
        .last_read
        .map_or(true, |at| at.elapsed() >= adapt::BACKLOG_EVERY);
    let read = !p.reading && due && p.depth.wants_backlog();
    if read {
        p.reading = true;
        p.last_read = Some(Instant::now());
    }
    Seen {
        read_backlog: read,
        linger,
    }
}

/// Reads ApproximateNumberOfMessages and feeds it to the in-flight target. Only called while
/// receives come back full, so a quiet queue never pays for it. A failed reading changes
/// nothing.
async fn read_backlog_now(shared: &Shared) {
    Counters::inc(&shared.counters.backlog_reads);
    let request = shared
        .sqs
        .get_queue_attributes()
        .queue_url(&*shared.queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        .send();
    // Abandoning a reading is harmless, unlike a receive: it races the stop.
    let answer = tokio::select! {
        _ = shared.stop.cancelled() => return,
        answer = tokio::time::timeout(RECEIVE_SLACK, request) => answer,
    };
    let waiting = match answer {
        Ok(Ok(out)) => out
            .attributes()
            .and_then(|a| {
                a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            })
            .and_then(|v| v.parse::<u64>().ok()),
        Ok(Err(e)) => {
            tracing::debug!(handler = shared.handler.name(), error = %error_chain(&e), "backlog reading failed");
            None
        }
        Err(_) => None,
    };
    let mut p = shared.depth.lock().unwrap_or_else(|e| e.into_inner());
    p.reading = false;
    if let Some(waiting) = waiting {
        if let Some(change) = p.depth.on_backlog(waiting) {
            apply_change(shared, change, Some(waiting));
        }
    }
}

/// Applies a change of the target (under the [`Pacing`] lock, so changes apply in order).
fn apply_change(shared: &Shared, change: adapt::Change, backlog: Option<u64>) {
    shared.limit.apply(change);
    shared
        .counters
        .in_flight_target
        .store(change.to as u64, Relaxed);
    tracing::debug!(
        handler = shared.handler.name(),
        from = change.from,
        to = change.to,
        backlog,
        "in-flight target changed"
    );
}

/// A message's slot in the in-flight limit, given back when its handling ends (however it
/// ends).
struct Slot<'a> {
    permit: Option<OwnedSemaphorePermit>,
    limit: &'a Limit,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.limit.give_back(permit);
        }
    }
}

/// Handles one received message to its end: deleted, retried later, released or dead-lettered.
///
/// Every message in flight is one of these tasks, and a task's allocation is as large as the
/// largest state its future can be in. The SQS calls of the rare endings (release, retry's
/// visibility change, the dead-letter queue) are boxed: an SDK call's future is kilobytes, and
/// inline it sized every message's task for an ending few of them reach. In the fleet benchmark
/// the four-handler process peaked about 2 MB lower for it (docs/BENCHMARKS.md, item 9 of
/// "What changed since the first series").
async fn process(
    shared: Arc<Shared>,
    msg: Message,
    received_at: Instant,
    permit: OwnedSemaphorePermit,
) {
    let _slot = Slot {
        permit: Some(permit),
        limit: &shared.limit,
    };
    let Some(receipt) = msg.receipt_handle().map(str::to_string) else {
        return;
    };
    let counters = &shared.counters;
    let lease = shared.leases.hold(
        shared.queue_url.clone(),
        receipt.clone(),
        received_at,
        shared.cfg.visibility_timeout,
        counters.clone(),
    );
    let _copy = match InFlightCopy::claim(&shared, msg.message_id(), lease.id()) {
        Ok(copy) => copy,
        Err(first) => {
            // Handled once, by the copy already running; its lease keeps this copy hidden from
            // now on and its outcome is sent with this copy's (the newest) receipt handle.
            drop(lease);
            let adopted = shared.leases.adopt(first, receipt.clone(), received_at);
            tracing::info!(
                handler = shared.handler.name(),
                message_id = msg.message_id().unwrap_or_default(),
                adopted,
                "a copy of this message is already being handled here; its lease keeps this one hidden"
            );
            if !adopted {
                // The first copy finished in the meantime; this one is released to be seen
                // again (as a duplicate, if the first one's effect committed).
                Box::pin(release(&shared, &receipt)).await;
            }
            return;
        }
    };
    counters.in_flight.fetch_add(1, Relaxed);
    let count = receive_count(&msg);
    let body = msg.body().unwrap_or_default();
    let system = |k: MessageSystemAttributeName| msg.attributes().and_then(|a| a.get(&k));
    // Age at receive, from SQS's SentTimestamp (epoch milliseconds).
    let age_ms = system(MessageSystemAttributeName::SentTimestamp)
        .and_then(|v| v.parse::<i64>().ok())
        .map(|sent| (chrono::Utc::now().timestamp_millis() - sent).max(0) as f64);
    let span = tracing::info_span!(
        "message",
        handler = shared.handler.name(),
        event_id = tracing::field::Empty,
        detail_type = tracing::field::Empty,
        order_id = tracing::field::Empty,
        receive_count = count,
        // X-Ray context continued from the producer, when SQS carries it.
        trace = system(MessageSystemAttributeName::AwsTraceHeader).map(String::as_str),
    );
    async {
        // A message received after a stop (by a receive that was in flight) is handled: the
        // shutdown grace allows it, and releasing it would only spend one of its receives.
        // If the grace runs out first, the hard stop aborts it and it is released.
        let started = Instant::now();
        let outcome = match Envelope::decode(body) {
            Err(e) => Err(e),
            Ok(event) => {
                let span = tracing::Span::current();
                span.record("event_id", event.id.as_str());
                span.record("detail_type", event.detail_type.as_str());
                if let Some(order) = event.order_id() {
                    span.record("order_id", order);
                }
                run_guarded(&shared, event, count).await
            }
        };
        // The lease is held until the message is deleted, dead-lettered or handed back: a
        // message whose fate is still being sent to SQS must not reappear meanwhile.
        let elapsed_ms = started.elapsed().as_millis() as u64;
        // The newest receipt handle: a second copy may have been adopted meanwhile.
        let receipt = lease.receipt().unwrap_or(receipt);
        counters.observe(started.elapsed().as_secs_f64() * 1000.0, age_ms, count);
        match outcome {
            Ok(Some(Executed::Applied { emitted })) => {
                Counters::inc(&counters.succeeded);
                if emitted > 0 {
                    if let Some(wake) = &shared.relay_wake {
                        wake.notify_one();
                    }
                }
                // Debug, not info: a line per message was most of the fleet's CloudWatch Logs
                // bill and a third of the consumer's CPU (docs/BENCHMARKS.md). Successes are
                // counted in the metrics; anything else is still logged at info or above.
                tracing::debug!(
                    outcome = "succeeded",
                    emitted,
                    elapsed_ms,
                    age_ms,
                    "handled"
                );
                shared.acker.delete(receipt);
            }
            Ok(Some(Executed::Duplicate)) => {
                Counters::inc(&counters.duplicates);
                tracing::info!(
                    outcome = "duplicate",
                    elapsed_ms,
                    "already processed; acknowledged"
                );
                shared.acker.delete(receipt);
            }
            Ok(None) => {
                drop(lease);
                Box::pin(release(&shared, &receipt)).await
            }
            Err(HandlerError::Retry { reason, after }) => {
                if count >= shared.cfg.max_receive_count {
                    let reason = format!("retries exhausted after {count} receives: {reason}");
                    Box::pin(dead_letter(
                        &shared,
                        &msg,
                        &receipt,
                        FailureKind::Exhausted,
                        &reason,
                        count,
                        lease,
                    ))
                    .await;
                } else {
                    let delay = after.unwrap_or_else(|| shared.cfg.retry.delay(count));
                    Counters::inc(&counters.retried);
                    tracing::warn!(
                        outcome = "retry",
                        delay_ms = delay.as_millis() as u64,
                        reason = %mask::emails_in(&reason),
                        "will retry"
                    );
                    // Dropped first, so that no extension overwrites the backoff.
                    drop(lease);
                    Box::pin(set_visibility(&shared, &receipt, delay)).await;
                }
            }
            Err(HandlerError::Permanent { reason }) => {
                Box::pin(dead_letter(
                    &shared,
                    &msg,
                    &receipt,
                    FailureKind::Permanent,
                    &reason,
                    count,
                    lease,
                ))
                .await;
            }
            Err(HandlerError::Poison { reason }) => {
                Box::pin(dead_letter(
                    &shared,
                    &msg,
                    &receipt,
                    FailureKind::Poison,
                    &reason,
                    count,
                    lease,
                ))
                .await;
            }
        }
    }
    .instrument(span)
    .await;
    counters.in_flight.fetch_sub(1, Relaxed);
}

/// This consumer's claim on an SQS message id while it handles the message; released on drop.
struct InFlightCopy<'a> {
    shared: &'a Shared,
    id: Option<String>,
}

impl<'a> InFlightCopy<'a> {
    /// Claims the message for the copy whose lease is `lease`; `Err` with the lease of the copy
    /// already in flight here. A message without an id (never from SQS) is not tracked.
    fn claim(shared: &'a Shared, id: Option<&str>, lease: u64) -> Result<Self, u64> {
        let id = id.map(str::to_string);
        if let Some(id) = &id {
            let mut ids = shared
                .in_flight_ids
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(first) = ids.get(id) {
                return Err(*first);
            }
            ids.insert(id.clone(), lease);
        }
        Ok(InFlightCopy { shared, id })
    }
}

impl Drop for InFlightCopy<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let mut ids = self
                .shared
                .in_flight_ids
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            ids.remove(&id);
        }
    }
}

/// Runs the handler in its own task so that a panic is caught, bounded by the handler timeout
/// and by the hard stop. `Ok(None)` means it was aborted by the hard stop and the message
/// should be released.
async fn run_guarded(
    shared: &Arc<Shared>,
    event: Envelope,
    count: u32,
) -> Result<Option<Executed>, HandlerError> {
    if !catalogue::knows(&event.source, &event.detail_type) {
        return Err(HandlerError::permanent(format!(
            "unknown detail-type {:?} (source {:?}); it is not in the event catalogue",
            event.detail_type, event.source
        )));
    }
    if let Some(max) = shared.cfg.max_event_age {
        if let Some(why) = retention::too_old(&event, max, chrono::Utc::now()) {
            return Err(HandlerError::permanent(why));
        }
    }
    let handler = shared.handler.clone();
    let event = Arc::new(event);
    let deadline = Instant::now() + shared.cfg.handler_timeout;
    let mut task = tokio::spawn({
        let event = event.clone();
        crate::handlers::DEADLINE
            .scope(deadline, async move { handler.apply(&event, count).await })
            .in_current_span()
    });
    tokio::select! {
        joined = tokio::time::timeout(shared.cfg.handler_timeout, &mut task) => match joined {
            Ok(Ok(result)) => result.map(Some),
            Ok(Err(join)) if join.is_panic() => {
                Counters::inc(&shared.counters.panics);
                Err(HandlerError::retry(format!("handler panicked: {}", panic_text(join))))
            }
            Ok(Err(join)) => Err(HandlerError::retry(format!("handler task failed: {join}"))),
            Err(_) => {
                task.abort();
                Counters::inc(&shared.counters.timeouts);
                // On the last allowed receive a retry is a dead letter. A grouped event can have
                // been committed by its group after this consumer stopped waiting (the group
                // was already committing); then it is done, not exhausted.
                if count >= shared.cfg.max_receive_count {
                    // The commit may itself be what took the time; it gets as long again.
                    let bound = shared.cfg.handler_timeout.max(Duration::from_secs(10));
                    let applied =
                        tokio::time::timeout(bound, shared.handler.applied(&event)).await;
                    if let Ok(Some(true)) = applied {
                        return Ok(Some(Executed::Duplicate));
                    }
                }
                Err(HandlerError::retry(format!(
                    "handler timed out after {}s",
                    shared.cfg.handler_timeout.as_secs()
                )))
            }
        },
        _ = shared.hard_stop.cancelled() => {
            task.abort();
            Ok(None)
        }
    }
}

pub(super) fn panic_text(join: tokio::task::JoinError) -> String {
    payload_text(&*join.into_panic())
}

/// A panic's message.
pub(super) fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

async fn set_visibility(shared: &Shared, receipt: &str, delay: Duration) {
    let secs = delay.as_secs().min(backoff::MAX_VISIBILITY.as_secs()) as i32;
    if let Err(e) = shared
        .sqs
        .change_message_visibility()
        .queue_url(&*shared.queue_url)
        .receipt_handle(receipt)
        .visibility_timeout(secs)
        .send()
        .await
    {
        // The message comes back after its current visibility timeout instead: later than
        // planned, but not lost.
        tracing::warn!(error = %error_chain(&e), "ChangeMessageVisibility failed");
    }
}

/// Makes a message visible again at once (shutdown, aborted handler).
async fn release(shared: &Shared, receipt: &str) {
    Counters::inc(&shared.counters.released);
    set_visibility(shared, receipt, Duration::ZERO).await;
}

/// Sends the message to the DLQ with the failure recorded in its attributes, body unchanged,
/// then deletes the original. If the send fails the original stays and is retried.
async fn dead_letter(
    shared: &Shared,
    msg: &Message,
    receipt: &str,
    kind: FailureKind,
    reason: &str,
    count: u32,
    lease: LeaseGuard,
) {
    // The reason is kept on the message for the DLQ's retention and shown by `dlq peek`: an
    // address a handler echoed in it is masked.
    let mut reason = mask::emails_in(reason);
    if reason.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let ours: [(&str, String); 7] = [
        (attrs::KIND, kind.as_str().to_string()),
        (attrs::REASON, reason.clone()),
        (attrs::HANDLER, shared.handler.name().to_string()),
        (attrs::RECEIVE_COUNT, count.to_string()),
        (attrs::SOURCE_QUEUE, shared.queue_url.to_string()),
        (attrs::FAILED_AT, chrono::Utc::now().to_rfc3339()),
        (
            attrs::ORIGINAL_MESSAGE_ID,
            msg.message_id().unwrap_or_default().to_string(),
        ),
    ];
    // SQS allows ten attributes: keep the message's own first, ours override same names.
    let mut attributes: HashMap<String, MessageAttributeValue> = msg
        .message_attributes()
        .map(|m| {
            m.iter()
                // Our failure record is replaced; anything else (the redrive history the CLI
                // adds, the producer's own attributes) is kept.
                .filter(|(k, _)| !attrs::is_failure_record(k))
                .take(attrs::MAX_ATTRIBUTES - ours.len())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    for (k, v) in ours {
        if let Some(v) = attrs::value("String", &v) {
            attributes.insert(k.to_string(), v);
        }
    }
    let sent = shared
        .sqs
        .send_message()
        .queue_url(&shared.cfg.dlq_url)
        .message_body(msg.body().unwrap_or_default())
        .set_message_attributes(Some(attributes))
        .send()
        .await;
    match sent {
        Ok(_) => {
            Counters::inc(&shared.counters.dead_lettered);
            tracing::error!(
                outcome = "dead_lettered",
                kind = kind.as_str(),
                reason,
                "sent to the DLQ"
            );
            shared.acker.delete(receipt.to_string());
        }
        Err(e) => {
            Counters::inc(&shared.counters.retried);
            let delay = shared.cfg.retry.delay(count);
            tracing::error!(
                error = %error_chain(&e),
                kind = kind.as_str(),
                reason,
                "could not send to the DLQ; the message stays in its queue and is retried"
            );
            drop(lease);
            set_visibility(shared, receipt, delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_size<A, B, C, D, F>(_: &impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every message in flight holds a `process` task for as long as it is handled, so its
    /// size is paid per message. An SQS call inline in it would make it at least as large as
    /// that call's future; the rare endings' calls are boxed, so it stays well below one.
    #[test]
    fn a_message_in_flight_does_not_carry_an_sqs_call_inline() {
        let process = output_size(&process);
        let send = std::mem::size_of_val(
            &aws_sdk_sqs::Client::from_conf(
                aws_sdk_sqs::Config::builder()
                    .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
                    .build(),
            )
            .send_message()
            .send(),
        );
        assert!(
            process * 2 < send,
            "process's future is {process} bytes, an SQS SendMessage future {send}"
        );
    }
}
