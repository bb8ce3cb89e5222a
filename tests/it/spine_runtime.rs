//! The consumer runtime against the local SQS emulator and a real PostgreSQL, in process:
//! duplicates, retries with backoff, dead letters, leases.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support;
use async_trait::async_trait;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use deadpool_postgres::Pool;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::handlers::{AnyHandler, Context, Handler};
use orderfleet::infra::aws::Clients;
use orderfleet::infra::topology::Topology;
use orderfleet::runtime::backoff::RetryPolicy;
use orderfleet::runtime::group::{GroupCommit, GroupConfig};
use orderfleet::runtime::lease::Leases;
use orderfleet::runtime::retention;
use orderfleet::runtime::{self, Apply, Consumer, ConsumerConfig};
use orderfleet::sqs::attrs;
use orderfleet::sqs::queue::QueueFacts;
use orderfleet::store::inbox::InboxRetention;
use orderfleet::telemetry::metrics::Counters;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A consumer running in this test, on the topology's inventory queue.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    counters: Arc<Counters>,
    facts: QueueFacts,
    leases: Leases,
    lease_stop: CancellationToken,
}

impl Running {
    /// A consumer applying each event in a transaction of its own.
    async fn start(
        clients: &Clients,
        topo: &Topology,
        pool: &Pool,
        handler: Arc<dyn AnyHandler>,
        tweak: impl FnOnce(&mut ConsumerConfig),
    ) -> Running {
        let pool_ = pool.clone();
        Self::start_applying(clients, topo, tweak, |_, _| {
            runtime::Transactional::new(handler, pool_)
        })
        .await
    }

    async fn start_applying(
        clients: &Clients,
        topo: &Topology,
        tweak: impl FnOnce(&mut ConsumerConfig),
        applier: impl FnOnce(&ConsumerConfig, &Arc<Counters>) -> Arc<dyn Apply>,
    ) -> Running {
        let facts = orderfleet::sqs::queue::inspect_queue(
            &clients.sqs,
            &topo.queue_name(HandlerName::Inventory),
        )
        .await
        .expect("queue");
        let mut cfg = support::consumer_config(&facts);
        tweak(&mut cfg);
        runtime::validate(&cfg, &facts).expect("valid settings");
        let leases = Leases::default();
        let lease_stop = CancellationToken::new();
        tokio::spawn(leases.clone().run(
            clients.sqs.clone(),
            runtime::LEASE_TICK,
            lease_stop.clone(),
        ));
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let handler = applier(&cfg, &counters);
        let consumer = Consumer {
            cfg,
            sqs: clients.sqs.clone(),
            handler,
            leases: leases.clone(),
            counters: counters.clone(),
            relay_wake: None,
        };
        let task = tokio::spawn(consumer.run(stop.clone()));
        Running {
            stop,
            task,
            counters,
            facts,
            leases,
            lease_stop,
        }
    }

    /// Waits (up to 20 s) until the consumer has counted these successes and dead letters.
    async fn wait_for_outcomes(&self, succeeded: u64, dead_lettered: u64) {
        let counters = self.counters.clone();
        support::wait_for(
            Duration::from_secs(20),
            &format!("{succeeded} successes and {dead_lettered} dead letters"),
            || {
                let c = counters.clone();
                async move {
                    let s = c.snapshot();
                    (s.succeeded == succeeded && s.dead_lettered == dead_lettered).then_some(())
                }
            },
        )
        .await;
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.expect("join").expect("consumer");
        self.lease_stop.cancel();
        assert!(self.leases.is_empty(), "a lease outlived its message");
    }
}

async fn send(clients: &Clients, queue_url: &str, body: &str) {
    clients
        .sqs
        .send_message()
        .queue_url(queue_url)
        .message_body(body)
        .send()
        .await
        .expect("send");
}

async fn on_hand(pool: &Pool, sku: &str) -> i64 {
    let c = pool.get().await.unwrap();
    c.query_opt("SELECT on_hand FROM stock WHERE sku = $1", &[&sku])
        .await
        .unwrap()
        .map(|r| r.get(0))
        .unwrap_or(0)
}

async fn queue_is_empty(clients: &Clients, url: &str) -> bool {
    support::depth(clients, url).await == (0, 0)
}

