//! The data lake: events published on the bus reach S3 through Firehose (moto), one record
//! each, under date partitions; `orderfleet lake stats` counts them; and a Firehose that
//! rejects some records of a batch (an HTTP fake of its JSON 1.1 API, since moto never does)
//! gets exactly those again, so nothing is lost or duplicated. The handler commits in groups: an
//! event delivered twice, inside one group or to two consumers of the queue, is archived once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{self, GroupedConsumer};
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use base64::Engine as _;
use deadpool_postgres::Pool;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use orderfleet::domain::catalogue::STOREFRONT_SOURCE;
use orderfleet::domain::envelope::Envelope;
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::redaction::Redactor;
use orderfleet::handlers::analytics::Analytics;
use orderfleet::infra::aws::Clients;
use orderfleet::infra::topology::Topology;
use orderfleet::runtime::group::{execute_group, GroupConfig};
use orderfleet::runtime::lease::Leases;
use orderfleet::runtime::{self, Consumer, Executed};
use orderfleet::store::lake::{
    self, LakeShipper, ShipperConfig, MAX_BATCH_BYTES, MAX_BATCH_RECORDS,
};
use orderfleet::telemetry::metrics::Counters;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// The key tests pseudonymise the lake under.
const LAKE_KEY: &[u8] = b"a test key of thirty-two bytes or more";

fn analytics() -> Analytics {
    Analytics::new(Redactor::new(LAKE_KEY).unwrap())
}

/// The analytics consumer and the lake shipper, running in this test against the topology.
struct Archiver {
    stop: CancellationToken,
    consumer: tokio::task::JoinHandle<anyhow::Result<()>>,
    shipper_stop: CancellationToken,
    shipper: tokio::task::JoinHandle<()>,
    lease_stop: CancellationToken,
}

impl Archiver {
    async fn start(clients: &Clients, topo: &Topology, pool: &Pool) -> Archiver {
        let facts = orderfleet::sqs::queue::inspect_queue(
            &clients.sqs,
            &topo.queue_name(HandlerName::Analytics),
        )
        .await
        .expect("analytics queue");
        let cfg = support::consumer_config(&facts);
        runtime::validate(&cfg, &facts).expect("valid settings");
        let leases = Leases::default();
        let lease_stop = CancellationToken::new();
        tokio::spawn(leases.clone().run(
            clients.sqs.clone(),
            runtime::LEASE_TICK,
            lease_stop.clone(),
        ));
        let stop = CancellationToken::new();
        let consumer = Consumer {
            cfg,
            sqs: clients.sqs.clone(),
            handler: runtime::Transactional::new(Arc::new(analytics()), pool.clone()),
            leases,
            counters: Arc::new(Counters::default()),
            relay_wake: None,
        };
        let consumer = tokio::spawn(consumer.run(stop.clone()));
        let shipper = LakeShipper::new(
            pool.clone(),
            clients.firehose.clone(),
            topo.firehose_stream(),
            ShipperConfig {
                flush_interval: Duration::from_millis(100),
                ..ShipperConfig::default()
            },
        );
        let shipper_stop = CancellationToken::new();
        let shipper = tokio::spawn(shipper.run(shipper_stop.clone()));
        Archiver {
            stop,
            consumer,
            shipper_stop,
            shipper,
            lease_stop,
        }
    }

    /// Stops as the worker does: the consumer first, then the shipper, which drains what the
    /// last handlers committed.
    async fn shutdown(self) {
        self.stop.cancel();
        self.consumer.await.expect("join").expect("consumer");
        self.shipper_stop.cancel();
        self.shipper.await.expect("shipper");
        self.lease_stop.cancel();
    }
}

/// Publishes storefront events with PutEvents, ten per call. Returns EventBridge's ids.
async fn publish(clients: &Clients, topo: &Topology, events: &[(String, Value)]) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in events.chunks(10) {
        let entries = chunk
            .iter()
            .map(|(detail_type, detail)| {
                PutEventsRequestEntry::builder()
                    .event_bus_name(&topo.bus_name)
                    .source(STOREFRONT_SOURCE)
                    .detail_type(detail_type)
                    .detail(detail.to_string())
                    .build()
            })
            .collect();
        let out = clients
            .events
            .put_events()
            .set_entries(Some(entries))
            .send()
            .await
            .expect("PutEvents");
        assert_eq!(out.failed_entry_count(), 0, "{out:?}");
        ids.extend(
            out.entries()
                .iter()
                .map(|e| e.event_id().expect("event id").to_string()),
        );
    }
    ids
}

