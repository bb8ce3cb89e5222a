//! The native move-task path of `dlq redrive` and `dlq cancel`, against a small fake of SQS's
//! StartMessageMoveTask / ListMessageMoveTasks / CancelMessageMoveTask (moto has none of them).
//!
//! The fake speaks AWS JSON 1.0 (`X-Amz-Target: AmazonSQS.<Op>`), checks every request the way
//! SQS documents it (a signed request; SourceArn present and naming a known DLQ; a
//! DestinationArn, when given, naming a known queue; MaxNumberOfMessagesPerSecond within
//! 1..=500; no unknown fields; one running task per source), answers in SQS's shapes, and
//! serves just enough GetQueueUrl/GetQueueAttributes for the CLI to resolve queue names.
//! Each ListMessageMoveTasks advances a running task by a few messages until it completes.

// The fake's request handlers answer with a Response either way (an SQS error is a response).
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use orderfleet::operator::native::{self, Native};
use serde_json::{json, Value};

const ACCOUNT: &str = "000000000000";

#[derive(Debug, Clone)]
struct Task {
    handle: String,
    source: String,
    destination: Option<String>,
    rate: Option<i64>,
    status: String,
    moved: i64,
    to_move: i64,
    started: i64,
}

#[derive(Default)]
struct State {
    /// Queue name -> visible messages.
    queues: HashMap<String, i64>,
    tasks: Vec<Task>,
    /// Every request: (operation, body).
    seen: Vec<(String, Value)>,
}

#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<State>>,
    endpoint: String,
}

fn arn(name: &str) -> String {
    format!("arn:aws:sqs:us-east-1:{ACCOUNT}:{name}")
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.0")
        .header(
            "x-amzn-query-error",
            format!("AWS.SimpleQueueService.{code};Sender"),
        )
        .body(Full::new(Bytes::from(
            json!({"__type": format!("com.amazonaws.sqs#{code}"), "message": message}).to_string(),
        )))
        .unwrap()
}

fn ok(body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-amz-json-1.0")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Refuses fields the operation does not have.
fn only(body: &Value, allowed: &[&str]) -> Result<(), String> {
    let obj = body.as_object().ok_or("the body is not a JSON object")?;
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("unexpected field {k}")),
        None => Ok(()),
    }
}

impl Fake {
    async fn start(queues: &[(&str, i64)]) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let mut state = State::default();
        for (name, n) in queues {
            state.queues.insert(name.to_string(), *n);
        }
        let fake = Fake {
            state: Arc::new(Mutex::new(state)),
            endpoint,
        };
        let serving = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let f = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let f = f.clone();
                        async move { Ok::<_, Infallible>(f.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        fake
    }

    fn seen(&self, op: &str) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.seen
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, b)| b.clone())
            .collect()
    }

    fn tasks(&self) -> Vec<Task> {
        self.state.lock().unwrap().tasks.clone()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let target = req
            .headers()
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let json_type = req
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/x-amz-json-1.0"));
        let signed = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v.as_bytes().starts_with(b"AWS4-HMAC-SHA256 Credential="));
        if req.method() != hyper::Method::POST || req.uri().path() != "/" || !json_type {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidAction",
                "expected an AWS JSON 1.0 POST to /",
            );
        }
        if !signed {
            return error(
                StatusCode::FORBIDDEN,
                "InvalidSecurity",
                "the request is not signed",
            );
        }
        let Some(op) = target.strip_prefix("AmazonSQS.").map(str::to_string) else {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidAction",
                "unknown X-Amz-Target",
            );
        };
        let bytes = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterValue",
                    "unreadable body",
                )
            }
        };
        let Ok(body) = serde_json::from_slice::<Value>(&bytes) else {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValue",
                "the body is not JSON",
            );
        };
        let mut s = self.state.lock().unwrap();
        s.seen.push((op.clone(), body.clone()));
        let result = match op.as_str() {
            "GetQueueUrl" => self.get_queue_url(&s, &body),
            "GetQueueAttributes" => self.get_queue_attributes(&s, &body),
            "StartMessageMoveTask" => start_task(&mut s, &body),
            "ListMessageMoveTasks" => list_tasks(&mut s, &body),
            "CancelMessageMoveTask" => cancel_task(&mut s, &body),
            other => Err(error(
                StatusCode::BAD_REQUEST,
                "InvalidAction",
                &format!("the fake does not serve {other}"),
            )),
        };
        result.unwrap_or_else(|e| e)
    }

    fn get_queue_url(
        &self,
        s: &State,
        body: &Value,
    ) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
        only(body, &["QueueName", "QueueOwnerAWSAccountId"])
            .map_err(|e| error(StatusCode::BAD_REQUEST, "InvalidParameterValue", &e))?;
        let name = body["QueueName"].as_str().unwrap_or_default();
        if !s.queues.contains_key(name) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "QueueDoesNotExist",
                "The specified queue does not exist.",
            ));
        }
        Ok(ok(
            json!({"QueueUrl": format!("{}/{ACCOUNT}/{name}", self.endpoint)}),
        ))
    }

    fn get_queue_attributes(
        &self,
        s: &State,
        body: &Value,
    ) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
        only(body, &["QueueUrl", "AttributeNames"])
            .map_err(|e| error(StatusCode::BAD_REQUEST, "InvalidParameterValue", &e))?;
        let url = body["QueueUrl"].as_str().unwrap_or_default();
        let name = url.rsplit('/').next().unwrap_or_default();
        let Some(n) = s.queues.get(name) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "QueueDoesNotExist",
                "The specified queue does not exist.",
            ));
        };
        Ok(ok(json!({"Attributes": {
            "QueueArn": arn(name),
            "ApproximateNumberOfMessages": n.to_string(),
            "ApproximateNumberOfMessagesNotVisible": "0",
            "ApproximateNumberOfMessagesDelayed": "0",
        }})))
    }
}