#[tokio::test]
async fn the_same_message_delivered_twice_has_its_effect_once() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let handler = orderfleet::worker::deps::build(
        HandlerName::Inventory,
        &orderfleet::worker::deps::Deps::new(&Default::default(), &pool, &clients)
            .await
            .unwrap(),
    )
    .unwrap();
    let run = Running::start(&clients, &topo, &pool, handler, |_| {}).await;
    let body = support::stock_received("sku-dup", 7);
    send(&clients, &run.facts.queue_url, &body).await;
    send(&clients, &run.facts.queue_url, &body).await;
    let counters = run.counters.clone();
    support::wait_for(Duration::from_secs(20), "both deliveries handled", || {
        let c = counters.clone();
        async move {
            let s = c.snapshot();
            (s.succeeded + s.duplicates == 2).then_some(())
        }
    })
    .await;
    assert_eq!(on_hand(&pool, "sku-dup").await, 7);
    let s = run.counters.snapshot();
    assert_eq!((s.succeeded, s.duplicates), (1, 1));
    let url = run.facts.queue_url.clone();
    run.shutdown().await;
    support::wait_for(Duration::from_secs(5), "queue drained", || async {
        queue_is_empty(&clients, &url).await.then_some(())
    })
    .await;
}

/// Fails with a retry for the first `fail_times` attempts, recording when each attempt began.
struct Flaky {
    fail_times: u32,
    attempts: Mutex<Vec<(Instant, u32)>>,
}

#[async_trait]
impl Handler for Flaky {
    type Batch = ();

    fn name(&self) -> &str {
        "flaky"
    }
    async fn handle(&self, _: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        let n = {
            let mut a = self.attempts.lock().unwrap();
            a.push((Instant::now(), cx.receive_count));
            a.len() as u32
        };
        if n <= self.fail_times {
            Err(HandlerError::retry(format!("not yet ({n})")))
        } else {
            Ok(())
        }
    }
}

#[tokio::test]
async fn a_message_retried_twice_is_hidden_for_its_backoff_each_time_then_deleted() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let flaky = Arc::new(Flaky {
        fail_times: 2,
        attempts: Mutex::new(Vec::new()),
    });
    let policy = RetryPolicy {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(30),
    };
    let run = Running::start(&clients, &topo, &pool, flaky.clone(), |c| c.retry = policy).await;
    send(
        &clients,
        &run.facts.queue_url,
        &support::stock_received("sku-r", 1),
    )
    .await;
    let counters = run.counters.clone();
    support::wait_for(
        Duration::from_secs(30),
        "the third attempt to succeed",
        || {
            let c = counters.clone();
            async move { (c.snapshot().succeeded == 1).then_some(()) }
        },
    )
    .await;
    let attempts = flaky.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 3);
    assert_eq!(
        attempts.iter().map(|a| a.1).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "receive counts"
    );
    for (i, pair) in attempts.windows(2).enumerate() {
        let waited = pair[1].0 - pair[0].0;
        let floor = policy.floor(i as u32 + 1);
        // Hidden for at least the backoff floor, and at most its jittered maximum plus the
        // emulator's and the poll's slack.
        assert!(
            waited >= floor,
            "attempt {}: waited {waited:?} < {floor:?}",
            i + 2
        );
        assert!(
            waited <= floor * 2 + Duration::from_millis(1500),
            "attempt {}: waited {waited:?}, backoff was at most {:?}",
            i + 2,
            floor * 2
        );
    }
    assert_eq!(run.counters.snapshot().retried, 2);
    let url = run.facts.queue_url.clone();
    run.shutdown().await;
    support::wait_for(Duration::from_secs(5), "the message deleted", || async {
        queue_is_empty(&clients, &url).await.then_some(())
    })
    .await;
}

/// Fails permanently on details with `"fail": true`, succeeds otherwise.
struct Picky {
    ok: AtomicU32,
}

#[async_trait]
impl Handler for Picky {
    type Batch = ();

