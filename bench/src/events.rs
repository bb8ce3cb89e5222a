//! The benchmark endpoint's EventBridge: buses, rules and SQS targets kept in memory, served on
//! the same listener as [`crate::sqs`] over AWS JSON 1.1 (`POST /`,
//! `X-Amz-Target: AWSEvents.<Operation>`, `Content-Type: application/x-amz-json-1.1`).
//!
//! It exists so that a fleet benchmark can run real workers and `orderfleet provision` against
//! one fast in-memory endpoint (`AWS_ENDPOINT_URL_SQS` and `AWS_ENDPOINT_URL_EVENTBRIDGE` both
//! pointing at it): events a worker publishes are matched against the rules as EventBridge
//! matches them and land, in the EventBridge envelope, in the queues of the matching rules'
//! targets, straight in the SQS state (no HTTP hop).
//!
//! Operations: `CreateEventBus` (custom buses, and partner buses named as their
//! `aws.partner/...` event source), `DescribeEventBus`, `ListEventBuses`, `DeleteEventBus`,
//! `PutRule`, `DescribeRule`, `ListRules`, `DeleteRule`, `PutTargets`, `ListTargetsByRule`,
//! `RemoveTargets`, `PutEvents`. The bus `default` always exists. ARNs are shaped as AWS
//! shapes them, in the SQS endpoint's account and region. Errors are the JSON 1.1 shape the
//! SDK reads (`__type` and `message`, HTTP 400).
//!
//! Event patterns are compiled at `PutRule` ([`Pattern`], whose module says which semantics
//! and which sources); a pattern this endpoint cannot match faithfully is refused with
//! `InvalidEventPatternException`, never matched approximately.
//!
//! `PutEvents` follows the API reference: 1 to 10 entries; `Source`, `DetailType` and `Detail`
//! (a JSON object) required per entry, a missing or malformed one failing that entry
//! (`InvalidArgument`, `MalformedDetail`); the entries' size computed as AWS documents it
//! ("Calculating PutEvents event entry size": 14 bytes for `Time`, the UTF-8 lengths of
//! `Source`, `DetailType`, `Detail` and each of `Resources`), and a request whose entries
//! total more than 256 KiB refused whole with `ValidationException` ("Total size of the
//! entries in the request is over the limit.", as AWS answers). Documented deviations:
//! - An entry for a bus that does not exist gets an `EventId` and goes nowhere, as AWS does
//!   (aws/aws-sdk#186, aws/aws-cli#9186); it is counted in `unmatched_events`.
//! - Any `Source` is accepted, `aws.*` and partner sources included, so that a simulator can
//!   stand in for SES or a commerce platform.
//! - Only SQS queue targets are served. `Input`, `InputPath`, `InputTransformer` and every
//!   other target setting (`SqsParameters`, `RetryPolicy`, `DeadLetterConfig`, ...) are
//!   refused in `FailedEntries`. A target queue that does not exist when an event arrives is
//!   a failed invocation (EventBridge would retry, then drop); it is counted, not retried.
//! - No scheduled rules, archives, replays, endpoints, connections or tags.
//!
//! Counters: requests per operation, and `put_events_entries`, `matched_deliveries` (one per
//! event enqueued into a target's queue), `unmatched_events` (accepted events no enabled rule
//! matched), `failed_deliveries`; read through [`crate::sqs::BenchSqs::event_stats`] or the
//! `events` object of the `OrderfleetBench.Stats` answer.
//!
//! Nothing is logged per request. The rules sit behind one `RwLock`: `PutEvents` takes it
//! shared, matches, and releases it before enqueueing.

mod pattern;

pub use pattern::Pattern;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::sqs::{BenchSqs, ACCOUNT_ID, REGION};

const JSON_CONTENT_TYPE: &str = "application/x-amz-json-1.1";
const REQUEST_ID_HEADER: &str = "x-amzn-requestid";
/// The bus every account has.
pub const DEFAULT_BUS: &str = "default";
const MAX_PUT_EVENTS_ENTRIES: usize = 10;
/// PutEvents' limit on the entries of one request (256 KiB).
const MAX_ENTRIES_BYTES: usize = 256 * 1024;
const MAX_TARGETS_PER_RULE: usize = 5;
const MAX_PUT_TARGETS: usize = 10;
const MAX_LIST_LIMIT: usize = 100;
/// What `Time` counts for in an entry's size, per AWS.
const TIME_ENTRY_BYTES: usize = 14;

// ---------------------------------------------------------------------------
// Operations and counters
// ---------------------------------------------------------------------------