fn bad(msg: &str) -> Response<Full<Bytes>> {
    error(StatusCode::BAD_REQUEST, "InvalidParameterValue", msg)
}

fn known_arn(s: &State, v: &Value) -> Option<String> {
    let a = v.as_str()?;
    let name = a.strip_prefix(&format!("arn:aws:sqs:us-east-1:{ACCOUNT}:"))?;
    s.queues.contains_key(name).then(|| name.to_string())
}

fn start_task(s: &mut State, body: &Value) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
    only(
        body,
        &[
            "SourceArn",
            "DestinationArn",
            "MaxNumberOfMessagesPerSecond",
        ],
    )
    .map_err(|e| bad(&e))?;
    if body.get("SourceArn").is_none() {
        return Err(bad("SourceArn is required"));
    }
    let source = known_arn(s, &body["SourceArn"]).ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "ResourceNotFoundException",
            "The source queue does not exist",
        )
    })?;
    if !source.ends_with("-dlq") {
        return Err(bad("the source must be a dead-letter queue"));
    }
    let destination = match body.get("DestinationArn") {
        None => None,
        Some(v) => Some(known_arn(s, v).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "ResourceNotFoundException",
                "The destination queue does not exist",
            )
        })?),
    };
    let rate = match body.get("MaxNumberOfMessagesPerSecond") {
        None => None,
        Some(v) => match v.as_i64() {
            Some(r) if (1..=500).contains(&r) => Some(r),
            _ => {
                return Err(bad(
                    "MaxNumberOfMessagesPerSecond must be an integer from 1 to 500",
                ))
            }
        },
    };
    if s.tasks
        .iter()
        .any(|t| t.source == source && t.status == "RUNNING")
    {
        return Err(bad("There is already a task running. Only one active task is allowed for a source queue arn at a given time."));
    }
    let handle = format!("handle-{}", s.tasks.len() + 1);
    let to_move = s.queues[&source];
    s.tasks.push(Task {
        handle: handle.clone(),
        source,
        destination,
        rate,
        status: "RUNNING".into(),
        moved: 0,
        to_move,
        started: chrono::Utc::now().timestamp_millis(),
    });
    Ok(ok(json!({"TaskHandle": handle})))
}

fn list_tasks(s: &mut State, body: &Value) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
    only(body, &["SourceArn", "MaxResults"]).map_err(|e| bad(&e))?;
    let source = known_arn(s, &body["SourceArn"]).ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "ResourceNotFoundException",
            "The source queue does not exist",
        )
    })?;
    if let Some(m) = body.get("MaxResults") {
        if !m.as_i64().is_some_and(|m| (1..=10).contains(&m)) {
            return Err(bad("MaxResults must be from 1 to 10"));
        }
    }
    // Progress: each poll moves three messages of a running task.
    for t in s
        .tasks
        .iter_mut()
        .filter(|t| t.source == source && t.status == "RUNNING")
    {
        t.moved = (t.moved + 3).min(t.to_move);
        if t.moved == t.to_move {
            t.status = "COMPLETED".into();
        }
    }
    let results: Vec<Value> = s
        .tasks
        .iter()
        .rev()
        .filter(|t| t.source == source)
        .map(|t| {
            let mut v = json!({
                "Status": t.status,
                "SourceArn": arn(&t.source),
                "ApproximateNumberOfMessagesMoved": t.moved,
                "ApproximateNumberOfMessagesToMove": t.to_move,
                "StartedTimestamp": t.started,
            });
            if t.status == "RUNNING" {
                v["TaskHandle"] = json!(t.handle);
            }
            if let Some(d) = &t.destination {
                v["DestinationArn"] = json!(arn(d));
            }
            if let Some(r) = t.rate {
                v["MaxNumberOfMessagesPerSecond"] = json!(r);
            }
            v
        })
        .collect();
    Ok(ok(json!({"Results": results})))
}