    fn name(&self) -> &str {
        "picky"
    }
    async fn handle(&self, ev: &Envelope, _: &mut Context<'_>) -> Result<(), HandlerError> {
        if ev.detail["fail"] == json!(true) {
            return Err(HandlerError::permanent("the order total is negative"));
        }
        self.ok.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn permanent_failures_and_undecodable_bodies_land_in_the_dlq_with_their_reason() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let picky = Arc::new(Picky {
        ok: AtomicU32::new(0),
    });
    let run = Running::start(&clients, &topo, &pool, picky.clone(), |_| {}).await;
    let url = run.facts.queue_url.clone();
    let poison = "{not json at all \u{1F4A5}";
    let permanent = support::event_body(
        "StockReceived",
        "orderfleet.storefront",
        json!({"sku": "x", "quantity": 1, "fail": true}),
    );
    let unknown = support::event_body("OrderTeleported", "orderfleet.storefront", json!({}));
    send(&clients, &url, poison).await;
    for i in 0..3 {
        send(
            &clients,
            &url,
            &support::stock_received(&format!("ok-{i}"), 1),
        )
        .await;
    }
    send(&clients, &url, &permanent).await;
    send(&clients, &url, &unknown).await;

    run.wait_for_outcomes(3, 3).await;
    assert_eq!(
        picky.ok.load(Ordering::SeqCst),
        3,
        "good messages kept flowing"
    );

    let dead = dead_letters(&clients, &run.facts.dlq_url, 3).await;
    let find = |body: &str| {
        dead.iter()
            .find(|m| m.body() == Some(body))
            .unwrap_or_else(|| panic!("{body:?} not in the DLQ byte for byte"))
    };
    let m = find(poison);
    assert_eq!(attr(m, attrs::KIND), "poison");
    assert!(attr(m, attrs::REASON).contains("not an EventBridge event"));
    let m = find(&permanent);
    assert_eq!(attr(m, attrs::KIND), "permanent");
    assert_eq!(attr(m, attrs::REASON), "the order total is negative");
    assert_eq!(attr(m, attrs::HANDLER), "picky");
    assert_eq!(attr(m, attrs::RECEIVE_COUNT), "1");
    assert_eq!(attr(m, attrs::SOURCE_QUEUE), url);
    let m = find(&unknown);
    assert_eq!(attr(m, attrs::KIND), "permanent");
    assert!(attr(m, attrs::REASON).contains("unknown detail-type \"OrderTeleported\""));
    run.shutdown().await;
    support::wait_for(Duration::from_secs(5), "the originals deleted", || async {
        queue_is_empty(&clients, &url).await.then_some(())
    })
    .await;
}

/// Receives at least `n` messages from a DLQ, with their attributes.
async fn dead_letters(clients: &Clients, dlq_url: &str, n: usize) -> Vec<Message> {
    let mut dead = Vec::new();
    while dead.len() < n {
        let out = clients
            .sqs
            .receive_message()
            .queue_url(dlq_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        dead.extend(out.messages.unwrap_or_default());
    }
    dead
}

/// A message attribute's string value, or "".
fn attr(m: &Message, k: &str) -> String {
    m.message_attributes()
        .and_then(|a| a.get(k))
        .and_then(|v| v.string_value())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn an_event_older_than_the_inbox_remembers_is_dead_lettered_unapplied_with_its_reason() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let picky = Arc::new(Picky {
        ok: AtomicU32::new(0),
    });
    let keep = Duration::from_secs(30 * 86_400);
    let run = Running::start(&clients, &topo, &pool, picky.clone(), |c| {
        c.max_event_age = Some(retention::max_event_age(keep));
    })
    .await;
    let aged = |days: i64| {
        let mut body: serde_json::Value =
            serde_json::from_str(&support::stock_received(&format!("aged-{days}"), 1)).unwrap();
        body["time"] = json!((chrono::Utc::now() - chrono::Duration::days(days)).to_rfc3339());
        body.to_string()
    };
    // Its inbox row, had it been applied 40 days ago, would be gone: it is refused. One 29 days
    // old would still find its row, so it is applied.
    let (stale, recent) = (aged(40), aged(29));
    send(&clients, &run.facts.queue_url, &stale).await;
    send(&clients, &run.facts.queue_url, &recent).await;
    run.wait_for_outcomes(1, 1).await;
    assert_eq!(
        picky.ok.load(Ordering::SeqCst),
        1,
        "only the recent one ran"
    );
    let dead = dead_letters(&clients, &run.facts.dlq_url, 1).await;
    assert_eq!(dead[0].body(), Some(stale.as_str()));
    assert_eq!(attr(&dead[0], attrs::KIND), "permanent");
    let reason = attr(&dead[0], attrs::REASON);
    assert!(
        reason.contains("40.0 days ago") && reason.contains("--inbox-retention-days"),
        "{reason}"
    );
    run.shutdown().await;
}

/// Takes `delay` per message and counts its invocations.
struct Slow {
    delay: Duration,
    calls: AtomicU32,
}

#[async_trait]
impl Handler for Slow {
    type Batch = ();

    fn name(&self) -> &str {
        "slow"
    }
    async fn handle(&self, _: &Envelope, _: &mut Context<'_>) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        Ok(())
    }
}

#[tokio::test]
async fn a_handler_slower_than_the_visibility_timeout_is_not_redelivered_while_it_runs() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    // Shrink the queue's own visibility timeout to 3 s; the handler takes 8 s.
    let url =
        orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.queue_name(HandlerName::Inventory))
            .await
            .unwrap();
    clients
        .sqs
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(QueueAttributeName::VisibilityTimeout, "3")
        .send()
        .await
        .unwrap();
    let slow = Arc::new(Slow {
        delay: Duration::from_secs(8),
        calls: AtomicU32::new(0),
    });
    let run = Running::start(&clients, &topo, &pool, slow.clone(), |c| {
        assert_eq!(c.visibility_timeout, Duration::from_secs(3));
    })
    .await;
    send(&clients, &url, &support::stock_received("slow", 1)).await;
    let counters = run.counters.clone();
    support::wait_for(
        Duration::from_secs(30),
        "the slow handler to finish",
        || {
            let c = counters.clone();
            async move { (c.snapshot().succeeded == 1).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        slow.calls.load(Ordering::SeqCst),
        1,
        "redelivered while running"
    );
    let s = run.counters.snapshot();
    assert!(
        s.lease_extensions >= 2,
        "leases extended {} times",
        s.lease_extensions
    );
    assert_eq!(s.received, 1);
    run.shutdown().await;
    support::wait_for(Duration::from_secs(5), "the message deleted", || async {
        queue_is_empty(&clients, &url).await.then_some(())
    })
    .await;
}

#[tokio::test]
async fn provisioning_twice_changes_nothing_the_second_time() {
    let clients = support::clients().await;
    let topo = Topology::with_prefix(support::unique("p"));
    let first = orderfleet::infra::provision::provision(&clients, &topo)
        .await
        .unwrap();
    assert!(
        first.len() >= 7 * 4,
        "first run created the topology: {first:?}"
    );
    let second = orderfleet::infra::provision::provision(&clients, &topo)
        .await
        .unwrap();
    assert_eq!(second, vec![], "second run changed something");
}

#[tokio::test]
async fn a_queue_without_a_redrive_policy_is_refused_with_a_clear_message() {
    let clients = support::clients().await;
    let name = support::unique("bare");
    clients
        .sqs
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .unwrap();
    let err = orderfleet::sqs::queue::inspect_queue(&clients.sqs, &name)
        .await
        .expect_err("must refuse");
    let text = format!("{err:#}");
    assert!(text.contains("has no RedrivePolicy"), "{text}");
    assert!(text.contains("orderfleet provision"), "{text}");
}

/// Panics on the first attempt, sleeps past the handler timeout on the second, then succeeds.
struct Unruly {
    calls: AtomicU32,
}

#[async_trait]
impl Handler for Unruly {
    type Batch = ();

    fn name(&self) -> &str {
        "unruly"
    }
    async fn handle(&self, _: &Envelope, _: &mut Context<'_>) -> Result<(), HandlerError> {
        match self.calls.fetch_add(1, Ordering::SeqCst) {
            0 => panic!("boom in the handler"),
            1 => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn a_panic_and_a_timeout_each_count_as_a_retry_and_the_worker_keeps_running() {
    a_panic_and_a_timeout_count_once(false).await;
}

#[tokio::test]
async fn a_grouped_event_s_panic_and_timeout_are_counted_once_each_too() {
    a_panic_and_a_timeout_count_once(true).await;
}

async fn a_panic_and_a_timeout_count_once(grouped: bool) {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let unruly = Arc::new(Unruly {
        calls: AtomicU32::new(0),
    });
    let tweak = |c: &mut ConsumerConfig| {
        c.handler_timeout = Duration::from_secs(1);
        c.retry = RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(2),
        };
    };
    let run = if grouped {
        // In groups, as a worker applies the grouping handlers' events.
        let (handler, pool) = (unruly.clone(), pool.clone());
        Running::start_applying(&clients, &topo, tweak, |cfg, counters| {
            Arc::new(GroupCommit::counting_into(
                handler,
                pool,
                GroupConfig {
                    max_group: 32,
                    transactions: 2,
                    timeout: cfg.handler_timeout,
                },
                counters.clone(),
            ))
        })
        .await
    } else {
        Running::start(&clients, &topo, &pool, unruly.clone(), tweak).await
    };
    send(
        &clients,
        &run.facts.queue_url,
        &support::stock_received("u", 1),
    )
    .await;
    let counters = run.counters.clone();
    support::wait_for(
        Duration::from_secs(30),
        "success on the third attempt",
        || {
            let c = counters.clone();
            async move { (c.snapshot().succeeded == 1).then_some(()) }
        },
    )
    .await;
    let s = run.counters.snapshot();
    assert_eq!((s.panics, s.timeouts, s.retried), (1, 1, 2));
    assert_eq!(unruly.calls.load(Ordering::SeqCst), 3);
    run.shutdown().await;
}

#[tokio::test]
async fn receive_errors_back_off_instead_of_spinning_and_stop_still_works() {
    // An endpoint where nothing listens: every receive fails with a connection error.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "local", "local", None, None, "test",
        ))
        .build();
    let sqs = aws_sdk_sqs::Client::from_conf(config);
    let (pool, _) = support::fresh_db().await;
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let consumer = Consumer {
        cfg: ConsumerConfig {
            queue_url: format!("http://127.0.0.1:{port}/000000000000/nowhere"),
            dlq_url: format!("http://127.0.0.1:{port}/000000000000/nowhere-dlq"),
            concurrency: 4,
            receivers: 1,
            wait_time_secs: 1,
            visibility_timeout: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            max_receive_count: 5,
            delete_flush: Duration::from_millis(5),
            receive_linger: Duration::ZERO,
            shutdown_grace: Duration::from_secs(1),
            max_event_age: None,
        },
        sqs,
        handler: runtime::Transactional::new(
            Arc::new(Picky {
                ok: AtomicU32::new(0),
            }),
            pool,
        ),
        leases: Leases::default(),
        counters: counters.clone(),
        relay_wake: None,
    };
    let task = tokio::spawn(consumer.run(stop.clone()));
    let started = Instant::now();
    let c = counters.clone();
    support::wait_for(Duration::from_secs(30), "a second failed receive", || {
        let c = c.clone();
        async move { (c.snapshot().receive_errors >= 3).then_some(()) }
    })
    .await;
    let elapsed = started.elapsed();
    let errors = counters.snapshot().receive_errors;
    // Our backoff starts at 200 ms and doubles, on top of the SDK's own retries: a few attempts
    // a second at most, where a busy loop would make thousands.
    assert!(
        (errors as f64) / elapsed.as_secs_f64() < 5.0,
        "{errors} receive errors in {elapsed:?}"
    );
    assert!(!task.is_finished(), "the consumer gave up");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stopped promptly")
        .unwrap()
        .unwrap();
}

/// Records its effect in `effects`, then emits an event; with `unstorable`, one whose detail
/// PostgreSQL's jsonb refuses (a NUL character), so the outbox write fails. With `hang`, it
/// never finishes after writing.
struct Effecting {
    unstorable: bool,
    hang: bool,
}

#[async_trait]
impl Handler for Effecting {
    type Batch = ();

    fn name(&self) -> &str {
        "effecting"
    }
    async fn handle(&self, ev: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        cx.tx
            .execute("INSERT INTO effects (event_id) VALUES ($1)", &[&ev.id])
            .await?;
        if self.hang {
            std::future::pending::<()>().await;
        }
        let note = if self.unstorable { "nul \u{0}" } else { "fine" };
        cx.emit("StockReceived", &json!({ "note": note }))
    }
}

#[tokio::test]
async fn an_outbox_write_that_fails_rolls_back_the_effects_and_the_inbox_claim() {
    let (pool, _) = support::fresh_db().await;
    pool.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE effects (event_id text PRIMARY KEY)")
        .await
        .unwrap();
    let body = support::event_body("StockReceived", "test", json!({"sku": "SKU-1"}));
    let event = Envelope::decode(&body).unwrap();

    let failing = Effecting {
        unstorable: true,
        hang: false,
    };
    let err = runtime::execute(&failing, &pool, &event, 1)
        .await
        .expect_err("the outbox cannot store a NUL character");
    assert!(err.to_string().contains("outbox"), "{err}");
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM effects").await,
        0
    );
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM outbox").await,
        0
    );
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM processed_messages").await,
        0,
        "the claim went with the rollback, so a redelivery applies"
    );

    let fixed = Effecting {
        unstorable: false,
        hang: false,
    };
    let done = runtime::execute(&fixed, &pool, &event, 2).await.unwrap();
    assert_eq!(done, runtime::Executed::Applied { emitted: 1 });
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM effects").await,
        1
    );
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM outbox").await,
        1
    );
    let again = runtime::execute(&fixed, &pool, &event, 3).await.unwrap();
    assert_eq!(again, runtime::Executed::Duplicate);
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM effects").await,
        1
    );
}