#[tokio::test]
async fn the_lake_holds_no_payment_token_email_address_or_street_line() {
    let clients = support::clients().await;
    let topo = support::lake_topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let bucket = lake::resolve_bucket(&clients.firehose, &topo.firehose_stream())
        .await
        .unwrap();
    let archiver = Archiver::start(&clients, &topo, &pool).await;
    let order = |n: u32| {
        let mut d = orderfleet_testkit::examples::example("OrderPlaced").unwrap();
        d["order_id"] = json!(format!("ord-lake-{n}"));
        d["event_id"] = json!(format!("evt-lake-{n}"));
        d["payment_token"] = json!("tok_secret_4242");
        d["customer"]["email"] = json!("grace.hopper@example.com");
        d["customer"]["name"] = json!("Grace Hopper");
        d["shipping_address"]["line1"] = json!("1 Navy Yard Lane");
        d["shipping_address"]["postal_code"] = json!("20374");
        ("OrderPlaced".to_string(), d)
    };
    publish(&clients, &topo, &[order(1), order(2)]).await;
    let records = support::wait_for(Duration::from_secs(60), "2 lake records", || async {
        let (records, _) = lake::read(&clients.s3, &bucket).await.ok()?;
        (records.len() >= 2).then_some(records)
    })
    .await;
    archiver.shutdown().await;

    let email = regex_lite::Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}").unwrap();
    for r in &records {
        let text = r.event.to_string();
        for secret in ["tok_secret_4242", "Grace Hopper", "Navy Yard", "20374"] {
            assert!(!text.contains(secret), "{secret} reached the lake: {text}");
        }
        assert!(
            !email.is_match(&text),
            "an email address reached the lake: {text}"
        );
        let detail = &r.event["detail"];
        assert_eq!(
            detail["shipping_address"],
            json!({"country": "US", "postal_prefix": "203"})
        );
        assert!(
            detail["lines"].is_array(),
            "the order's lines stay for analysis"
        );
    }
    // One customer, one pseudonym: returning customers can still be counted.
    let redactor = Redactor::new(LAKE_KEY).unwrap();
    for r in &records {
        assert_eq!(
            r.event["detail"]["customer"]["email"],
            redactor.pseudonym("grace.hopper@example.com")
        );
    }
}

