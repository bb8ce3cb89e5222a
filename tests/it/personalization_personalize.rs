//! Forwarding purchases to Amazon Personalize (PutEvents). moto has no Personalize, so these
//! tests run against a small HTTP fake of the REST-JSON API that checks every request it gets
//! (method, path, content type, signature scope, required fields and their types, limits) and
//! answers 200 only to a valid one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::support;
use deadpool_postgres::Pool;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use orderfleet::domain::envelope::Envelope;
use orderfleet::handlers::personalization::{Personalization, PersonalizeTracker};
use orderfleet::runtime::{self, Executed};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TRACKING_ID: &str = "11111111-2222-3333-4444-555555555555";

#[derive(Default)]
struct FakePersonalize {
    /// Bodies of the valid requests, in order.
    accepted: Vec<Value>,
    /// Why each invalid request was refused.
    refused: Vec<String>,
    /// Failures to answer valid requests with, first one first: (status, error type).
    fail_next: Vec<(u16, &'static str)>,
}

fn reply(status: u16, body: Value, error_type: Option<&str>) -> Response<Full<Bytes>> {
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-amzn-requestid", uuid::Uuid::new_v4().to_string());
    if let Some(t) = error_type {
        response = response.header("x-amzn-errortype", t);
    }
    response
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

/// Checks one request against the PutEvents API; `Err` says what is wrong.
fn validate(
    method: &str,
    path: &str,
    content_type: &str,
    auth: &str,
    body: &[u8],
) -> Result<Value, String> {
    if method != "POST" || path != "/events" {
        return Err(format!("{method} {path}: PutEvents is POST /events"));
    }
    if content_type != "application/json" {
        return Err(format!("content-type {content_type:?}"));
    }
    // SigV4 for the service's signing name.
    if !(auth.starts_with("AWS4-HMAC-SHA256 ") && auth.contains("/personalize/aws4_request")) {
        return Err(format!("not signed for personalize: {auth:?}"));
    }
    let body: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let top = body.as_object().ok_or("body is not an object")?;
    let allowed = ["trackingId", "userId", "sessionId", "eventList"];
    if let Some(k) = top.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown member {k}"));
    }
    let string = |m: &Map<String, Value>, k: &str, required: bool| -> Result<(), String> {
        match m.get(k) {
            None if !required => Ok(()),
            Some(Value::String(s)) if (1..=256).contains(&s.len()) => Ok(()),
            other => Err(format!(
                "{k} must be a string of 1..=256 characters, got {other:?}"
            )),
        }
    };
    string(top, "trackingId", true)?;
    string(top, "sessionId", true)?;
    string(top, "userId", false)?;
    let events = top
        .get("eventList")
        .and_then(Value::as_array)
        .ok_or("eventList must be a list")?;
    if !(1..=10).contains(&events.len()) {
        return Err(format!(
            "eventList has {} events; 1..=10 allowed",
            events.len()
        ));
    }
    let allowed = [
        "eventId",
        "eventType",
        "eventValue",
        "itemId",
        "properties",
        "sentAt",
        "recommendationId",
        "impression",
        "metricAttribution",
    ];
    for event in events {
        let event = event.as_object().ok_or("an event is not an object")?;
        if let Some(k) = event.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!("unknown event member {k}"));
        }
        string(event, "eventType", true)?;
        string(event, "itemId", true)?;
        string(event, "eventId", false)?;
        if !event.get("sentAt").is_some_and(Value::is_number) {
            return Err(format!(
                "sentAt must be epoch seconds, got {:?}",
                event.get("sentAt")
            ));
        }
        if let Some(p) = event.get("properties") {
            let parsed = p
                .as_str()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
                .filter(Value::is_object);
            if parsed.is_none() {
                return Err(format!(
                    "properties must be a JSON object in a string, got {p}"
                ));
            }
        }
    }
    Ok(body)
}

async fn fake_call(
    req: Request<Incoming>,
    state: Arc<Mutex<FakePersonalize>>,
) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (content_type, auth) = (header("content-type"), header("authorization"));
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let body = req.into_body().collect().await.expect("body").to_bytes();
    let mut s = state.lock().unwrap();
    match validate(&method, &path, &content_type, &auth, &body) {
        Err(why) => {
            s.refused.push(why.clone());
            reply(400, json!({"message": why}), Some("InvalidInputException"))
        }
        Ok(_) if !s.fail_next.is_empty() => {
            let (status, error_type) = s.fail_next.remove(0);
            reply(status, json!({"message": "injected"}), Some(error_type))
        }
        Ok(body) => {
            s.accepted.push(body);
            reply(200, json!({}), None)
        }
    }
}