#[tokio::test]
async fn an_abandoned_handler_leaves_no_open_transaction_behind_on_a_pooled_connection() {
    let (setup, url) = support::fresh_db().await;
    setup
        .get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE effects (event_id text PRIMARY KEY)")
        .await
        .unwrap();
    // One connection: whatever runs next gets the connection the abandoned handler had, or
    // its replacement.
    let pool = orderfleet::store::db::pool(&url, 1).unwrap();
    let first = Envelope::decode(&support::event_body("StockReceived", "test", json!({}))).unwrap();
    let hanging = Effecting {
        unstorable: false,
        hang: true,
    };
    let timed_out = tokio::time::timeout(
        Duration::from_millis(300),
        runtime::execute(&hanging, &pool, &first, 1),
    )
    .await;
    assert!(
        timed_out.is_err(),
        "the handler hangs, so the timeout fires"
    );

    let second =
        Envelope::decode(&support::event_body("StockReceived", "test", json!({}))).unwrap();
    let fine = Effecting {
        unstorable: false,
        hang: false,
    };
    let done = runtime::execute(&fine, &pool, &second, 1).await.unwrap();
    assert_eq!(done, runtime::Executed::Applied { emitted: 1 });
    let client = pool.get().await.unwrap();
    let rows = client
        .query("SELECT event_id FROM effects", &[])
        .await
        .unwrap();
    let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        ids,
        vec![second.id.clone()],
        "only the finished handler's effect"
    );
    // Neither the pooled connection nor the abandoned one is left inside a transaction (the
    // abandoned one was closed, so the server rolled it back).
    let db = url.rsplit('/').next().unwrap().to_string();
    support::wait_for(
        Duration::from_secs(5),
        "the abandoned transaction to end",
        || {
            let setup = setup.clone();
            let db = db.clone();
            async move {
                let stuck: i64 = setup
                    .get()
                    .await
                    .unwrap()
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = $1 AND state LIKE 'idle in transaction%'",
                        &[&db],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (stuck == 0).then_some(())
            }
        },
    )
    .await;
}