fn cancel_task(
    s: &mut State,
    body: &Value,
) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
    only(body, &["TaskHandle"]).map_err(|e| bad(&e))?;
    let handle = body["TaskHandle"]
        .as_str()
        .ok_or_else(|| bad("TaskHandle is required"))?;
    let t = s
        .tasks
        .iter_mut()
        .find(|t| t.handle == handle && t.status == "RUNNING")
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "ResourceNotFoundException",
                "No running task with that handle",
            )
        })?;
    t.status = "CANCELLED".into();
    Ok(ok(json!({"ApproximateNumberOfMessagesMoved": t.moved})))
}

/// Runs the CLI on a blocking thread, so the fake (on this test's runtime) keeps serving.
async fn cli(endpoint: &str, args: &[&str]) -> Output {
    let endpoint = endpoint.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || run_cli(&endpoint, &args))
        .await
        .unwrap()
}

fn run_cli(endpoint: &str, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(args)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn fleet_queues() -> Vec<(&'static str, i64)> {
    vec![("p-inventory", 0), ("p-inventory-dlq", 7), ("p-orders", 0)]
}

async fn sdk(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

#[tokio::test]
async fn a_redrive_without_filters_starts_a_native_move_task_and_wait_follows_it_to_the_end() {
    let fake = Fake::start(&fleet_queues()).await;
    let out = cli(
        &fake.endpoint,
        &[
            "dlq",
            "redrive",
            "inventory",
            "--prefix",
            "p",
            "--yes",
            "--wait",
            "--rate",
            "50",
            "--poll-ms",
            "20",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("started native move task from p-inventory-dlq to p-inventory at 50/s"),
        "{stderr}"
    );
    assert!(
        stderr.contains("audit: native move task handle-1 COMPLETED: moved 7 of 7 from p-inventory-dlq to p-inventory"),
        "{stderr}"
    );
    let starts = fake.seen("StartMessageMoveTask");
    assert_eq!(
        starts,
        vec![json!({
            "SourceArn": arn("p-inventory-dlq"),
            "DestinationArn": arn("p-inventory"),
            "MaxNumberOfMessagesPerSecond": 50,
        })]
    );
    assert!(
        fake.seen("ReceiveMessage").is_empty(),
        "the native path read messages itself"
    );
    assert_eq!(fake.tasks()[0].status, "COMPLETED");
}

#[tokio::test]
async fn a_running_task_is_not_started_twice_and_dlq_cancel_stops_it() {
    let fake = Fake::start(&fleet_queues()).await;
    let sqs = sdk(&fake.endpoint).await;
    let Native::Supported(handle) = native::start(
        &sqs,
        &arn("p-inventory-dlq"),
        Some(&arn("p-inventory")),
        None,
    )
    .await
    .unwrap() else {
        panic!("the fake supports move tasks")
    };

    let out = cli(
        &fake.endpoint,
        &["dlq", "redrive", "inventory", "--prefix", "p", "--yes"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("already running") && stderr.contains("orderfleet dlq cancel inventory"),
        "{stderr}"
    );
    assert_eq!(fake.seen("StartMessageMoveTask").len(), 1);

    let out = cli(
        &fake.endpoint,
        &["dlq", "cancel", "inventory", "--prefix", "p"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "audit: cancelled move task {handle} out of p-inventory-dlq"
        )),
        "{stderr}"
    );
    assert_eq!(
        fake.seen("CancelMessageMoveTask"),
        vec![json!({"TaskHandle": handle})]
    );
    assert_eq!(fake.tasks()[0].status, "CANCELLED");

    let out = cli(
        &fake.endpoint,
        &["dlq", "cancel", "inventory", "--prefix", "p"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no move task is running"));
}

#[tokio::test]
async fn real_move_task_errors_are_reported_not_mistaken_for_a_missing_api() {
    let fake = Fake::start(&fleet_queues()).await;
    let sqs = sdk(&fake.endpoint).await;
    // Not a DLQ, unknown queue, rate out of range: each is an error, never "unsupported".
    for (source, rate, says) in [
        (arn("p-orders"), None, "dead-letter queue"),
        (arn("nope-dlq"), None, "ResourceNotFoundException"),
        (arn("p-inventory-dlq"), Some(0), "1 to 500"),
        (arn("p-inventory-dlq"), Some(501), "1 to 500"),
    ] {
        let err = native::start(&sqs, &source, None, rate).await.unwrap_err();
        assert!(
            format!("{err:#}").contains(says),
            "{source} {rate:?}: {err:#}"
        );
    }
    assert!(fake.tasks().is_empty());
    // The fake itself refuses what SQS would: an unsigned or non-JSON request.
    let client = tokio::net::TcpStream::connect(fake.endpoint.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(client))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::post("/")
                .header("content-type", "application/x-amz-json-1.0")
                .header("x-amz-target", "AmazonSQS.StartMessageMoveTask")
                .body(Full::new(Bytes::from(
                    json!({"SourceArn": arn("p-inventory-dlq")}).to_string(),
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}