#[tokio::test]
async fn published_events_each_land_once_in_the_lake_under_todays_partition() {
    let clients = support::clients().await;
    let topo = support::lake_topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let bucket = lake::resolve_bucket(&clients.firehose, &topo.firehose_stream())
        .await
        .expect("the provisioned stream names its bucket");
    assert_eq!(bucket, topo.lake_bucket());

    let day_before = chrono::Utc::now().date_naive();
    let archiver = Archiver::start(&clients, &topo, &pool).await;
    let kinds = ["OrderPlaced", "StockReceived", "ProductUpserted"];
    let events: Vec<(String, Value)> = (0..25)
        .map(|i| (kinds[i % 3].to_string(), json!({"n": i})))
        .collect();
    let ids = publish(&clients, &topo, &events).await;
    assert_eq!(ids.len(), 25);

    support::wait_for(Duration::from_secs(60), "25 lake records", || async {
        let (records, _) = lake::read(&clients.s3, &bucket).await.ok()?;
        (records.len() >= 25).then_some(records)
    })
    .await;
    archiver.shutdown().await;
    let day_after = chrono::Utc::now().date_naive();

    // Read again after everything stopped: nothing arrived late, nothing twice.
    let (records, read) = lake::read(&clients.s3, &bucket).await.expect("read lake");
    assert_eq!(records.len(), 25, "{records:?}");
    let mut got: Vec<&str> = records
        .iter()
        .map(|r| r.event["id"].as_str().unwrap())
        .collect();
    got.sort();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(got, want, "each published event is in the lake once");
    assert!(read.objects >= 1 && read.objects <= 25, "{read:?}");

    for r in &records {
        assert!(r.key.starts_with("events/"), "{}", r.key);
        let day = r
            .partition
            .unwrap_or_else(|| panic!("no partition in {}", r.key));
        assert!(
            day == day_before || day == day_after,
            "{} under {day}",
            r.key
        );
        // The full envelope, as EventBridge delivered it.
        for field in [
            "version",
            "id",
            "detail-type",
            "source",
            "account",
            "time",
            "region",
            "resources",
            "detail",
        ] {
            assert!(
                r.event.get(field).is_some(),
                "{field} missing in {}",
                r.event
            );
        }
        assert_eq!(r.event["source"], STOREFRONT_SOURCE);
    }
    let stats = lake::LakeStats::from_records(&read, &records);
    assert_eq!(
        stats.by_detail_type,
        BTreeMap::from([
            ("OrderPlaced".to_string(), 9),
            ("ProductUpserted".to_string(), 8),
            ("StockReceived".to_string(), 8),
        ])
    );
    assert_eq!(stats.duplicates, 0);

    let client = pool.get().await.unwrap();
    let pending: i64 = client
        .query_one(
            "SELECT count(*) FROM lake_outbox WHERE shipped_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 0);
}

/// An SQS body for `detail_type` at `time`, with its own event id.
fn envelope(detail_type: &str, time: &str, event_id: &str) -> Envelope {
    let body = json!({
        "version": "0",
        "id": uuid::Uuid::new_v4().to_string(),
        "detail-type": detail_type,
        "source": "orderfleet.orders",
        "account": "123456789012",
        "time": time,
        "region": "us-east-1",
        "resources": [],
        "detail": {"event_id": event_id, "order_id": "ord-1"},
    });
    Envelope::decode(&body.to_string()).expect("envelope")
}

#[tokio::test]
async fn lake_stats_counts_records_by_detail_type_and_day() {
    let clients = support::clients().await;
    let topo = support::lake_topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let plan = [
        ("OrderPlaced", "2026-01-01T23:59:59Z", 3),
        ("OrderAccepted", "2026-01-01T10:00:00Z", 2),
        ("OrderPlaced", "2026-01-02T00:00:00Z", 4),
        ("OrderCompleted", "2026-01-02T12:30:00Z", 1),
    ];
    let mut n = 0;
    for (detail_type, time, count) in plan {
        for _ in 0..count {
            n += 1;
            let event = envelope(detail_type, time, &format!("ev-{n}"));
            let done = runtime::execute(&analytics(), &pool, &event, 1)
                .await
                .unwrap();
            assert_eq!(done, Executed::Applied { emitted: 0 });
            // A redelivery, and a republication of the same outbox event under a new
            // EventBridge id, archive nothing more.
            let again = runtime::execute(&analytics(), &pool, &event, 2)
                .await
                .unwrap();
            assert_eq!(again, Executed::Duplicate);
            let mut republished = event.clone();
            republished.id = uuid::Uuid::new_v4().to_string();
            let again = runtime::execute(&analytics(), &pool, &republished, 1)
                .await
                .unwrap();
            assert_eq!(again, Executed::Duplicate);
        }
    }
    let shipper = LakeShipper::new(
        pool.clone(),
        clients.firehose.clone(),
        topo.firehose_stream(),
        ShipperConfig::default(),
    );
    assert_eq!(shipper.drain(Duration::from_secs(30)).await.unwrap(), 10);
    assert_eq!(shipper.pending().await.unwrap(), 0);

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(["lake", "stats", "--json", "--prefix", &topo.prefix])
        .output()
        .await
        .expect("run orderfleet lake stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(
        stats["by_detail_type"],
        json!({"OrderPlaced": 7, "OrderAccepted": 2, "OrderCompleted": 1})
    );
    assert_eq!(stats["by_day"], json!({"2026-01-01": 5, "2026-01-02": 5}));
    assert_eq!(stats["records"], 10);
    assert_eq!(stats["duplicates"], 0);
    assert_eq!(stats["bucket"], topo.lake_bucket());

    let text = tokio::process::Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(["lake", "stats", "--prefix", &topo.prefix])
        .output()
        .await
        .expect("run orderfleet lake stats");
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("10 record(s)"), "{text}");
    assert!(text.contains("OrderPlaced"), "{text}");
}