/// Waits for a row lock that another transaction holds.
struct LockWaiting;

#[async_trait]
impl Handler for LockWaiting {
    type Batch = ();

    fn name(&self) -> &str {
        "lock-waiting"
    }
    async fn handle(&self, _: &Envelope, cx: &mut Context<'_>) -> Result<(), HandlerError> {
        cx.tx
            .execute(
                "SELECT event_id FROM effects WHERE event_id = 'held' FOR UPDATE",
                &[],
            )
            .await?;
        Ok(())
    }
}

/// A handler abandoned while its statement waits for a lock does not leave its backend behind
/// in the wait: the server notices the closed connection, ends the backend and frees its slot,
/// while the lock's holder goes on undisturbed.
#[tokio::test]
async fn a_handler_abandoned_in_a_lock_wait_leaves_no_waiting_backend_behind() {
    let (setup, url) = support::fresh_db().await;
    let holder = setup.get().await.unwrap();
    holder
        .batch_execute(
            "CREATE TABLE effects (event_id text PRIMARY KEY);
             INSERT INTO effects VALUES ('held');",
        )
        .await
        .unwrap();
    holder
        .batch_execute("BEGIN; SELECT event_id FROM effects WHERE event_id = 'held' FOR UPDATE")
        .await
        .unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    let waiting = || {
        let setup = setup.clone();
        let db = db.clone();
        async move {
            let n: i64 = setup
                .get()
                .await
                .unwrap()
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = $1 AND wait_event_type = 'Lock'",
                    &[&db],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };

    let pool = orderfleet::store::db::pool(&url, 1).unwrap();
    let event = Envelope::decode(&support::event_body("StockReceived", "test", json!({}))).unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(500),
        runtime::execute(&LockWaiting, &pool, &event, 1),
    );
    let abandoned = abandoned.await;
    assert!(
        abandoned.is_err(),
        "the lock is held, so it times out: {abandoned:?}"
    );
    // It really was waiting for the lock when it was abandoned.
    assert_eq!(
        waiting().await,
        1,
        "the abandoned backend is in its lock wait"
    );

    support::wait_for(
        Duration::from_secs(5),
        "the abandoned backend to leave its lock wait",
        || async { (waiting().await == 0).then_some(()) },
    )
    .await;
    // The holder's transaction was never disturbed.
    holder.batch_execute("COMMIT").await.unwrap();
}