/// The operations counted; `Unknown` collects every other `AWSEvents.*` target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    CreateEventBus,
    DescribeEventBus,
    ListEventBuses,
    DeleteEventBus,
    PutRule,
    DescribeRule,
    ListRules,
    DeleteRule,
    PutTargets,
    ListTargetsByRule,
    RemoveTargets,
    PutEvents,
    Unknown,
}

impl Op {
    const COUNT: usize = 13;
    const ALL: [Op; Op::COUNT] = [
        Op::CreateEventBus,
        Op::DescribeEventBus,
        Op::ListEventBuses,
        Op::DeleteEventBus,
        Op::PutRule,
        Op::DescribeRule,
        Op::ListRules,
        Op::DeleteRule,
        Op::PutTargets,
        Op::ListTargetsByRule,
        Op::RemoveTargets,
        Op::PutEvents,
        Op::Unknown,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::CreateEventBus => "CreateEventBus",
            Op::DescribeEventBus => "DescribeEventBus",
            Op::ListEventBuses => "ListEventBuses",
            Op::DeleteEventBus => "DeleteEventBus",
            Op::PutRule => "PutRule",
            Op::DescribeRule => "DescribeRule",
            Op::ListRules => "ListRules",
            Op::DeleteRule => "DeleteRule",
            Op::PutTargets => "PutTargets",
            Op::ListTargetsByRule => "ListTargetsByRule",
            Op::RemoveTargets => "RemoveTargets",
            Op::PutEvents => "PutEvents",
            Op::Unknown => "Unknown",
        }
    }

    fn from_name(name: &str) -> Op {
        Op::ALL
            .iter()
            .copied()
            .find(|op| *op != Op::Unknown && op.name() == name)
            .unwrap_or(Op::Unknown)
    }
}

/// The EventBridge counters, as returned by [`BenchSqs::event_stats`] and in the `events`
/// object of the `OrderfleetBench.Stats` / `.Reset` answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventStats {
    /// Count per operation name (`"PutEvents"`, ...); operations never called are absent.
    pub requests: BTreeMap<String, u64>,
    /// Sum of `requests`.
    pub total: u64,
    /// Entries received by `PutEvents`, failed ones included.
    pub put_events_entries: u64,
    /// Events enqueued into a target's queue (one per event and target).
    pub matched_deliveries: u64,
    /// Accepted events that no enabled rule of their bus matched (or whose bus does not exist).
    pub unmatched_events: u64,
    /// Deliveries to a target queue that did not exist.
    pub failed_deliveries: u64,
}

impl EventStats {
    /// The count for one operation name, 0 when it was never called.
    pub fn get(&self, operation: &str) -> u64 {
        self.requests.get(operation).copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorKind {
    ResourceNotFound,
    ResourceAlreadyExists,
    InvalidEventPattern,
    LimitExceeded,
    Validation,
    UnknownOperation,
}

impl ErrorKind {
    fn type_name(self) -> &'static str {
        match self {
            ErrorKind::ResourceNotFound => "ResourceNotFoundException",
            ErrorKind::ResourceAlreadyExists => "ResourceAlreadyExistsException",
            ErrorKind::InvalidEventPattern => "InvalidEventPatternException",
            ErrorKind::LimitExceeded => "LimitExceededException",
            ErrorKind::Validation => "ValidationException",
            ErrorKind::UnknownOperation => "UnknownOperationException",
        }
    }
}

#[derive(Debug)]
struct EventsError {
    kind: ErrorKind,
    message: String,
}

impl EventsError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        EventsError {
            kind,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        EventsError::new(ErrorKind::Validation, message)
    }

    fn no_bus(name: &str) -> Self {
        EventsError::new(
            ErrorKind::ResourceNotFound,
            format!("Event bus {name} does not exist."),
        )
    }

    fn no_rule(rule: &str, bus: &str) -> Self {
        EventsError::new(
            ErrorKind::ResourceNotFound,
            format!("Rule {rule} does not exist on EventBus {bus}."),
        )
    }
}

type OpResult = Result<Vec<u8>, EventsError>;

fn to_json(value: &impl Serialize) -> OpResult {
    serde_json::to_vec(value).map_err(|err| EventsError::invalid(err.to_string()))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, EventsError> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|err| EventsError::invalid(err.to_string()))
}