async fn start_fake() -> (Arc<Mutex<FakePersonalize>>, SocketAddr) {
    let state = Arc::new(Mutex::new(FakePersonalize::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
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
                    async move { Ok::<_, std::convert::Infallible>(fake_call(req, state).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (state, addr)
}

/// The handler, forwarding to the fake (the SDK's own retries off: one call, one request).
async fn handler(addr: SocketAddr) -> Personalization {
    let sdk = orderfleet::infra::aws::sdk_config().await;
    let config = aws_sdk_personalizeevents::config::Builder::from(&sdk)
        .endpoint_url(format!("http://{addr}"))
        .retry_config(aws_sdk_personalizeevents::config::retry::RetryConfig::disabled())
        .build();
    Personalization::new(Some(PersonalizeTracker {
        client: aws_sdk_personalizeevents::Client::from_conf(config),
        tracking_id: TRACKING_ID.into(),
    }))
}

fn completed(order_id: &str, customer_id: &str, lines: &[(String, i64)], time: &str) -> Envelope {
    let lines: Vec<_> = lines
        .iter()
        .map(|(sku, quantity)| json!({"sku": sku, "quantity": quantity}))
        .collect();
    let body = json!({
        "version": "0", "id": uuid::Uuid::new_v4().to_string(),
        "detail-type": "OrderCompleted", "source": "orderfleet.orders",
        "account": "123456789012", "time": time, "region": "us-east-1", "resources": [],
        "detail": {
            "version": 1, "event_id": format!("ev-{order_id}"), "order_id": order_id,
            "customer_id": customer_id, "lines": lines,
            "total": {"amount_minor": 1000, "currency": "EUR"},
        },
    });
    Envelope::decode(&body.to_string()).expect("envelope")
}

async fn pairs(pool: &Pool) -> i64 {
    pool.get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM co_purchases", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn completed_orders_reach_personalize_in_the_shape_the_api_requires() {
    let (pool, _) = support::fresh_db().await;
    let (fake, addr) = start_fake().await;
    let handler = handler(addr).await;

    // Twelve distinct SKUs (one of them on two lines) need two calls of at most ten events.
    let mut lines: Vec<(String, i64)> = (1..=12).map(|i| (format!("SKU-{i:02}"), 1)).collect();
    lines.push(("SKU-03".into(), 2));
    let big = completed("ord-1", "cus-7", &lines, "2026-01-02T03:04:05Z");
    let small = completed(
        "ord-2",
        "cus-8",
        &[("SKU-01".into(), 1), ("SKU-02".into(), 4)],
        "2026-01-03T00:00:00Z",
    );
    for event in [&big, &small] {
        let done = runtime::execute(&handler, &pool, event, 1).await.unwrap();
        assert_eq!(done, Executed::Applied { emitted: 0 });
    }
    // A redelivery sends nothing more.
    assert_eq!(
        runtime::execute(&handler, &pool, &big, 2).await.unwrap(),
        Executed::Duplicate
    );

    let event = |order: &str, sku: &str, quantity: i64, sent_at: i64| {
        json!({
            "eventId": format!("{order}:{sku}"),
            "eventType": "purchase",
            "itemId": sku,
            "sentAt": sent_at,
            "properties": json!({"quantity": quantity}).to_string(),
        })
    };
    let big_at = 1_767_323_045; // 2026-01-02T03:04:05Z
    let small_at = 1_767_398_400; // 2026-01-03T00:00:00Z
    let big_events: Vec<Value> = (1..=12)
        .map(|i| {
            let sku = format!("SKU-{i:02}");
            event("ord-1", &sku, if i == 3 { 3 } else { 1 }, big_at)
        })
        .collect();
    let request = |customer: &str, order: &str, events: &[Value]| json!({"trackingId": TRACKING_ID, "userId": customer, "sessionId": order, "eventList": events});
    let want = vec![
        request("cus-7", "ord-1", &big_events[..10]),
        request("cus-7", "ord-1", &big_events[10..]),
        request(
            "cus-8",
            "ord-2",
            &[
                event("ord-2", "SKU-01", 1, small_at),
                event("ord-2", "SKU-02", 4, small_at),
            ],
        ),
    ];
    let fake = fake.lock().unwrap();
    assert!(fake.refused.is_empty(), "{:?}", fake.refused);
    assert_eq!(fake.accepted, want);
}

/// Sends one raw HTTP request to the fake; returns the status code.
async fn raw(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &Value) -> u16 {
    let body = body.to_string();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {content_type}\r\n\
         authorization: AWS4-HMAC-SHA256 Credential=testing/20260102/us-east-1/personalize/aws4_request, SignedHeaders=host, Signature=0\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_personalize_fake_refuses_requests_that_break_the_api() {
    let (fake, addr) = start_fake().await;
    let ok_event = json!({"eventType": "purchase", "itemId": "SKU-1", "sentAt": 1_767_323_045});
    let valid = json!({"trackingId": "t", "sessionId": "s", "eventList": [ok_event]});
    assert_eq!(
        raw(addr, "POST", "/events", "application/json", &valid).await,
        200
    );

    let mut cases: Vec<(&str, &str, &str, Value)> = vec![
        ("GET", "/events", "application/json", valid.clone()),
        ("POST", "/event", "application/json", valid.clone()),
        (
            "POST",
            "/events",
            "application/x-amz-json-1.1",
            valid.clone(),
        ),
    ];
    let mut broken = |f: &dyn Fn(&mut Value)| {
        let mut v = valid.clone();
        f(&mut v);
        cases.push(("POST", "/events", "application/json", v));
    };
    broken(&|v| {
        v.as_object_mut().unwrap().remove("sessionId");
    });
    broken(&|v| {
        v.as_object_mut().unwrap().remove("trackingId");
    });
    broken(&|v| v["eventList"] = json!([]));
    broken(&|v| {
        v["eventList"] = json!(vec![
            json!({"eventType": "purchase", "itemId": "x", "sentAt": 1});
            11
        ])
    });
    broken(&|v| v["eventList"][0]["sentAt"] = json!("2026-01-02T03:04:05Z"));
    broken(&|v| {
        v["eventList"][0]
            .as_object_mut()
            .unwrap()
            .remove("eventType");
    });
    broken(&|v| {
        v["eventList"][0].as_object_mut().unwrap().remove("itemId");
    });
    broken(&|v| v["eventList"][0]["properties"] = json!({"quantity": 1}));
    broken(&|v| v["eventlist"] = json!([]));
    for (method, path, content_type, body) in &cases {
        assert_eq!(
            raw(addr, method, path, content_type, body).await,
            400,
            "{method} {path} {content_type} {body}"
        );
    }
    let fake = fake.lock().unwrap();
    assert_eq!(fake.accepted.len(), 1);
    assert_eq!(fake.refused.len(), cases.len());
}

#[tokio::test]
async fn personalize_throttling_and_server_errors_are_retried_and_invalid_input_is_permanent() {
    let (pool, _) = support::fresh_db().await;
    let (fake, addr) = start_fake().await;
    let handler = handler(addr).await;
    let order = completed(
        "ord-9",
        "cus-9",
        &[("SKU-A".into(), 1), ("SKU-B".into(), 1)],
        "2026-01-02T03:04:05Z",
    );

    for (status, error_type, kind) in [
        (400, "ThrottlingException", "retry"),
        (429, "TooManyRequestsException", "retry"),
        (500, "InternalFailure", "retry"),
        (503, "ServiceUnavailable", "retry"),
        (400, "InvalidInputException", "permanent"),
        (404, "ResourceNotFoundException", "permanent"),
    ] {
        fake.lock().unwrap().fail_next.push((status, error_type));
        let err = runtime::execute(&handler, &pool, &order, 1)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), kind, "{status} {error_type}: {err}");
        // The transaction rolled back: the order is not counted, so a retry counts it.
        assert_eq!(pairs(&pool).await, 0, "{error_type}");
    }
    assert_eq!(
        runtime::execute(&handler, &pool, &order, 2).await.unwrap(),
        Executed::Applied { emitted: 0 }
    );
    assert_eq!(pairs(&pool).await, 2);
    let fake = fake.lock().unwrap();
    assert!(fake.refused.is_empty(), "{:?}", fake.refused);
    assert_eq!(fake.accepted.len(), 1);
}