/// The local stack's socket URL reaches the database through its Unix-domain socket. TLS has
/// no server name to check there, and used to refuse the path before `sslmode` was read.
#[tokio::test]
async fn a_database_url_naming_a_unix_socket_connects_through_it() {
    let url = support::env("ORDERFLEET_PG_SOCKET_URL");
    let pool = orderfleet::store::db::pool(&url, 1).expect("pool");
    let client = pool.get().await.expect("connect through the socket");
    let row = client
        .query_one(
            "SELECT inet_server_addr() IS NULL, current_database()::text",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the connection went over TCP");
    let tcp = support::env("DATABASE_URL");
    assert_eq!(
        Some(row.get::<_, String>(1).as_str()),
        tcp.rsplit('/').next()
    );
}

/// Inbox rows past the retention go, in batches, and nothing younger does: an event applied
/// within the retention is still a duplicate when it is delivered again.
#[tokio::test]
async fn inbox_rows_past_their_retention_are_deleted_and_younger_ones_still_catch_duplicates() {
    let (pool, _) = support::fresh_db().await;
    pool.get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE effects (event_id text PRIMARY KEY);
             INSERT INTO processed_messages (handler, event_key, detail_type, processed_at)
             SELECT 'effecting', 'old-' || i, 'StockReceived',
                    now() - interval '20 days' - i * interval '1 minute'
               FROM generate_series(1, 12) i;
             INSERT INTO processed_messages (handler, event_key, detail_type, processed_at)
             SELECT 'effecting', 'recent-' || i, 'StockReceived', now() - interval '14 days'
               FROM generate_series(1, 3) i;",
        )
        .await
        .unwrap();
    let fine = Effecting {
        unstorable: false,
        hang: false,
    };
    let event = Envelope::decode(&support::event_body("StockReceived", "test", json!({}))).unwrap();
    assert_eq!(
        runtime::execute(&fine, &pool, &event, 1).await.unwrap(),
        runtime::Executed::Applied { emitted: 1 }
    );

    let retention =
        InboxRetention::new(pool.clone(), Duration::from_secs(15 * 86_400)).with_batch(5);
    assert_eq!(
        retention.prune().await.unwrap(),
        12,
        "the twelve old rows in one pass, though stored newest first, against the walk"
    );
    assert_eq!(
        retention.prune().await.unwrap(),
        0,
        "nothing is left to prune"
    );
    assert_eq!(
        support::scalar(
            &pool,
            "SELECT count(*) FROM processed_messages WHERE event_key LIKE 'old-%'"
        )
        .await,
        0
    );
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM processed_messages").await,
        4,
        "the three rows inside the retention and the event just applied"
    );
    assert_eq!(
        runtime::execute(&fine, &pool, &event, 2).await.unwrap(),
        runtime::Executed::Duplicate,
        "a redelivery inside the retention is still caught"
    );
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM effects").await,
        1
    );
}

