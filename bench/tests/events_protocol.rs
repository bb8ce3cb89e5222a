//! Drives the benchmark endpoint's EventBridge (`orderfleet_bench::events`) with the fleet's own
//! SDK clients: the real `orderfleet provision`, then events put through the SDK and read back
//! from the queues the rules deliver to.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_eventbridge::config::{
    BehaviorVersion, Credentials, Region, SharedCredentialsProvider,
};
use aws_sdk_eventbridge::error::ProvideErrorMetadata;
use aws_sdk_eventbridge::types::{PutEventsRequestEntry, RuleState, Target};
use orderfleet::domain::catalogue::EVENTS;
use orderfleet::domain::names::HandlerName;
use orderfleet::infra::aws::Clients;
use orderfleet::infra::provision::provision;
use orderfleet::infra::topology::Topology;
use orderfleet_bench::sqs::{spawn_local, BenchSqs};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound for any single step; generous for a loaded CI machine.
const STEP: Duration = Duration::from_secs(15);
const PARTNER: &str = "aws.partner/shopify.com/1/orderfleet";
const SES_SET: &str = "fleet-set";

struct Endpoint {
    clients: Clients,
    state: BenchSqs,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn start() -> Endpoint {
    let (addr, state, server) = spawn_local(0).await.expect("bench endpoint starts");
    let config = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(format!("http://{addr}"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "test", "test", None, None, "test",
        )))
        .build();
    Endpoint {
        clients: Clients::new(&config),
        state,
        addr,
        server,
    }
}

/// Awaits `future`, failing the test if it takes longer than [`STEP`].
async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .expect("step finished in time")
}

fn topology() -> Topology {
    Topology {
        lake: false,
        partner_sources: vec![PARTNER.into()],
        ses_configuration_set: Some(SES_SET.into()),
        ..Topology::with_prefix("bench")
    }
}

fn entry(
    bus: Option<&str>,
    source: &str,
    detail_type: &str,
    detail: &Value,
) -> PutEventsRequestEntry {
    PutEventsRequestEntry::builder()
        .set_event_bus_name(bus.map(str::to_owned))
        .source(source)
        .detail_type(detail_type)
        .detail(detail.to_string())
        .build()
}

/// Puts `entries` in batches of ten, failing the test on any failed entry.
async fn put_all(clients: &Clients, entries: Vec<PutEventsRequestEntry>) {
    for batch in entries.chunks(10) {
        let out = within(
            clients
                .events
                .put_events()
                .set_entries(Some(batch.to_vec()))
                .send(),
        )
        .await
        .expect("put events");
        assert_eq!(out.failed_entry_count(), 0, "{:?}", out.entries());
    }
}

/// Every message now in `queue`, as JSON, received (and left in flight).
async fn drain(clients: &Clients, queue: &str) -> Vec<Value> {
    let url = within(clients.sqs.get_queue_url().queue_name(queue).send())
        .await
        .expect("queue exists")
        .queue_url()
        .expect("queue url")
        .to_owned();
    let mut bodies = Vec::new();
    loop {
        let out = within(
            clients
                .sqs
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10)
                .wait_time_seconds(0)
                .send(),
        )
        .await
        .expect("receive");
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            return bodies;
        }
        for message in messages {
            let body = message.body().expect("a body");
            bodies.push(serde_json::from_str(body).expect("a JSON body"));
        }
    }
}

fn detail_types(bodies: &[Value]) -> Vec<String> {
    let mut types: Vec<String> = bodies
        .iter()
        .map(|b| b["detail-type"].as_str().expect("detail-type").to_owned())
        .collect();
    types.sort();
    types
}

/// Calls a non-AWS `OrderfleetBench.*` target with a plain HTTP/1.1 request.
async fn bench_call(addr: SocketAddr, target: &str) -> Value {
    let mut stream = within(tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let request = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nX-Amz-Target: {target}\r\n\
         Content-Type: application/x-amz-json-1.0\r\nContent-Length: 2\r\n\
         Connection: close\r\n\r\n{{}}"
    );
    within(stream.write_all(request.as_bytes()))
        .await
        .expect("write");
    let mut response = Vec::new();
    within(stream.read_to_end(&mut response))
        .await
        .expect("read");
    let text = String::from_utf8(response).expect("utf-8 response");
    let (_, body) = text.split_once("\r\n\r\n").expect("headers end");
    serde_json::from_str(body).expect("JSON body")
}