// ---------------------------------------------------------------------------
// Wire shapes
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateEventBusInput {
    name: String,
    #[serde(default)]
    event_source_name: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BusNameInput {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListInput {
    #[serde(default)]
    name_prefix: Option<String>,
    #[serde(default)]
    event_bus_name: Option<String>,
    #[serde(default)]
    next_token: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PutRuleInput {
    name: String,
    #[serde(default)]
    event_pattern: Option<String>,
    #[serde(default)]
    schedule_expression: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    event_bus_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RuleInput {
    name: String,
    #[serde(default)]
    event_bus_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PutTargetsInput {
    rule: String,
    #[serde(default)]
    event_bus_name: Option<String>,
    #[serde(default)]
    targets: Vec<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListTargetsInput {
    rule: String,
    #[serde(default)]
    event_bus_name: Option<String>,
    #[serde(default)]
    next_token: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RemoveTargetsInput {
    rule: String,
    #[serde(default)]
    event_bus_name: Option<String>,
    #[serde(default)]
    ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PutEventsInput {
    #[serde(default)]
    entries: Vec<PutEventsEntry>,
    #[serde(default)]
    endpoint_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PutEventsEntry {
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    detail_type: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    event_bus_name: Option<String>,
    /// Epoch seconds, as AWS JSON carries timestamps.
    #[serde(default)]
    time: Option<f64>,
}

impl PutEventsEntry {
    /// The entry's size as AWS computes it for the request limit.
    fn size(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.time.map_or(0, |_| TIME_ENTRY_BYTES)
            + text(&self.source)
            + text(&self.detail_type)
            + text(&self.detail)
            + self.resources.iter().map(String::len).sum::<usize>()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct FailedTarget {
    target_id: String,
    error_code: &'static str,
    error_message: String,
}

/// The event as delivered to a target, fields in EventBridge's order.
#[derive(Serialize)]
struct Envelope<'a> {
    version: &'a Value,
    id: &'a Value,
    #[serde(rename = "detail-type")]
    detail_type: &'a Value,
    source: &'a Value,
    account: &'a Value,
    time: &'a Value,
    region: &'a Value,
    resources: &'a Value,
    detail: &'a Value,
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Target {
    id: String,
    arn: String,
    /// The queue's name: the last `:` segment of the ARN.
    queue: String,
}

#[derive(Debug)]
struct Rule {
    name: String,
    arn: String,
    pattern_text: String,
    pattern: Pattern,
    state: String,
    description: Option<String>,
    targets: BTreeMap<String, Target>,
}

impl Rule {
    fn enabled(&self) -> bool {
        self.state != "DISABLED"
    }

    fn describe(&self, bus: &str) -> Value {
        let mut out = json!({
            "Name": self.name,
            "Arn": self.arn,
            "EventPattern": self.pattern_text,
            "State": self.state,
            "EventBusName": bus,
        });
        if let (Some(description), Some(map)) = (&self.description, out.as_object_mut()) {
            map.insert("Description".into(), Value::String(description.clone()));
        }
        out
    }
}

/// Rule `rule` of bus `bus_name`, or the error AWS answers for a missing bus or rule.
fn find_rule<'a>(
    buses: &'a BTreeMap<String, Bus>,
    bus_name: &str,
    rule: &str,
) -> Result<&'a Rule, EventsError> {
    buses
        .get(bus_name)
        .ok_or_else(|| EventsError::no_bus(bus_name))?
        .rules
        .get(rule)
        .ok_or_else(|| EventsError::no_rule(rule, bus_name))
}

/// [`find_rule`], to change the rule.
fn find_rule_mut<'a>(
    buses: &'a mut BTreeMap<String, Bus>,
    bus_name: &str,
    rule: &str,
) -> Result<&'a mut Rule, EventsError> {
    buses
        .get_mut(bus_name)
        .ok_or_else(|| EventsError::no_bus(bus_name))?
        .rules
        .get_mut(rule)
        .ok_or_else(|| EventsError::no_rule(rule, bus_name))
}

#[derive(Debug)]
struct Bus {
    name: String,
    arn: String,
    description: Option<String>,
    created_s: f64,
    rules: BTreeMap<String, Rule>,
}

impl Bus {
    fn new(name: &str, description: Option<String>) -> Self {
        Bus {
            name: name.to_owned(),
            arn: format!("arn:aws:events:{REGION}:{ACCOUNT_ID}:event-bus/{name}"),
            description,
            created_s: now_s(),
            rules: BTreeMap::new(),
        }
    }

    fn rule_arn(&self, rule: &str) -> String {
        if self.name == DEFAULT_BUS {
            format!("arn:aws:events:{REGION}:{ACCOUNT_ID}:rule/{rule}")
        } else {
            format!(
                "arn:aws:events:{REGION}:{ACCOUNT_ID}:rule/{}/{rule}",
                self.name
            )
        }
    }

    fn describe(&self) -> Value {
        let mut out = json!({
            "Name": self.name,
            "Arn": self.arn,
            "CreationTime": self.created_s,
            "LastModifiedTime": self.created_s,
        });
        if let (Some(description), Some(map)) = (&self.description, out.as_object_mut()) {
            map.insert("Description".into(), Value::String(description.clone()));
        }
        out
    }
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// RFC 3339 in whole seconds, as EventBridge writes `time`.
fn rfc3339(epoch_s: f64) -> String {
    // Truncation to whole seconds is what EventBridge shows; out-of-range times fall back to
    // the epoch rather than failing the entry.
    #[allow(clippy::cast_possible_truncation)]
    let secs = epoch_s.floor() as i64;
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A bus given by name or by ARN (`arn:...:event-bus/<name>`); `None` is `default`.
fn bus_name(given: Option<&str>) -> &str {
    match given {
        None | Some("") => DEFAULT_BUS,
        Some(text) if text.starts_with("arn:") => text
            .split_once(":event-bus/")
            .map_or(text, |(_, name)| name),
        Some(name) => name,
    }
}

fn valid_rule_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fn valid_bus_name(name: &str, partner: bool) -> bool {
    (1..=256).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_') || (partner && b == b'/')
        })
}

/// The page of `items` after `next_token`, at most `limit` long, and the next token.
fn page<T>(
    items: Vec<T>,
    next_token: Option<&str>,
    limit: Option<i64>,
) -> Result<(Vec<T>, Option<String>), EventsError> {
    let start = match next_token {
        None => 0,
        Some(token) => token
            .parse::<usize>()
            .map_err(|_| EventsError::invalid("The NextToken is not valid."))?,
    };
    let limit = match limit {
        None => MAX_LIST_LIMIT,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
            .ok_or_else(|| EventsError::invalid("Limit must be between 1 and 100."))?,
    };
    let total = items.len();
    let page: Vec<T> = items.into_iter().skip(start).take(limit).collect();
    let end = start + page.len();
    Ok((page, (end < total).then(|| end.to_string())))
}

/// EventBridge's state on the endpoint: buses with their rules and targets, and counters.
#[derive(Debug)]
pub(crate) struct EventState {
    buses: RwLock<BTreeMap<String, Bus>>,
    counters: [AtomicU64; Op::COUNT],
    put_events_entries: AtomicU64,
    matched_deliveries: AtomicU64,
    unmatched_events: AtomicU64,
    failed_deliveries: AtomicU64,
}

impl EventState {
    pub(crate) fn new() -> Self {
        let mut buses = BTreeMap::new();
        buses.insert(DEFAULT_BUS.to_owned(), Bus::new(DEFAULT_BUS, None));
        EventState {
            buses: RwLock::new(buses),
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            put_events_entries: AtomicU64::new(0),
            matched_deliveries: AtomicU64::new(0),
            unmatched_events: AtomicU64::new(0),
            failed_deliveries: AtomicU64::new(0),
        }
    }

    /// Reads every counter with `read` (a load, or a swap to zero).
    pub(crate) fn collect(&self, read: impl Fn(&AtomicU64) -> u64) -> EventStats {
        let mut stats = EventStats::default();
        for (op, counter) in Op::ALL.iter().zip(&self.counters) {
            let count = read(counter);
            if count > 0 {
                stats.requests.insert(op.name().to_owned(), count);
                stats.total += count;
            }
        }
        stats.put_events_entries = read(&self.put_events_entries);
        stats.matched_deliveries = read(&self.matched_deliveries);
        stats.unmatched_events = read(&self.unmatched_events);
        stats.failed_deliveries = read(&self.failed_deliveries);
        stats
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Bus>> {
        self.buses.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Bus>> {
        self.buses.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts and runs one `AWSEvents.<name>` operation and renders its HTTP response.
    pub(crate) fn respond(
        &self,
        sqs: &BenchSqs,
        name: &str,
        body: &[u8],
        request_id: HeaderValue,
    ) -> Response<Full<Bytes>> {
        let (status, bytes) = match self.call(sqs, name, body) {
            Ok(bytes) => (StatusCode::OK, bytes),
            Err(err) => (
                StatusCode::BAD_REQUEST,
                json!({"__type": err.kind.type_name(), "message": err.message})
                    .to_string()
                    .into_bytes(),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(bytes)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON_CONTENT_TYPE));
        headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), request_id);
        response
    }

    fn call(&self, sqs: &BenchSqs, name: &str, body: &[u8]) -> OpResult {
        let op = Op::from_name(name);
        // `Op as usize` is the index of `op` in `Op::ALL` (declaration order).
        self.counters[op as usize].fetch_add(1, Ordering::Relaxed);
        match op {
            Op::CreateEventBus => self.create_event_bus(body),
            Op::DescribeEventBus => self.describe_event_bus(body),
            Op::ListEventBuses => self.list_event_buses(body),
            Op::DeleteEventBus => self.delete_event_bus(body),
            Op::PutRule => self.put_rule(body),
            Op::DescribeRule => self.describe_rule(body),
            Op::ListRules => self.list_rules(body),
            Op::DeleteRule => self.delete_rule(body),
            Op::PutTargets => self.put_targets(body),
            Op::ListTargetsByRule => self.list_targets_by_rule(body),
            Op::RemoveTargets => self.remove_targets(body),
            Op::PutEvents => self.put_events(sqs, body),
            Op::Unknown => Err(EventsError::new(
                ErrorKind::UnknownOperation,
                format!("Operation {name} is not supported by orderfleet-bench-sqs."),
            )),
        }
    }

    // --- Buses --------------------------------------------------------------

    fn create_event_bus(&self, body: &[u8]) -> OpResult {
        let input: CreateEventBusInput = parse(body)?;
        let name = input.name;
        let partner = match &input.event_source_name {
            Some(source) => {
                if !source.starts_with("aws.partner/") {
                    return Err(EventsError::invalid(format!(
                        "Event source {source} is not a partner event source."
                    )));
                }
                if *source != name {
                    return Err(EventsError::invalid(
                        "The name of a partner event bus must be the name of its event source.",
                    ));
                }
                true
            }
            None => false,
        };
        if !valid_bus_name(&name, partner) {
            return Err(EventsError::invalid(format!(
                "Event bus name {name:?} is not valid: 1 to 256 of [A-Za-z0-9._-]{}.",
                if partner { " and /" } else { "" }
            )));
        }
        let mut buses = self.write();
        if buses.contains_key(&name) {
            return Err(EventsError::new(
                ErrorKind::ResourceAlreadyExists,
                format!("Event bus {name} already exists."),
            ));
        }
        let bus = Bus::new(&name, input.description);
        let arn = bus.arn.clone();
        buses.insert(name, bus);
        to_json(&json!({ "EventBusArn": arn }))
    }

    fn describe_event_bus(&self, body: &[u8]) -> OpResult {
        let input: BusNameInput = parse(body)?;
        let name = bus_name(input.name.as_deref());
        let buses = self.read();
        let bus = buses.get(name).ok_or_else(|| EventsError::no_bus(name))?;
        to_json(&bus.describe())
    }

    fn list_event_buses(&self, body: &[u8]) -> OpResult {
        let input: ListInput = parse(body)?;
        let prefix = input.name_prefix.unwrap_or_default();
        let buses = self.read();
        let all: Vec<Value> = buses
            .values()
            .filter(|bus| bus.name.starts_with(&prefix))
            .map(Bus::describe)
            .collect();
        drop(buses);
        let (page, next) = page(all, input.next_token.as_deref(), input.limit)?;
        let mut out = json!({ "EventBuses": page });
        if let (Some(next), Some(map)) = (next, out.as_object_mut()) {
            map.insert("NextToken".into(), Value::String(next));
        }
        to_json(&out)
    }

    fn delete_event_bus(&self, body: &[u8]) -> OpResult {
        let input: BusNameInput = parse(body)?;
        let name = bus_name(input.name.as_deref());
        if name == DEFAULT_BUS {
            return Err(EventsError::invalid("Cannot delete event bus default."));
        }
        // Deleting a bus that does not exist succeeds, as in AWS.
        self.write().remove(name);
        Ok(b"{}".to_vec())
    }

    // --- Rules --------------------------------------------------------------

    fn put_rule(&self, body: &[u8]) -> OpResult {
        let input: PutRuleInput = parse(body)?;
        if !valid_rule_name(&input.name) {
            return Err(EventsError::invalid(format!(
                "Rule name {:?} is not valid: 1 to 64 of [A-Za-z0-9._-].",
                input.name
            )));
        }
        if input.schedule_expression.is_some() {
            return Err(EventsError::invalid(
                "Scheduled rules are not supported by orderfleet-bench-sqs.",
            ));
        }
        let Some(pattern_text) = input.event_pattern else {
            return Err(EventsError::invalid(
                "Parameter(s) EventPattern or ScheduleExpression must be specified.",
            ));
        };
        let pattern = Pattern::parse(&pattern_text).map_err(|reason| {
            EventsError::new(
                ErrorKind::InvalidEventPattern,
                format!("Event pattern is not valid. Reason: {reason}"),
            )
        })?;
        let state = match input.state.as_deref() {
            None => "ENABLED".to_owned(),
            Some(
                state @ ("ENABLED" | "DISABLED" | "ENABLED_WITH_ALL_CLOUDTRAIL_MANAGEMENT_EVENTS"),
            ) => state.to_owned(),
            Some(other) => {
                return Err(EventsError::invalid(format!(
                    "Value {other:?} at 'state' failed to satisfy constraint: Member must satisfy enum value set: [ENABLED, DISABLED, ENABLED_WITH_ALL_CLOUDTRAIL_MANAGEMENT_EVENTS]"
                )))
            }
        };
        let bus_name = bus_name(input.event_bus_name.as_deref());
        let mut buses = self.write();
        let bus = buses
            .get_mut(bus_name)
            .ok_or_else(|| EventsError::no_bus(bus_name))?;
        let arn = bus.rule_arn(&input.name);
        match bus.rules.get_mut(&input.name) {
            Some(rule) => {
                rule.pattern_text = pattern_text;
                rule.pattern = pattern;
                rule.state = state;
                rule.description = input.description;
            }
            None => {
                bus.rules.insert(
                    input.name.clone(),
                    Rule {
                        name: input.name,
                        arn: arn.clone(),
                        pattern_text,
                        pattern,
                        state,
                        description: input.description,
                        targets: BTreeMap::new(),
                    },
                );
            }
        }
        to_json(&json!({ "RuleArn": arn }))
    }

    fn describe_rule(&self, body: &[u8]) -> OpResult {
        let input: RuleInput = parse(body)?;
        let bus_name = bus_name(input.event_bus_name.as_deref());
        let buses = self.read();
        let rule = find_rule(&buses, bus_name, &input.name)?;
        let mut out = rule.describe(bus_name);
        if let Some(map) = out.as_object_mut() {
            map.insert("CreatedBy".into(), Value::String(ACCOUNT_ID.into()));
        }
        to_json(&out)
    }

    fn list_rules(&self, body: &[u8]) -> OpResult {
        let input: ListInput = parse(body)?;
        let bus_name = bus_name(input.event_bus_name.as_deref());
        let prefix = input.name_prefix.unwrap_or_default();
        let buses = self.read();
        let bus = buses
            .get(bus_name)
            .ok_or_else(|| EventsError::no_bus(bus_name))?;
        let all: Vec<Value> = bus
            .rules
            .values()
            .filter(|rule| rule.name.starts_with(&prefix))
            .map(|rule| rule.describe(bus_name))
            .collect();
        drop(buses);
        let (page, next) = page(all, input.next_token.as_deref(), input.limit)?;
        let mut out = json!({ "Rules": page });
        if let (Some(next), Some(map)) = (next, out.as_object_mut()) {
            map.insert("NextToken".into(), Value::String(next));
        }
        to_json(&out)
    }

    fn delete_rule(&self, body: &[u8]) -> OpResult {
        let input: RuleInput = parse(body)?;
        let bus_name = bus_name(input.event_bus_name.as_deref());
        let mut buses = self.write();
        let bus = buses
            .get_mut(bus_name)
            .ok_or_else(|| EventsError::no_bus(bus_name))?;
        if bus
            .rules
            .get(&input.name)
            .is_some_and(|rule| !rule.targets.is_empty())
        {
            return Err(EventsError::invalid(
                "Rule can't be deleted since it has targets.",
            ));
        }
        // Deleting a rule that does not exist succeeds, as in AWS.
        bus.rules.remove(&input.name);
        Ok(b"{}".to_vec())
    }

    // --- Targets ------------------------------------------------------------

    fn put_targets(&self, body: &[u8]) -> OpResult {
        let input: PutTargetsInput = parse(body)?;
        if input.targets.is_empty() || input.targets.len() > MAX_PUT_TARGETS {
            return Err(EventsError::invalid(format!(
                "1 validation error detected: Value at 'targets' failed to satisfy constraint: Member must have length between 1 and {MAX_PUT_TARGETS}"
            )));
        }
        let bus_name = bus_name(input.event_bus_name.as_deref());
        let mut buses = self.write();
        let rule = find_rule_mut(&mut buses, bus_name, &input.rule)?;
        let mut accepted = Vec::new();
        let mut failed = Vec::new();
        for target in input.targets {
            let id = target.get("Id").and_then(Value::as_str).unwrap_or("");
            let arn = target.get("Arn").and_then(Value::as_str).unwrap_or("");
            if id.is_empty() || arn.is_empty() {
                return Err(EventsError::invalid("Every target needs an Id and an Arn."));
            }
            let refuse = |message: String| FailedTarget {
                target_id: id.to_owned(),
                error_code: "ValidationException",
                error_message: message,
            };
            if let Some(setting) = target
                .keys()
                .find(|key| !matches!(key.as_str(), "Id" | "Arn" | "RoleArn"))
            {
                failed.push(refuse(format!(
                    "Target setting {setting} is not supported by orderfleet-bench-sqs (only Id, Arn and RoleArn)."
                )));
                continue;
            }
            let queue = match arn.split(':').collect::<Vec<_>>().as_slice() {
                ["arn", _, "sqs", _, _, name] if !name.is_empty() => (*name).to_owned(),
                _ => {
                    failed.push(refuse(format!(
                        "Target {arn} is not an SQS queue; orderfleet-bench-sqs delivers to SQS queues only."
                    )));
                    continue;
                }
            };
            accepted.push(Target {
                id: id.to_owned(),
                arn: arn.to_owned(),
                queue,
            });
        }
        let new_ids = accepted
            .iter()
            .filter(|t| !rule.targets.contains_key(&t.id))
            .count();
        if rule.targets.len() + new_ids > MAX_TARGETS_PER_RULE {
            return Err(EventsError::new(
                ErrorKind::LimitExceeded,
                format!("The requested resource exceeds the maximum number allowed ({MAX_TARGETS_PER_RULE} targets per rule)."),
            ));
        }
        for target in accepted {
            rule.targets.insert(target.id.clone(), target);
        }
        to_json(&json!({ "FailedEntryCount": failed.len(), "FailedEntries": failed }))
    }

    fn list_targets_by_rule(&self, body: &[u8]) -> OpResult {
        let input: ListTargetsInput = parse(body)?;
        let bus_name = bus_name(input.event_bus_name.as_deref());
        let buses = self.read();
        let rule = find_rule(&buses, bus_name, &input.rule)?;
        let all: Vec<Value> = rule
            .targets
            .values()
            .map(|t| json!({ "Id": t.id, "Arn": t.arn }))
            .collect();
        drop(buses);
        let (page, next) = page(all, input.next_token.as_deref(), input.limit)?;
        let mut out = json!({ "Targets": page });
        if let (Some(next), Some(map)) = (next, out.as_object_mut()) {
            map.insert("NextToken".into(), Value::String(next));
        }
        to_json(&out)
    }

    fn remove_targets(&self, body: &[u8]) -> OpResult {
        let input: RemoveTargetsInput = parse(body)?;
        if input.ids.is_empty() || input.ids.len() > MAX_PUT_TARGETS {
            return Err(EventsError::invalid(format!(
                "1 validation error detected: Value at 'ids' failed to satisfy constraint: Member must have length between 1 and {MAX_PUT_TARGETS}"
            )));
        }
        let bus_name = bus_name(input.event_bus_name.as_deref());
        let mut buses = self.write();
        let rule = find_rule_mut(&mut buses, bus_name, &input.rule)?;
        // An id the rule does not have is removed already: no failure.
        for id in &input.ids {
            rule.targets.remove(id);
        }
        to_json(&json!({ "FailedEntryCount": 0, "FailedEntries": [] }))
    }

    // --- Events -------------------------------------------------------------

    fn put_events(&self, sqs: &BenchSqs, body: &[u8]) -> OpResult {
        let input: PutEventsInput = parse(body)?;
        if input.endpoint_id.is_some() {
            return Err(EventsError::invalid(
                "Global endpoints (EndpointId) are not supported by orderfleet-bench-sqs.",
            ));
        }
        let count = input.entries.len();
        if !(1..=MAX_PUT_EVENTS_ENTRIES).contains(&count) {
            return Err(EventsError::invalid(format!(
                "1 validation error detected: Value at 'entries' failed to satisfy constraint: Member must have length less than or equal to {MAX_PUT_EVENTS_ENTRIES} and greater than or equal to 1 (got {count})"
            )));
        }
        if input
            .entries
            .iter()
            .map(PutEventsEntry::size)
            .sum::<usize>()
            > MAX_ENTRIES_BYTES
        {
            return Err(EventsError::invalid(
                "Total size of the entries in the request is over the limit.",
            ));
        }
        self.put_events_entries
            .fetch_add(u64::try_from(count).unwrap_or(u64::MAX), Ordering::Relaxed);

        let now = rfc3339(now_s());
        let account = Value::String(ACCOUNT_ID.to_owned());
        let region = Value::String(REGION.to_owned());
        let version = Value::String("0".to_owned());
        let mut results = Vec::with_capacity(count);
        let mut failed = 0usize;
        // (body, target queues) of each event that matched, enqueued after the lock is released.
        let mut deliveries: Vec<(String, Vec<String>)> = Vec::new();
        let mut unmatched = 0u64;
        {
            let buses = self.read();
            for entry in input.entries {
                let event = match entry_event(entry, &now, &version, &account, &region) {
                    Ok(event) => event,
                    Err((code, message)) => {
                        failed += 1;
                        results.push(json!({ "ErrorCode": code, "ErrorMessage": message }));
                        continue;
                    }
                };
                results.push(json!({ "EventId": event.id }));
                let queues: Vec<String> = buses
                    .get(event.bus.as_str())
                    .map(|bus| {
                        bus.rules
                            .values()
                            .filter(|rule| rule.enabled() && rule.pattern.matches(&event.fields))
                            .flat_map(|rule| rule.targets.values().map(|t| t.queue.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                if queues.is_empty() {
                    unmatched += 1;
                } else {
                    deliveries.push((event.envelope(), queues));
                }
            }
        }
        if unmatched > 0 {
            self.unmatched_events
                .fetch_add(unmatched, Ordering::Relaxed);
        }
        let (mut delivered, mut lost) = (0u64, 0u64);
        for (body, queues) in deliveries {
            for queue in queues {
                if sqs.deliver(&queue, body.clone()) {
                    delivered += 1;
                } else {
                    lost += 1;
                }
            }
        }
        self.matched_deliveries
            .fetch_add(delivered, Ordering::Relaxed);
        if lost > 0 {
            self.failed_deliveries.fetch_add(lost, Ordering::Relaxed);
        }
        to_json(&json!({ "FailedEntryCount": failed, "Entries": results }))
    }
}

/// One accepted event: its bus and its fields as rules see them.
struct Event {
    id: String,
    bus: String,
    fields: Map<String, Value>,
}

impl Event {
    fn envelope(&self) -> String {
        // Every field is inserted by `entry_event`, so `Null` is never used.
        let field = |name: &str| self.fields.get(name).unwrap_or(&Value::Null);
        let envelope = Envelope {
            version: field("version"),
            id: field("id"),
            detail_type: field("detail-type"),
            source: field("source"),
            account: field("account"),
            time: field("time"),
            region: field("region"),
            resources: field("resources"),
            detail: field("detail"),
        };
        // Serialising borrowed JSON values into a string cannot fail.
        serde_json::to_string(&envelope).unwrap_or_default()
    }
}

/// Validates one entry and builds its event, or the entry's error code and message.
fn entry_event(
    entry: PutEventsEntry,
    now: &str,
    version: &Value,
    account: &Value,
    region: &Value,
) -> Result<Event, (&'static str, String)> {
    let required = |value: Option<String>, name: &str| {
        value.filter(|v| !v.is_empty()).ok_or_else(|| {
            (
                "InvalidArgument",
                format!("Parameter {name} is not valid. Reason: {name} is a required argument."),
            )
        })
    };
    let source = required(entry.source, "Source")?;
    let detail_type = required(entry.detail_type, "DetailType")?;
    let detail = required(entry.detail, "Detail")?;
    let detail = match serde_json::from_str::<Value>(&detail) {
        Ok(detail @ Value::Object(_)) => detail,
        _ => return Err(("MalformedDetail", "Detail is malformed.".to_owned())),
    };
    let id = uuid::Uuid::new_v4().to_string();
    let time = entry.time.map_or_else(|| now.to_owned(), rfc3339);
    let mut fields = Map::new();
    fields.insert("version".into(), version.clone());
    fields.insert("id".into(), Value::String(id.clone()));
    fields.insert("detail-type".into(), Value::String(detail_type));
    fields.insert("source".into(), Value::String(source));
    fields.insert("account".into(), account.clone());
    fields.insert("time".into(), Value::String(time));
    fields.insert("region".into(), region.clone());
    fields.insert(
        "resources".into(),
        Value::Array(entry.resources.into_iter().map(Value::String).collect()),
    );
    fields.insert("detail".into(), detail);
    Ok(Event {
        id,
        bus: bus_name(entry.event_bus_name.as_deref()).to_owned(),
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buses_are_named_by_name_or_arn() {
        assert_eq!(bus_name(None), "default");
        assert_eq!(
            bus_name(Some(
                "arn:aws:events:us-east-1:000000000000:event-bus/aws.partner/shopify.com/1/of"
            )),
            "aws.partner/shopify.com/1/of"
        );
        assert_eq!(bus_name(Some("orderfleet")), "orderfleet");
    }

    #[test]
    fn entry_size_counts_time_as_fourteen_bytes_and_text_as_utf8() {
        let entry = PutEventsEntry {
            source: Some("é".into()),
            detail_type: Some("t".into()),
            detail: Some("{}".into()),
            resources: vec!["r".into()],
            event_bus_name: None,
            time: Some(0.0),
        };
        assert_eq!(entry.size(), 14 + 2 + 1 + 2 + 1);
    }

    #[test]
    fn times_are_rfc3339_in_whole_seconds() {
        assert_eq!(rfc3339(1_796_583_600.7), "2026-12-06T19:00:00Z");
    }
}