/// The worker's pruning task prunes as soon as it starts and stops when told.
#[tokio::test]
async fn the_pruning_task_prunes_at_start_and_stops_when_told() {
    let (pool, _) = support::fresh_db().await;
    pool.get()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO processed_messages (handler, event_key, detail_type, processed_at)
             SELECT 'inventory', 'old-' || i, 'StockReceived', now() - interval '30 days'
               FROM generate_series(1, 7) i",
        )
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        InboxRetention::new(pool.clone(), Duration::from_secs(15 * 86_400))
            .with_batch(2)
            .run(Duration::from_secs(3600), stop.clone()),
    );
    support::wait_for(Duration::from_secs(10), "the old inbox rows to go", || {
        let pool = pool.clone();
        async move {
            (support::scalar(&pool, "SELECT count(*) FROM processed_messages").await == 0)
                .then_some(())
        }
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the task stops when told")
        .unwrap();
}

/// Does nothing, but takes 300 ms over SKU "first" (so that events arriving meanwhile queue
/// up and form a group), and counts its calls.
struct Quick {
    calls: AtomicU32,
}

#[async_trait]
impl Handler for Quick {
    type Batch = ();

    fn name(&self) -> &str {
        "inventory"
    }
    async fn handle(&self, ev: &Envelope, _: &mut Context<'_>) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if ev.detail["sku"] == "first" {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn an_event_its_group_committed_after_the_consumer_timed_out_is_not_dead_lettered_as_exhausted(
) {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    // The COMMIT of a transaction that claimed several events takes a second per event, longer
    // than the 1 s handler timeout: the consumers stop waiting while their group is committing.
    pool.get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE FUNCTION slow_group_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF (SELECT count(*) FROM processed_messages p
                   WHERE p.xmin = (SELECT q.xmin FROM processed_messages q
                                   WHERE q.handler = NEW.handler AND q.event_key = NEW.event_key)
                  ) > 1 THEN
                 PERFORM pg_sleep(1);
               END IF;
               RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER slow_group_commit AFTER INSERT ON processed_messages
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_group_commit();",
        )
        .await
        .unwrap();
    let tweak = |c: &mut ConsumerConfig| {
        c.handler_timeout = Duration::from_secs(1);
        // The first receive is the last allowed one: a retry would be a dead letter.
        c.max_receive_count = 1;
    };
    let quick = Arc::new(Quick {
        calls: AtomicU32::new(0),
    });
    let (handler, pool_) = (quick.clone(), pool.clone());
    let run = Running::start_applying(&clients, &topo, tweak, |cfg, counters| {
        Arc::new(GroupCommit::counting_into(
            handler,
            pool_,
            GroupConfig {
                max_group: 32,
                transactions: 1,
                timeout: cfg.handler_timeout,
            },
            counters.clone(),
        ))
    })
    .await;
    let url = run.facts.queue_url.clone();
    send(&clients, &url, &support::stock_received("first", 1)).await;
    support::wait_for(
        Duration::from_secs(20),
        "the first event running",
        || async { (quick.calls.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;
    // These two queue behind the first and are then committed together, slowly.
    support::send_bodies(
        &clients,
        &url,
        &[
            support::stock_received("a", 1),
            support::stock_received("b", 1),
        ],
    )
    .await;
    let counters = run.counters.clone();
    support::wait_for(Duration::from_secs(30), "three answers", || {
        let c = counters.clone();
        async move {
            let s = c.snapshot();
            (s.duplicates + s.dead_lettered + s.succeeded + s.retried >= 3).then_some(())
        }
    })
    .await;
    let s = run.counters.snapshot();
    assert_eq!(s.timeouts, 2, "the two grouped events' consumers timed out");
    assert_eq!(
        s.dead_lettered, 0,
        "dead-lettered as exhausted although their group committed them"
    );
    assert_eq!((s.succeeded, s.duplicates), (1, 2));
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM processed_messages").await,
        3
    );
    run.shutdown().await;
    support::wait_for(Duration::from_secs(5), "the messages deleted", || async {
        queue_is_empty(&clients, &url).await.then_some(())
    })
    .await;
}