#[tokio::test]
async fn provision_is_idempotent_and_every_event_reaches_exactly_its_consumers() {
    let endpoint = start().await;
    let clients = &endpoint.clients;
    let topo = topology();

    let first = within(provision(clients, &topo)).await.expect("provision");
    assert!(
        first
            .iter()
            .any(|c| c.resource == format!("partner event bus {PARTNER}")),
        "{first:?}"
    );
    let second = within(provision(clients, &topo))
        .await
        .expect("provision again");
    assert_eq!(second, vec![], "a second run changes nothing");
    endpoint.state.reset_stats();

    // One event of every catalogue detail-type, on the fleet's bus.
    let entries = EVENTS
        .iter()
        .enumerate()
        .map(|(n, spec)| {
            entry(
                Some(&topo.bus_name),
                &spec.source(),
                spec.detail_type,
                &json!({"n": n, "order_id": format!("o-{n}")}),
            )
        })
        .collect();
    put_all(clients, entries).await;
    // Nobody consumes this one.
    put_all(
        clients,
        vec![entry(
            Some(&topo.bus_name),
            "orderfleet.storefront",
            "NobodyListens",
            &json!({}),
        )],
    )
    .await;
    // The platform's own event, on its partner bus; an SES bounce on the default bus.
    put_all(
        clients,
        vec![
            entry(
                Some(PARTNER),
                PARTNER,
                "shopifyWebhook",
                &json!({"metadata": {}}),
            ),
            entry(
                None,
                "aws.ses",
                "Email Bounced",
                &json!({"mail": {"tags": {"ses:configuration-set": [SES_SET]}}}),
            ),
        ],
    )
    .await;

    let mut expected_deliveries = 0;
    let mut by_handler: BTreeMap<HandlerName, Vec<Value>> = BTreeMap::new();
    for handler in HandlerName::ALL {
        let bodies = drain(clients, &topo.queue_name(handler)).await;
        let mut expected: Vec<String> = EVENTS
            .iter()
            .filter(|spec| spec.consumers.contains(&handler))
            .map(|spec| spec.detail_type.to_owned())
            .collect();
        match handler {
            HandlerName::Storefront => expected.push("shopifyWebhook".into()),
            HandlerName::Notifications => expected.push("Email Bounced".into()),
            _ => {}
        }
        expected.sort();
        expected_deliveries += expected.len();
        assert_eq!(detail_types(&bodies), expected, "{handler:?}");
        assert!(
            drain(clients, &topo.dlq_name(handler)).await.is_empty(),
            "{handler:?}'s DLQ"
        );
        by_handler.insert(handler, bodies);
    }

    // The envelope as EventBridge delivers it.
    let placed = by_handler[&HandlerName::Orders]
        .iter()
        .find(|b| b["detail-type"] == "OrderPlaced")
        .expect("orders got OrderPlaced");
    let n = EVENTS
        .iter()
        .position(|s| s.detail_type == "OrderPlaced")
        .expect("OrderPlaced is catalogued");
    assert_eq!(placed["version"], "0");
    assert_eq!(placed["source"], "orderfleet.storefront");
    assert_eq!(placed["account"], "000000000000");
    assert_eq!(placed["region"], "us-east-1");
    assert_eq!(placed["resources"], json!([]));
    assert_eq!(
        placed["detail"],
        json!({"n": n, "order_id": format!("o-{n}")})
    );
    assert!(placed["id"].as_str().is_some_and(|id| id.len() == 36));
    let time = placed["time"].as_str().expect("time");
    assert!(
        time.len() == 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{time}"
    );
    let keys: Vec<&str> = placed
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 9, "{keys:?}");

    let stats = endpoint.state.event_stats();
    assert_eq!(stats.put_events_entries, EVENTS.len() as u64 + 3);
    assert_eq!(stats.matched_deliveries, expected_deliveries as u64);
    assert_eq!(stats.unmatched_events, 1);
    assert_eq!(stats.failed_deliveries, 0);
    let over_http = bench_call(endpoint.addr, "OrderfleetBench.Stats").await;
    assert_eq!(
        over_http["events"]["matched_deliveries"],
        expected_deliveries
    );
    assert_eq!(over_http["events"]["unmatched_events"], 1);
    assert!(over_http["events"]["requests"]["PutEvents"].as_u64() >= Some(4));
}

#[tokio::test]
async fn put_events_takes_one_to_ten_entries_within_256_kib_and_fails_bad_entries_alone() {
    let endpoint = start().await;
    let events = &endpoint.clients.events;
    let ok = entry(None, "test", "Test", &json!({"a": 1}));

    let eleven = within(
        events
            .put_events()
            .set_entries(Some(vec![ok.clone(); 11]))
            .send(),
    )
    .await
    .expect_err("11 entries are refused");
    assert_eq!(eleven.code(), Some("ValidationException"), "{eleven:?}");
    let none = within(events.put_events().set_entries(Some(vec![])).send())
        .await
        .expect_err("no entry is refused");
    assert_eq!(none.code(), Some("ValidationException"));

    // As AWS: the entries' total size over 256 KiB fails the request.
    let big = entry(
        None,
        "test",
        "Test",
        &json!({"blob": "x".repeat(256 * 1024)}),
    );
    let oversize = within(events.put_events().entries(big).send())
        .await
        .expect_err("an oversize entry is refused");
    assert_eq!(oversize.code(), Some("ValidationException"));
    assert!(
        oversize
            .message()
            .unwrap_or_default()
            .contains("over the limit"),
        "{oversize:?}"
    );

    let malformed = PutEventsRequestEntry::builder()
        .source("test")
        .detail_type("Test")
        .detail("[1, 2]")
        .build();
    let missing = PutEventsRequestEntry::builder()
        .source("test")
        .detail_type("Test")
        .build();
    let out = within(
        events
            .put_events()
            .entries(ok)
            .entries(malformed)
            .entries(missing)
            .send(),
    )
    .await
    .expect("put events");
    assert_eq!(out.failed_entry_count(), 2);
    let results = out.entries();
    assert!(results[0].event_id().is_some());
    assert_eq!(results[1].error_code(), Some("MalformedDetail"));
    assert!(results[1].event_id().is_none());
    assert_eq!(results[2].error_code(), Some("InvalidArgument"));
    let stats = endpoint.state.event_stats();
    assert_eq!(stats.put_events_entries, 3);
    assert_eq!(stats.unmatched_events, 1);
}