#[tokio::test]
async fn provisioning_the_lake_twice_changes_nothing_the_second_time() {
    let clients = support::clients().await;
    let topo = Topology::with_prefix(support::unique("l"));
    let first = orderfleet::infra::provision::provision(&clients, &topo)
        .await
        .unwrap();
    let lake: Vec<_> = first
        .iter()
        .filter(|c| c.resource.contains("-lake"))
        .map(|c| (c.resource.as_str(), c.action.as_str()))
        .collect();
    let bucket = format!("bucket {}", topo.lake_bucket());
    let stream = format!("delivery stream {}", topo.firehose_stream());
    assert_eq!(
        lake,
        vec![(bucket.as_str(), "created"), (stream.as_str(), "created")]
    );
    let second = orderfleet::infra::provision::provision(&clients, &topo)
        .await
        .unwrap();
    assert_eq!(second, vec![]);
}

// --------------------------------------------------------------------------------------------
// A fake of Firehose's PutRecordBatch (JSON 1.1), for failures moto cannot produce.
// --------------------------------------------------------------------------------------------

#[derive(Default)]
struct FakeFirehose {
    /// Records of every well-formed call, in order.
    calls: Vec<Vec<Vec<u8>>>,
    /// Records the fake accepted, in order.
    accepted: Vec<Vec<u8>>,
    /// On the first call, the entries at these positions fail.
    fail_first_call_at: Vec<usize>,
    /// Requests refused as malformed, with the reason.
    refused: Vec<String>,
}

fn json_response(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", uuid::Uuid::new_v4().to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

async fn fake_firehose_call(
    req: Request<Incoming>,
    state: Arc<Mutex<FakeFirehose>>,
) -> Response<Full<Bytes>> {
    let refuse = |state: &Arc<Mutex<FakeFirehose>>, why: String| {
        state.lock().unwrap().refused.push(why.clone());
        json_response(
            400,
            json!({"__type": "InvalidArgumentException", "message": why}),
        )
    };
    let target = req
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if req.method() != hyper::Method::POST || req.uri().path() != "/" {
        return refuse(&state, format!("{} {}", req.method(), req.uri()));
    }
    if target != "Firehose_20150804.PutRecordBatch" {
        return refuse(&state, format!("unexpected X-Amz-Target {target:?}"));
    }
    if content_type != "application/x-amz-json-1.1" {
        return refuse(&state, format!("unexpected Content-Type {content_type:?}"));
    }
    let body = req.into_body().collect().await.expect("body").to_bytes();
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return refuse(&state, "body is not JSON".into());
    };
    if body["DeliveryStreamName"].as_str() != Some("fake-lake") {
        return refuse(&state, format!("stream {}", body["DeliveryStreamName"]));
    }
    let Some(entries) = body["Records"].as_array() else {
        return refuse(&state, "no Records".into());
    };
    if entries.is_empty() || entries.len() > MAX_BATCH_RECORDS {
        return refuse(&state, format!("{} records in one call", entries.len()));
    }
    let mut records = Vec::new();
    for entry in entries {
        let decoded = entry["Data"]
            .as_str()
            .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok());
        match decoded {
            Some(data) if !data.is_empty() && data.len() <= lake::MAX_RECORD_BYTES => {
                records.push(data)
            }
            _ => {
                return refuse(
                    &state,
                    "a record's Data is not valid base64 of 1..=1000 KiB".into(),
                )
            }
        }
    }
    let total: usize = records.iter().map(Vec::len).sum();
    if total > MAX_BATCH_BYTES {
        return refuse(&state, format!("{total} bytes in one call"));
    }
    let mut s = state.lock().unwrap();
    let first = s.calls.is_empty();
    s.calls.push(records.clone());
    let mut responses = Vec::new();
    let mut failed = 0;
    for (i, data) in records.into_iter().enumerate() {
        if first && s.fail_first_call_at.contains(&i) {
            failed += 1;
            responses.push(json!({
                "ErrorCode": "ServiceUnavailableException",
                "ErrorMessage": "Slow down."
            }));
        } else {
            s.accepted.push(data);
            responses.push(json!({"RecordId": uuid::Uuid::new_v4().to_string()}));
        }
    }
    json_response(
        200,
        json!({"FailedPutCount": failed, "Encrypted": false, "RequestResponses": responses}),
    )
}

/// Starts the fake; returns its state and a Firehose client pointed at it (with the SDK's
/// own retries off, so that every call the shipper makes is one request).
async fn fake_firehose(
    fail_first_call_at: Vec<usize>,
) -> (Arc<Mutex<FakeFirehose>>, aws_sdk_firehose::Client) {
    let state = Arc::new(Mutex::new(FakeFirehose {
        fail_first_call_at,
        ..FakeFirehose::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let served = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = served.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(fake_firehose_call(req, state).await)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let sdk = orderfleet::infra::aws::sdk_config().await;
    let config = aws_sdk_firehose::config::Builder::from(&sdk)
        .endpoint_url(format!("http://{addr}"))
        .retry_config(aws_sdk_firehose::config::retry::RetryConfig::disabled())
        .build();
    (state, aws_sdk_firehose::Client::from_conf(config))
}

/// Archives `n` events whose details are `size` bytes of padding; returns their records.
async fn archive(pool: &Pool, n: usize, size: usize) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    for i in 0..n {
        let body = json!({
            "version": "0", "id": format!("eb-{i}"), "detail-type": "OrderPlaced",
            "source": STOREFRONT_SOURCE, "account": "123456789012",
            "time": "2026-01-02T03:04:05Z", "region": "us-east-1", "resources": [],
            "detail": {"n": i, "pad": "x".repeat(size)},
        });
        let event = Envelope::decode(&body.to_string()).unwrap();
        runtime::execute(&analytics(), pool, &event, 1)
            .await
            .unwrap();
        records.push(lake::record_for(&event, &Redactor::new(LAKE_KEY).unwrap()).unwrap());
    }
    records
}

#[tokio::test]
async fn records_failing_within_a_batch_are_retried_alone_without_loss_or_duplication() {
    let (pool, _) = support::fresh_db().await;
    let (fake, firehose) = fake_firehose(vec![1, 4, 7]).await;
    let records = archive(&pool, 10, 10).await;
    let shipper = LakeShipper::new(
        pool.clone(),
        firehose,
        "fake-lake",
        ShipperConfig::default(),
    );

    let first = shipper.ship_once().await.unwrap();
    assert_eq!(
        first,
        lake::ShipPass {
            sent: 10,
            shipped: 7,
            failed: 3,
            more: false
        }
    );
    assert_eq!(shipper.pending().await.unwrap(), 3);
    let client = pool.get().await.unwrap();
    let errors: Vec<(i32, String)> = client
        .query(
            "SELECT attempts, last_error FROM lake_outbox WHERE shipped_at IS NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        errors,
        vec![(1, "ServiceUnavailableException: Slow down.".to_string()); 3]
    );

    let second = shipper.ship_once().await.unwrap();
    assert_eq!(
        second,
        lake::ShipPass {
            sent: 3,
            shipped: 3,
            failed: 0,
            more: false
        }
    );
    assert_eq!(
        shipper.ship_once().await.unwrap().sent,
        0,
        "nothing left to ship"
    );

    let fake = fake.lock().unwrap();
    assert!(fake.refused.is_empty(), "{:?}", fake.refused);
    assert_eq!(fake.calls.len(), 2);
    assert_eq!(
        fake.calls[0], records,
        "the first call carries every record, in order"
    );
    assert_eq!(
        fake.calls[1],
        vec![records[1].clone(), records[4].clone(), records[7].clone()],
        "the retry carries exactly the failed records"
    );
    let mut accepted = fake.accepted.clone();
    accepted.sort();
    let mut want = records.clone();
    want.sort();
    assert_eq!(accepted, want, "every record accepted exactly once");
}

#[tokio::test]
async fn batches_hold_at_most_500_records_and_4_mib() {
    let (pool, _) = support::fresh_db().await;
    let (fake, firehose) = fake_firehose(vec![]).await;
    let small = archive(&pool, 1100, 10).await;
    let shipper = LakeShipper::new(
        pool.clone(),
        firehose.clone(),
        "fake-lake",
        ShipperConfig::default(),
    );
    assert_eq!(shipper.drain(Duration::from_secs(60)).await.unwrap(), 1100);
    {
        let fake = fake.lock().unwrap();
        assert!(fake.refused.is_empty(), "{:?}", fake.refused);
        let sizes: Vec<usize> = fake.calls.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![500, 500, 100]);
        assert_eq!(fake.accepted, small);
    }

    // 900 KiB records: four fit in 4 MiB, a fifth would not.
    let (pool, _) = support::fresh_db().await;
    let (fake, firehose) = fake_firehose(vec![]).await;
    let big = archive(&pool, 10, 900 * 1024).await;
    let shipper = LakeShipper::new(
        pool.clone(),
        firehose,
        "fake-lake",
        ShipperConfig::default(),
    );
    assert_eq!(shipper.drain(Duration::from_secs(60)).await.unwrap(), 10);
    let fake = fake.lock().unwrap();
    assert!(fake.refused.is_empty(), "{:?}", fake.refused);
    let sizes: Vec<usize> = fake.calls.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![4, 4, 2]);
    assert_eq!(fake.accepted, big);
}