#[tokio::test]
async fn rules_and_targets_are_refused_rather_than_served_wrongly() {
    let endpoint = start().await;
    let events = &endpoint.clients.events;

    let err = within(
        events
            .put_rule()
            .name("r")
            .event_pattern(r#"{"detail": {"ip": [{"cidr": "10.0.0.0/8"}]}}"#)
            .send(),
    )
    .await
    .expect_err("an unsupported pattern is refused");
    assert!(
        err.as_service_error()
            .is_some_and(|e| e.is_invalid_event_pattern_exception()),
        "{err:?}"
    );

    let err = within(events.describe_event_bus().name("nope").send())
        .await
        .expect_err("no such bus");
    assert!(err
        .as_service_error()
        .is_some_and(|e| e.is_resource_not_found_exception()));
    let err = within(events.describe_rule().name("nope").send())
        .await
        .expect_err("no such rule");
    assert!(err
        .as_service_error()
        .is_some_and(|e| e.is_resource_not_found_exception()));

    let rule_arn = within(
        events
            .put_rule()
            .name("r")
            .event_pattern(r#"{"source": ["test"]}"#)
            .state(RuleState::Enabled)
            .send(),
    )
    .await
    .expect("put rule")
    .rule_arn()
    .map(str::to_owned);
    assert_eq!(
        rule_arn.as_deref(),
        Some("arn:aws:events:us-east-1:000000000000:rule/r")
    );
    let target = |id: &str, queue: &str| {
        Target::builder()
            .id(id)
            .arn(format!("arn:aws:sqs:us-east-1:000000000000:{queue}"))
    };
    let out = within(
        events
            .put_targets()
            .rule("r")
            .targets(
                target("shaped", "q")
                    .input_path("$.detail")
                    .build()
                    .expect("target"),
            )
            .targets(target("gone", "missing-queue").build().expect("target"))
            .send(),
    )
    .await
    .expect("put targets");
    assert_eq!(out.failed_entry_count(), 1);
    assert_eq!(out.failed_entries()[0].target_id(), Some("shaped"));
    let listed = within(events.list_targets_by_rule().rule("r").send())
        .await
        .expect("list targets");
    let ids: Vec<&str> = listed.targets().iter().map(|t| t.id()).collect();
    assert_eq!(ids, ["gone"]);

    // A delivery to a queue that does not exist is a failed invocation, counted.
    let out = within(
        events
            .put_events()
            .entries(entry(None, "test", "Test", &json!({})))
            .send(),
    )
    .await
    .expect("put events");
    assert_eq!(out.failed_entry_count(), 0);
    let stats = endpoint.state.event_stats();
    assert_eq!(stats.failed_deliveries, 1);
    assert_eq!(stats.matched_deliveries, 0);

    // A rule with targets cannot be deleted; without, it can.
    let err = within(events.delete_rule().name("r").send())
        .await
        .expect_err("targets first");
    assert_eq!(err.code(), Some("ValidationException"));
    within(events.remove_targets().rule("r").ids("gone").send())
        .await
        .expect("remove targets");
    within(events.delete_rule().name("r").send())
        .await
        .expect("delete rule");
    let rules = within(events.list_rules().send())
        .await
        .expect("list rules");
    assert!(rules.rules().is_empty());
}

#[tokio::test]
async fn a_put_events_delay_holds_each_put_events_call_and_no_other_call() {
    let endpoint = start().await;
    let topo = topology();
    within(provision(&endpoint.clients, &topo))
        .await
        .expect("provision");
    endpoint
        .state
        .set_put_events_delay(Duration::from_millis(1_000));
    let queue = topo.queue_name(HandlerName::Inventory);
    let placed = json!({"event_id": "e-1", "order_id": "o-1"});

    let started = std::time::Instant::now();
    put_all(
        &endpoint.clients,
        vec![entry(
            Some(&topo.bus_name),
            "orderfleet.orders",
            "OrderAccepted",
            &placed,
        )],
    )
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1_000),
        "PutEvents answered after {took:?}"
    );
    assert_eq!(drain(&endpoint.clients, &queue).await.len(), 1, "delivered");
    // Other calls are not held.
    let started = std::time::Instant::now();
    within(
        endpoint
            .clients
            .events
            .list_rules()
            .event_bus_name(&topo.bus_name)
            .send(),
    )
    .await
    .expect("list rules");
    assert!(started.elapsed() < Duration::from_millis(1_000));
}