#[tokio::test]
async fn an_event_too_big_for_firehose_is_refused_for_good_and_archives_nothing() {
    let (pool, _) = support::fresh_db().await;
    let body = json!({
        "version": "0", "id": "eb-big", "detail-type": "OrderPlaced",
        "source": STOREFRONT_SOURCE, "account": "123456789012",
        "time": "2026-01-02T03:04:05Z", "region": "us-east-1", "resources": [],
        "detail": {"pad": "x".repeat(lake::MAX_RECORD_BYTES)},
    });
    let event = Envelope::decode(&body.to_string()).unwrap();
    let err = runtime::execute(&analytics(), &pool, &event, 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "permanent", "{err}");
    assert!(
        err.to_string().contains("Firehose accepts at most"),
        "{err}"
    );
    let client = pool.get().await.unwrap();
    let rows: i64 = client
        .query_one("SELECT count(*) FROM lake_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

/// The archived rows: (event key, how many rows carry it), by key.
async fn archived_keys(pool: &Pool) -> Vec<(String, i64)> {
    pool.get()
        .await
        .unwrap()
        .query(
            "SELECT event_key, count(*) FROM lake_outbox GROUP BY event_key ORDER BY event_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn an_event_delivered_twice_inside_one_group_is_archived_once() {
    let (pool, _) = support::fresh_db().await;
    let now = chrono::Utc::now().to_rfc3339();
    let first = envelope("OrderPlaced", &now, "evt-group-1");
    let second = envelope("OrderPlaced", &now, "evt-group-2");
    // The first event three times (the third on a later receive), the second once, together.
    let group = vec![(&first, 1), (&second, 1), (&first, 1), (&first, 2)];
    let outcome = execute_group(&analytics(), &pool, &group).await;

    assert_eq!(outcome.transactions, 1, "one group, one transaction");
    let answers: Vec<_> = outcome.results.iter().map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        answers,
        vec![
            Some(&Executed::Applied { emitted: 0 }),
            Some(&Executed::Applied { emitted: 0 }),
            Some(&Executed::Duplicate),
            Some(&Executed::Duplicate),
        ]
    );
    assert_eq!(
        archived_keys(&pool).await,
        vec![
            ("evt-group-1".to_string(), 1),
            ("evt-group-2".to_string(), 1)
        ]
    );
}

#[tokio::test]
async fn a_group_writes_every_record_and_an_id_reused_across_detail_types_is_archived_once() {
    let (pool, _) = support::fresh_db().await;
    let now = chrono::Utc::now().to_rfc3339();
    // A group's records go in one insert at its end. Two events that share an id but not a
    // detail-type are two events to the inbox, and one record to the lake: the second meets
    // the first inside that one statement.
    let placed = envelope("OrderPlaced", &now, "evt-reused");
    let shipped = envelope("OrderShipped", &now, "evt-reused");
    let others: Vec<Envelope> = (0..20)
        .map(|i| envelope("OrderAccepted", &now, &format!("evt-many-{i:02}")))
        .collect();
    let mut group = vec![(&placed, 1), (&shipped, 1)];
    group.extend(others.iter().map(|e| (e, 1)));
    let outcome = execute_group(&analytics(), &pool, &group).await;

    assert_eq!(outcome.transactions, 1, "one group, one transaction");
    assert!(
        outcome
            .results
            .iter()
            .all(|r| matches!(r, Ok(Executed::Applied { emitted: 0 }))),
        "{:?}",
        outcome.results
    );
    let archived = archived_keys(&pool).await;
    assert_eq!(archived.len(), 21, "{archived:?}");
    assert!(archived.iter().all(|(_, n)| *n == 1), "{archived:?}");
    let kept: String = pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT detail_type FROM lake_outbox WHERE event_key = 'evt-reused'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        kept, "OrderPlaced",
        "the first of the two is the one archived"
    );
}

/// One analytics consumer applying through a group commit, as a worker builds it.
fn grouped_archiver(
    clients: &Clients,
    pool: &Pool,
    cfg: runtime::ConsumerConfig,
) -> GroupedConsumer {
    GroupedConsumer::start(
        clients,
        pool,
        Arc::new(analytics()),
        cfg,
        GroupConfig {
            max_group: 32,
            transactions: 2,
            timeout: Duration::from_secs(20),
        },
    )
}

#[tokio::test]
async fn events_delivered_twice_to_two_grouping_consumers_of_one_queue_are_archived_once() {
    let clients = support::clients().await;
    // The consumers only write `lake_outbox`; no shipper runs, so no lake is needed.
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let facts = orderfleet::sqs::queue::inspect_queue(
        &clients.sqs,
        &topo.queue_name(HandlerName::Analytics),
    )
    .await
    .expect("analytics queue");
    const EVENTS: usize = 40;
    // Each event sent twice in a row, so the two copies often arrive in one receive (one
    // group) or in the two consumers at once.
    let bodies: Vec<String> = (0..EVENTS)
        .map(|i| {
            support::event_body(
                "OrderPlaced",
                STOREFRONT_SOURCE,
                json!({"order_id": format!("ord-twice-{i}"), "event_id": format!("evt-twice-{i:02}")}),
            )
        })
        .collect();
    let twice: Vec<String> = bodies.iter().flat_map(|b| [b.clone(), b.clone()]).collect();
    let cfg = runtime::ConsumerConfig {
        concurrency: 30,
        receivers: 2,
        ..support::consumer_config(&facts)
    };
    runtime::validate(&cfg, &facts).expect("valid settings");
    let a = grouped_archiver(&clients, &pool, cfg.clone());
    let b = grouped_archiver(&clients, &pool, cfg);
    support::send_bodies(&clients, &facts.queue_url, &twice).await;

    support::wait_for(Duration::from_secs(60), "every message handled", || {
        let n = a.handled_count() + b.handled_count();
        async move { (n >= 2 * EVENTS as u64).then_some(()) }
    })
    .await;
    support::wait_for(Duration::from_secs(30), "the queue empty", || async {
        (support::depth(&clients, &facts.queue_url).await == (0, 0)).then_some(())
    })
    .await;
    let (sa, sb) = (a.counters.snapshot(), b.counters.snapshot());
    let (ga, gb) = (a.group.stats(), b.group.stats());
    a.shutdown().await;
    b.shutdown().await;
    let context = format!("{sa:?} {ga:?}\n{sb:?} {gb:?}");
    eprintln!("{context}");

    assert!(
        sa.received > 0 && sb.received > 0,
        "both consumers took messages: {context}"
    );
    assert_eq!(
        sa.succeeded + sb.succeeded,
        EVENTS as u64,
        "each event applied once: {context}"
    );
    assert!(
        sa.duplicates + sb.duplicates >= EVENTS as u64,
        "every second copy acknowledged as a duplicate: {context}"
    );
    assert_eq!(
        sa.retried + sb.retried + sa.dead_lettered + sb.dead_lettered,
        0,
        "{context}"
    );
    assert!(
        ga.transactions == ga.groups && gb.transactions == gb.groups,
        "a duplicate made a group fall apart into transactions of its own: {context}"
    );
    let want: Vec<(String, i64)> = (0..EVENTS)
        .map(|i| (format!("evt-twice-{i:02}"), 1))
        .collect();
    assert_eq!(
        archived_keys(&pool).await,
        want,
        "one lake record per event"
    );
}
