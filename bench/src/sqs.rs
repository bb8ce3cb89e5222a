//! `bench_sqs`: a small, fast, in-memory SQS endpoint for benchmarks.
//!
//! This module owns the `orderfleet-bench-sqs` endpoint: queue state kept in
//! memory, the AWS JSON 1.0 wire protocol that the current `aws-sdk-sqs`
//! crate speaks (`POST /`, `X-Amz-Target: AmazonSQS.<Operation>`,
//! `Content-Type: application/x-amz-json-1.0`), and per-operation request
//! counters. The same listener serves EventBridge (`X-Amz-Target:
//! AWSEvents.<Operation>`, AWS JSON 1.1; see [`crate::events`]), whose rules
//! deliver matched events straight into these queues.
//!
//! Why it exists: moto's `ReceiveMessage` gets slower as the backlog grows,
//! so against moto a benchmark measures moto, not the consumer. This endpoint
//! does every operation in (amortised) constant time with one short critical
//! section per queue, so the consumer under test is the bottleneck. It runs
//! in-process ([`spawn_local`]) for the benchmark and the tests, or
//! standalone (the `orderfleet-bench-sqs` binary) so that other consumers can
//! be measured side by side against the same endpoint.
//!
//! Operations: `CreateQueue`, `DeleteQueue`, `ListQueues`, `GetQueueUrl`,
//! `GetQueueAttributes`, `SetQueueAttributes`, `SendMessage`,
//! `SendMessageBatch`, `ReceiveMessage` (long polling, visibility timeouts,
//! system and message attributes), `DeleteMessage`, `DeleteMessageBatch`,
//! `ChangeMessageVisibility`, `ChangeMessageVisibilityBatch`, `PurgeQueue`.
//! Two extra, non-AWS targets read the counters:
//! `X-Amz-Target: OrderfleetBench.Stats` answers
//! `{"requests":{"ReceiveMessage":n,...},"total":n,"events":{...}}` (SQS
//! requests, and EventBridge's counters as [`crate::events::EventStats`]) and
//! `OrderfleetBench.Reset` answers the same shape and zeroes the counters.
//! Neither is counted itself.
//!
//! Semantics worth knowing (documented deviations from real SQS):
//! - Standard queues only. FIFO queues (`.fifo` names, `FifoQueue`) are
//!   refused with `UnsupportedOperation` rather than served wrongly.
//! - Receipt handles are unique per receive. Only the most recent handle of a
//!   message can delete it or change its visibility. `DeleteMessage` with an
//!   older handle, or for a message that is already gone, succeeds without
//!   deleting anything (as the SQS API reference describes for stale
//!   handles). `ChangeMessageVisibility` with an older handle or for a gone
//!   message fails with `ReceiptHandleIsInvalid`; with the latest handle of a
//!   message that is visible again it fails with `MessageNotInflight`.
//!   A handle that this server did not issue is `ReceiptHandleIsInvalid`.
//! - `RedrivePolicy` is honoured: a message received `maxReceiveCount` times
//!   moves to the dead-letter queue (named by the last `:` segment of
//!   `deadLetterTargetArn`) on its next receive, if that queue exists.
//! - `MessageRetentionPeriod` is stored and reported but messages never
//!   expire; `PurgeQueue` has no 60-second cool-down; there are no tags,
//!   permissions or message-move tasks.
//! - `MD5OfBody` / `MD5OfMessageAttributes` / `MD5OfMessageSystemAttributes`
//!   are real MD5 digests computed as SQS does, so SDKs that validate them
//!   (Java v2, Go v2) work.
//!
//! Nothing is logged per request.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::events::{EventState, EventStats};

/// Account id used in queue URLs and ARNs (EventBridge's too).
pub(crate) const ACCOUNT_ID: &str = "000000000000";
/// Region used in queue ARNs (EventBridge's too).
pub(crate) const REGION: &str = "us-east-1";
/// Largest request body accepted (a full batch of maximum-size messages fits).
const MAX_REQUEST_BYTES: usize = 12 * 1024 * 1024;
/// `MaximumMessageSize` upper bound (SQS raised it to 1 MiB in 2025).
const MAX_MESSAGE_SIZE: u32 = 1024 * 1024;
const DEFAULT_MESSAGE_SIZE: u32 = 256 * 1024;
const MAX_VISIBILITY_TIMEOUT: i64 = 43_200;
const MAX_WAIT_SECONDS: i64 = 20;
const MAX_DELAY_SECONDS: i64 = 900;
const MAX_BATCH_ENTRIES: usize = 10;
const MAX_MESSAGE_ATTRIBUTES: usize = 10;
const JSON_CONTENT_TYPE: &str = "application/x-amz-json-1.0";
const QUERY_ERROR_HEADER: &str = "x-amzn-query-error";
const REQUEST_ID_HEADER: &str = "x-amzn-requestid";

// ---------------------------------------------------------------------------
// Operations and counters
// ---------------------------------------------------------------------------

/// The operations the endpoint counts; `Unknown` collects every other
/// `AmazonSQS.*` target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    CreateQueue,
    DeleteQueue,
    ListQueues,
    GetQueueUrl,
    GetQueueAttributes,
    SetQueueAttributes,
    SendMessage,
    SendMessageBatch,
    ReceiveMessage,
    DeleteMessage,
    DeleteMessageBatch,
    ChangeMessageVisibility,
    ChangeMessageVisibilityBatch,
    PurgeQueue,
    Unknown,
}

impl Op {
    const COUNT: usize = 15;
    const ALL: [Op; Op::COUNT] = [
        Op::CreateQueue,
        Op::DeleteQueue,
        Op::ListQueues,
        Op::GetQueueUrl,
        Op::GetQueueAttributes,
        Op::SetQueueAttributes,
        Op::SendMessage,
        Op::SendMessageBatch,
        Op::ReceiveMessage,
        Op::DeleteMessage,
        Op::DeleteMessageBatch,
        Op::ChangeMessageVisibility,
        Op::ChangeMessageVisibilityBatch,
        Op::PurgeQueue,
        Op::Unknown,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::CreateQueue => "CreateQueue",
            Op::DeleteQueue => "DeleteQueue",
            Op::ListQueues => "ListQueues",
            Op::GetQueueUrl => "GetQueueUrl",
            Op::GetQueueAttributes => "GetQueueAttributes",
            Op::SetQueueAttributes => "SetQueueAttributes",
            Op::SendMessage => "SendMessage",
            Op::SendMessageBatch => "SendMessageBatch",
            Op::ReceiveMessage => "ReceiveMessage",
            Op::DeleteMessage => "DeleteMessage",
            Op::DeleteMessageBatch => "DeleteMessageBatch",
            Op::ChangeMessageVisibility => "ChangeMessageVisibility",
            Op::ChangeMessageVisibilityBatch => "ChangeMessageVisibilityBatch",
            Op::PurgeQueue => "PurgeQueue",
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

/// Request counts per operation, as returned by [`BenchSqs::stats`] and by
/// the `OrderfleetBench.Stats` target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Count per operation name (`"ReceiveMessage"`, ...); operations never
    /// called are absent. Unrecognised `AmazonSQS.*` targets count as
    /// `"Unknown"`.
    pub requests: BTreeMap<String, u64>,
    /// Sum of all counts.
    pub total: u64,
    /// SQS requests as AWS bills them: each 64 KB of payload (of the request or of its
    /// answer, whichever is larger) is one request.
    #[serde(default)]
    pub billed_units: u64,
    /// EventBridge's counters (requests are not part of `requests` or `total`).
    #[serde(default)]
    pub events: EventStats,
    /// Each queue's message counts now (over HTTP only; a reset does not change them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub queues: BTreeMap<String, QueueCounts>,
}

impl Stats {
    /// The count for one operation name, 0 when it was never called.
    pub fn get(&self, operation: &str) -> u64 {
        self.requests.get(operation).copied().unwrap_or(0)
    }
}

/// Message counts of one queue, as returned by [`BenchSqs::counts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Messages that a receive would return now.
    pub visible: usize,
    /// Messages received and neither deleted nor timed out yet.
    pub in_flight: usize,
    /// Messages sent with a delay that has not passed yet.
    pub delayed: usize,
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorKind {
    QueueDoesNotExist,
    QueueNameExists,
    ReceiptHandleIsInvalid,
    MessageNotInflight,
    EmptyBatchRequest,
    TooManyEntriesInBatchRequest,
    BatchEntryIdsNotDistinct,
    InvalidBatchEntryId,
    BatchRequestTooLong,
    InvalidParameterValue,
    InvalidMessageContents,
    MissingParameter,
    InvalidAttributeName,
    InvalidAttributeValue,
    UnsupportedOperation,
    UnknownOperation,
}

impl ErrorKind {
    /// The `__type` shape name (prefixed with `com.amazonaws.sqs#`).
    fn type_name(self) -> &'static str {
        match self {
            ErrorKind::QueueDoesNotExist => "QueueDoesNotExist",
            ErrorKind::QueueNameExists => "QueueNameExists",
            ErrorKind::ReceiptHandleIsInvalid => "ReceiptHandleIsInvalid",
            ErrorKind::MessageNotInflight => "MessageNotInflight",
            ErrorKind::EmptyBatchRequest => "EmptyBatchRequest",
            ErrorKind::TooManyEntriesInBatchRequest => "TooManyEntriesInBatchRequest",
            ErrorKind::BatchEntryIdsNotDistinct => "BatchEntryIdsNotDistinct",
            ErrorKind::InvalidBatchEntryId => "InvalidBatchEntryId",
            ErrorKind::BatchRequestTooLong => "BatchRequestTooLong",
            ErrorKind::InvalidParameterValue => "InvalidParameterValueException",
            ErrorKind::InvalidMessageContents => "InvalidMessageContents",
            ErrorKind::MissingParameter => "MissingRequiredParameterException",
            ErrorKind::InvalidAttributeName => "InvalidAttributeName",
            ErrorKind::InvalidAttributeValue => "InvalidAttributeValue",
            ErrorKind::UnsupportedOperation => "UnsupportedOperation",
            ErrorKind::UnknownOperation => "UnknownOperationException",
        }
    }

    /// The legacy query-protocol error code. The SDK takes the error code from
    /// the `x-amzn-query-error: <code>;Sender` header when present, so this
    /// is what selects the typed error variant.
    fn query_code(self) -> &'static str {
        match self {
            ErrorKind::QueueDoesNotExist => "AWS.SimpleQueueService.NonExistentQueue",
            ErrorKind::QueueNameExists => "QueueAlreadyExists",
            ErrorKind::ReceiptHandleIsInvalid => "ReceiptHandleIsInvalid",
            ErrorKind::MessageNotInflight => "AWS.SimpleQueueService.MessageNotInflight",
            ErrorKind::EmptyBatchRequest => "AWS.SimpleQueueService.EmptyBatchRequest",
            ErrorKind::TooManyEntriesInBatchRequest => {
                "AWS.SimpleQueueService.TooManyEntriesInBatchRequest"
            }
            ErrorKind::BatchEntryIdsNotDistinct => {
                "AWS.SimpleQueueService.BatchEntryIdsNotDistinct"
            }
            ErrorKind::InvalidBatchEntryId => "AWS.SimpleQueueService.InvalidBatchEntryId",
            ErrorKind::BatchRequestTooLong => "AWS.SimpleQueueService.BatchRequestTooLong",
            ErrorKind::InvalidParameterValue => "InvalidParameterValue",
            ErrorKind::InvalidMessageContents => "InvalidMessageContents",
            ErrorKind::MissingParameter => "MissingParameter",
            ErrorKind::InvalidAttributeName => "InvalidAttributeName",
            ErrorKind::InvalidAttributeValue => "InvalidAttributeValue",
            ErrorKind::UnsupportedOperation => "AWS.SimpleQueueService.UnsupportedOperation",
            ErrorKind::UnknownOperation => "InvalidAction",
        }
    }
}

#[derive(Debug)]
struct SqsError {
    kind: ErrorKind,
    message: String,
}

impl SqsError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        SqsError {
            kind,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        SqsError::new(ErrorKind::InvalidParameterValue, message)
    }

    fn no_queue() -> Self {
        SqsError::new(
            ErrorKind::QueueDoesNotExist,
            "The specified queue does not exist.",
        )
    }

    fn body(&self) -> Vec<u8> {
        let body = json!({
            "__type": format!("com.amazonaws.sqs#{}", self.kind.type_name()),
            "message": self.message,
        });
        body.to_string().into_bytes()
    }
}

type OpResult = Result<Vec<u8>, SqsError>;

fn to_json(value: &impl Serialize) -> OpResult {
    serde_json::to_vec(value).map_err(|err| SqsError::invalid(err.to_string()))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, SqsError> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|err| {
        let text = err.to_string();
        if text.starts_with("missing field") {
            SqsError::new(ErrorKind::MissingParameter, text)
        } else {
            SqsError::invalid(text)
        }
    })
}

// ---------------------------------------------------------------------------
// Wire shapes
// ---------------------------------------------------------------------------

/// A message attribute (`MessageAttributes` / `MessageSystemAttributes`).
/// The list variants are "reserved for future use" by SQS and not kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AttributeValue {
    data_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    string_value: Option<String>,
    /// Base64, as on the wire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    binary_value: Option<String>,
}

type Attributes = BTreeMap<String, AttributeValue>;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct QueueUrlInput {
    queue_url: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateQueueInput {
    queue_name: String,
    #[serde(default)]
    attributes: HashMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetQueueUrlInput {
    queue_name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListQueuesInput {
    #[serde(default)]
    queue_name_prefix: Option<String>,
    #[serde(default)]
    max_results: Option<usize>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetQueueAttributesInput {
    queue_url: String,
    #[serde(default)]
    attribute_names: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SetQueueAttributesInput {
    queue_url: String,
    #[serde(default)]
    attributes: HashMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SendMessageInput {
    queue_url: String,
    message_body: String,
    #[serde(default)]
    delay_seconds: Option<i64>,
    #[serde(default)]
    message_attributes: Attributes,
    #[serde(default)]
    message_system_attributes: Attributes,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SendMessageOutput<'a> {
    message_id: &'a str,
    #[serde(rename = "MD5OfMessageBody")]
    md5_of_message_body: &'a str,
    #[serde(
        rename = "MD5OfMessageAttributes",
        skip_serializing_if = "Option::is_none"
    )]
    md5_of_message_attributes: Option<&'a str>,
    #[serde(
        rename = "MD5OfMessageSystemAttributes",
        skip_serializing_if = "Option::is_none"
    )]
    md5_of_message_system_attributes: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SendMessageBatchInput {
    queue_url: String,
    #[serde(default)]
    entries: Vec<SendMessageBatchEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SendMessageBatchEntry {
    id: String,
    message_body: String,
    #[serde(default)]
    delay_seconds: Option<i64>,
    #[serde(default)]
    message_attributes: Attributes,
    #[serde(default)]
    message_system_attributes: Attributes,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SendMessageBatchSuccess<'a> {
    id: &'a str,
    #[serde(flatten)]
    output: SendMessageOutput<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BatchFailure {
    id: String,
    sender_fault: bool,
    code: &'static str,
    message: String,
}

impl BatchFailure {
    fn new(id: &str, err: SqsError) -> Self {
        BatchFailure {
            id: id.to_owned(),
            sender_fault: true,
            code: err.kind.query_code(),
            message: err.message,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BatchOutput<S: Serialize> {
    successful: Vec<S>,
    failed: Vec<BatchFailure>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BatchIdOnly<'a> {
    id: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ReceiveMessageInput {
    queue_url: String,
    #[serde(default)]
    attribute_names: Vec<String>,
    #[serde(default)]
    message_system_attribute_names: Vec<String>,
    #[serde(default)]
    message_attribute_names: Vec<String>,
    #[serde(default)]
    max_number_of_messages: Option<i64>,
    #[serde(default)]
    visibility_timeout: Option<i64>,
    #[serde(default)]
    wait_time_seconds: Option<i64>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ReceiveMessageOutput<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    messages: Vec<OutMessage<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct OutMessage<'a> {
    message_id: &'a str,
    receipt_handle: String,
    #[serde(rename = "MD5OfBody")]
    md5_of_body: &'a str,
    body: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    attributes: BTreeMap<&'static str, String>,
    #[serde(
        rename = "MD5OfMessageAttributes",
        skip_serializing_if = "Option::is_none"
    )]
    md5_of_message_attributes: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    message_attributes: BTreeMap<&'a str, &'a AttributeValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DeleteMessageInput {
    queue_url: String,
    receipt_handle: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DeleteMessageBatchInput {
    queue_url: String,
    #[serde(default)]
    entries: Vec<DeleteMessageBatchEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DeleteMessageBatchEntry {
    id: String,
    receipt_handle: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ChangeVisibilityInput {
    queue_url: String,
    receipt_handle: String,
    visibility_timeout: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ChangeVisibilityBatchInput {
    queue_url: String,
    #[serde(default)]
    entries: Vec<ChangeVisibilityBatchEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ChangeVisibilityBatchEntry {
    id: String,
    receipt_handle: String,
    #[serde(default)]
    visibility_timeout: i64,
}

// ---------------------------------------------------------------------------
// Checksums and small helpers
// ---------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

fn md5_hex(data: &[u8]) -> String {
    hex(&Md5::digest(data))
}

/// Decodes standard base64 (padding optional). `None` if malformed.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut buffer: u32 = 0;
    let mut bits = 0u32;
    for byte in text.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((buffer >> bits) & 0xff) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// MD5 of message attributes as SQS computes it: for each attribute in name
/// order, length-prefixed (4-byte big endian) name and data type, a transport
/// byte (1 = string, 2 = binary) and the length-prefixed value.
/// `None` when there are no attributes.
fn md5_of_attributes<'a>(
    attributes: impl IntoIterator<Item = (&'a String, &'a AttributeValue)>,
) -> Option<String> {
    fn put(hasher: &mut Md5, bytes: &[u8]) {
        // Attribute parts are bounded by the request size limit (12 MiB),
        // far below u32::MAX; saturate rather than panic regardless.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        hasher.update(len.to_be_bytes());
        hasher.update(bytes);
    }
    let mut hasher = Md5::new();
    let mut any = false;
    for (name, value) in attributes {
        any = true;
        put(&mut hasher, name.as_bytes());
        put(&mut hasher, value.data_type.as_bytes());
        if value.data_type.starts_with("Binary") {
            hasher.update([2u8]);
            let decoded = value
                .binary_value
                .as_deref()
                .and_then(base64_decode)
                .unwrap_or_default();
            put(&mut hasher, &decoded);
        } else {
            hasher.update([1u8]);
            put(
                &mut hasher,
                value.string_value.as_deref().unwrap_or_default().as_bytes(),
            );
        }
    }
    any.then(|| hex(&hasher.finalize()))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a queue lock leaves consistent-enough state for a
    // benchmark endpoint; keep serving instead of cascading the panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn in_range(name: &str, value: i64, min: i64, max: i64) -> Result<u64, SqsError> {
    if (min..=max).contains(&value) {
        // `value >= min >= 0` here, so the conversion cannot fail.
        Ok(u64::try_from(value).unwrap_or(0))
    } else {
        Err(SqsError::invalid(format!(
            "Value {value} for parameter {name} is invalid. Reason: must be between {min} and {max}."
        )))
    }
}

fn queue_name_from_url(url: &str) -> &str {
    url.trim_end_matches('/').rsplit('/').next().unwrap_or(url)
}

fn valid_queue_name(name: &str) -> bool {
    (1..=80).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_batch_id(id: &str) -> bool {
    (1..=80).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_body_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{a}' | '\u{d}' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
}

// ---------------------------------------------------------------------------
// Receipt handles
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Handle {
    seq: u64,
    nonce: u64,
}

const HANDLE_PREFIX: &str = "obsq";

fn format_handle(instance: u32, handle: Handle) -> String {
    format!(
        "{HANDLE_PREFIX}-{instance:08x}-{:x}-{:x}",
        handle.seq, handle.nonce
    )
}

fn parse_handle(instance: u32, text: &str) -> Option<Handle> {
    let mut parts = text.split('-');
    if parts.next()? != HANDLE_PREFIX {
        return None;
    }
    if u32::from_str_radix(parts.next()?, 16).ok()? != instance {
        return None;
    }
    let seq = u64::from_str_radix(parts.next()?, 16).ok()?;
    let nonce = u64::from_str_radix(parts.next()?, 16).ok()?;
    if parts.next().is_some() || nonce == 0 {
        return None;
    }
    Some(Handle { seq, nonce })
}

fn invalid_handle(text: &str) -> SqsError {
    SqsError::new(
        ErrorKind::ReceiptHandleIsInvalid,
        format!("The input receipt handle \"{text}\" is not a valid receipt handle."),
    )
}

// ---------------------------------------------------------------------------
// Queue state
// ---------------------------------------------------------------------------

/// Immutable part of a message, shared between the queue and responses.
#[derive(Debug)]
struct MessageData {
    id: String,
    body: String,
    md5_of_body: String,
    attributes: Attributes,
    md5_of_attributes: Option<String>,
    system_attributes: Attributes,
    md5_of_system_attributes: Option<String>,
    sent_ms: u64,
}

impl MessageData {
    fn new(body: String, attributes: Attributes, system_attributes: Attributes) -> Self {
        MessageData {
            id: uuid::Uuid::new_v4().to_string(),
            md5_of_body: md5_hex(body.as_bytes()),
            body,
            md5_of_attributes: md5_of_attributes(&attributes),
            attributes,
            md5_of_system_attributes: md5_of_attributes(&system_attributes),
            system_attributes,
            sent_ms: now_ms(),
        }
    }

    fn trace_header(&self) -> Option<&str> {
        self.system_attributes
            .get("AWSTraceHeader")
            .and_then(|value| value.string_value.as_deref())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MsgState {
    Visible,
    Delayed(Instant),
    InFlight(Instant),
}

#[derive(Debug)]
struct Msg {
    data: Arc<MessageData>,
    state: MsgState,
    receive_count: u32,
    first_receive_ms: u64,
    /// Nonce of the latest receipt handle; 0 before the first receive.
    nonce: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Redrive {
    target: String,
    max_receive_count: u32,
}

#[derive(Clone, Debug)]
struct QueueConfig {
    visibility_timeout: u32,
    delay_seconds: u32,
    wait_seconds: u32,
    retention_seconds: u32,
    max_message_size: u32,
    redrive: Option<Redrive>,
    /// Attributes stored verbatim (`Policy`, `RedrivePolicy`, ...).
    extra: BTreeMap<String, String>,
    created_s: u64,
    modified_s: u64,
}

impl QueueConfig {
    fn new() -> Self {
        let now = now_ms() / 1000;
        let mut extra = BTreeMap::new();
        extra.insert("SqsManagedSseEnabled".to_owned(), "true".to_owned());
        QueueConfig {
            visibility_timeout: 30,
            delay_seconds: 0,
            wait_seconds: 0,
            retention_seconds: 345_600,
            max_message_size: DEFAULT_MESSAGE_SIZE,
            redrive: None,
            extra,
            created_s: now,
            modified_s: now,
        }
    }

    /// Returns a copy with `attributes` applied, or the first validation error.
    fn with(&self, attributes: &HashMap<String, String>) -> Result<QueueConfig, SqsError> {
        fn number(name: &str, value: &str, min: i64, max: i64) -> Result<u32, SqsError> {
            let parsed: i64 = value.trim().parse().map_err(|_| {
                SqsError::new(
                    ErrorKind::InvalidAttributeValue,
                    format!("Invalid value for the parameter {name}."),
                )
            })?;
            if !(min..=max).contains(&parsed) {
                return Err(SqsError::new(
                    ErrorKind::InvalidAttributeValue,
                    format!(
                        "Invalid value for the parameter {name}: must be between {min} and {max}."
                    ),
                ));
            }
            // In range [min, max] with max <= u32::MAX for every caller.
            Ok(u32::try_from(parsed).unwrap_or(u32::MAX))
        }
        let mut cfg = self.clone();
        for (name, value) in attributes {
            match name.as_str() {
                "VisibilityTimeout" => {
                    cfg.visibility_timeout = number(name, value, 0, MAX_VISIBILITY_TIMEOUT)?
                }
                "DelaySeconds" => cfg.delay_seconds = number(name, value, 0, MAX_DELAY_SECONDS)?,
                "ReceiveMessageWaitTimeSeconds" => {
                    cfg.wait_seconds = number(name, value, 0, MAX_WAIT_SECONDS)?
                }
                "MessageRetentionPeriod" => {
                    cfg.retention_seconds = number(name, value, 60, 1_209_600)?
                }
                "MaximumMessageSize" => {
                    cfg.max_message_size = number(name, value, 1024, i64::from(MAX_MESSAGE_SIZE))?
                }
                "RedrivePolicy" => {
                    if value.is_empty() {
                        cfg.redrive = None;
                        cfg.extra.remove(name);
                    } else {
                        cfg.redrive = Some(parse_redrive(value)?);
                        cfg.extra.insert(name.clone(), value.clone());
                    }
                }
                "Policy"
                | "RedriveAllowPolicy"
                | "KmsMasterKeyId"
                | "KmsDataKeyReusePeriodSeconds"
                | "SqsManagedSseEnabled" => {
                    cfg.extra.insert(name.clone(), value.clone());
                }
                "FifoQueue" if value == "false" => {}
                "FifoQueue"
                | "ContentBasedDeduplication"
                | "DeduplicationScope"
                | "FifoThroughputLimit" => {
                    return Err(SqsError::new(
                        ErrorKind::UnsupportedOperation,
                        "FIFO queues are not supported by orderfleet-bench-sqs.",
                    ))
                }
                _ => {
                    return Err(SqsError::new(
                        ErrorKind::InvalidAttributeName,
                        format!("Unknown Attribute {name}."),
                    ))
                }
            }
        }
        cfg.modified_s = now_ms() / 1000;
        Ok(cfg)
    }
}

fn parse_redrive(text: &str) -> Result<Redrive, SqsError> {
    let bad = || {
        SqsError::new(
            ErrorKind::InvalidAttributeValue,
            format!("Value {text} for parameter RedrivePolicy is invalid."),
        )
    };
    let value: Value = serde_json::from_str(text).map_err(|_| bad())?;
    let arn = value
        .get("deadLetterTargetArn")
        .and_then(Value::as_str)
        .ok_or_else(bad)?;
    let max = match value.get("maxReceiveCount") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .and_then(|n| u32::try_from(n).ok())
    .filter(|n| (1..=1000).contains(n))
    .ok_or_else(bad)?;
    let target = arn.rsplit(':').next().unwrap_or(arn).to_owned();
    Ok(Redrive {
        target,
        max_receive_count: max,
    })
}

/// A message taken by a receive, rendered after the lock is released.
struct Taken {
    data: Arc<MessageData>,
    handle: Handle,
    receive_count: u32,
    first_receive_ms: u64,
}

#[derive(Debug)]
struct QueueState {
    cfg: QueueConfig,
    msgs: HashMap<u64, Msg>,
    /// Sequence numbers in receive order. May hold numbers of messages that
    /// were deleted or are no longer visible; those are skipped on pop.
    visible: VecDeque<u64>,
    /// Deadlines of delayed and in-flight messages. Entries whose message
    /// state no longer carries that exact deadline are stale and skipped.
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: usize,
    delayed: usize,
    next_nonce: u64,
}

impl QueueState {
    fn new(cfg: QueueConfig) -> Self {
        QueueState {
            cfg,
            msgs: HashMap::new(),
            visible: VecDeque::new(),
            timers: BinaryHeap::new(),
            in_flight: 0,
            delayed: 0,
            next_nonce: 1,
        }
    }

    fn counts(&self) -> QueueCounts {
        QueueCounts {
            visible: self.msgs.len() - self.in_flight - self.delayed,
            in_flight: self.in_flight,
            delayed: self.delayed,
        }
    }

    /// Earliest pending deadline (possibly stale: only ever too early).
    fn next_due(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((due, _))| *due)
    }

    /// Schedules a deadline; true if it is now the earliest one, in which
    /// case long pollers must be woken to re-arm their timers.
    fn push_timer(&mut self, due: Instant, seq: u64) -> bool {
        let earliest = match self.next_due() {
            Some(head) => due < head,
            None => true,
        };
        self.timers.push(Reverse((due, seq)));
        earliest
    }

    /// Adds a message; returns true if long pollers must be woken.
    fn insert(&mut self, seq: u64, data: Arc<MessageData>, delay: Duration, now: Instant) -> bool {
        let state = if delay.is_zero() {
            self.visible.push_back(seq);
            MsgState::Visible
        } else {
            self.delayed += 1;
            MsgState::Delayed(now + delay)
        };
        self.msgs.insert(
            seq,
            Msg {
                data,
                state,
                receive_count: 0,
                first_receive_ms: 0,
                nonce: 0,
            },
        );
        match state {
            MsgState::Delayed(due) => self.push_timer(due, seq),
            _ => true,
        }
    }

    /// Makes delayed and timed-out messages visible; true if any did.
    fn tick(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(Reverse((due, seq))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            let Some(msg) = self.msgs.get_mut(&seq) else {
                continue;
            };
            match msg.state {
                MsgState::InFlight(deadline) if deadline == due => self.in_flight -= 1,
                MsgState::Delayed(deadline) if deadline == due => self.delayed -= 1,
                _ => continue,
            }
            msg.state = MsgState::Visible;
            self.visible.push_back(seq);
            any = true;
        }
        self.compact_timers();
        any
    }

    /// Drops stale heap entries once they dominate the heap, so that a queue
    /// whose messages are deleted long before their visibility timeout does
    /// not accumulate entries.
    fn compact_timers(&mut self) {
        let live = self.in_flight + self.delayed;
        if self.timers.len() > 4096 && self.timers.len() > 4 * live {
            self.timers = self
                .msgs
                .iter()
                .filter_map(|(seq, msg)| match msg.state {
                    MsgState::InFlight(due) | MsgState::Delayed(due) => Some(Reverse((due, *seq))),
                    MsgState::Visible => None,
                })
                .collect();
        }
    }

    /// Takes up to `max` visible messages into `out` (in flight until
    /// `now + visibility`). Messages over the redrive limit go to `dead`
    /// instead. Returns true if long pollers must be woken.
    fn take(
        &mut self,
        now: Instant,
        max: usize,
        visibility: Duration,
        redrive_max: Option<u32>,
        out: &mut Vec<Taken>,
        dead: &mut Vec<(u64, Arc<MessageData>)>,
    ) -> bool {
        let mut wake = false;
        let mut received_ms = 0;
        while out.len() < max {
            let Some(seq) = self.visible.pop_front() else {
                break;
            };
            let Some(msg) = self.msgs.get_mut(&seq) else {
                continue;
            };
            if msg.state != MsgState::Visible {
                continue;
            }
            if redrive_max.is_some_and(|limit| msg.receive_count >= limit) {
                if let Some(msg) = self.msgs.remove(&seq) {
                    dead.push((seq, msg.data));
                }
                continue;
            }
            if received_ms == 0 {
                received_ms = now_ms();
            }
            let nonce = self.next_nonce;
            self.next_nonce += 1;
            let deadline = now + visibility;
            msg.nonce = nonce;
            msg.receive_count += 1;
            if msg.first_receive_ms == 0 {
                msg.first_receive_ms = received_ms;
            }
            msg.state = MsgState::InFlight(deadline);
            out.push(Taken {
                data: Arc::clone(&msg.data),
                handle: Handle { seq, nonce },
                receive_count: msg.receive_count,
                first_receive_ms: msg.first_receive_ms,
            });
            self.in_flight += 1;
            wake |= self.push_timer(deadline, seq);
        }
        wake
    }

    /// Deletes the message if `handle` is its latest receipt handle.
    /// Stale handles and gone messages are a silent success.
    fn delete(&mut self, handle: Handle) {
        let latest = self
            .msgs
            .get(&handle.seq)
            .is_some_and(|msg| msg.nonce == handle.nonce);
        if !latest {
            return;
        }
        if let Some(msg) = self.msgs.remove(&handle.seq) {
            match msg.state {
                MsgState::InFlight(_) => self.in_flight -= 1,
                MsgState::Delayed(_) => self.delayed -= 1,
                MsgState::Visible => {}
            }
        }
    }

    /// Sets the visibility of an in-flight message; true if long pollers
    /// must be woken.
    fn change_visibility(
        &mut self,
        handle: Handle,
        text: &str,
        timeout: Duration,
        now: Instant,
    ) -> Result<bool, SqsError> {
        let msg = self
            .msgs
            .get_mut(&handle.seq)
            .filter(|msg| msg.nonce == handle.nonce)
            .ok_or_else(|| invalid_handle(text))?;
        if !matches!(msg.state, MsgState::InFlight(_)) {
            return Err(SqsError::new(
                ErrorKind::MessageNotInflight,
                "The message referred to is not in flight.",
            ));
        }
        if timeout.is_zero() {
            msg.state = MsgState::Visible;
            self.in_flight -= 1;
            self.visible.push_back(handle.seq);
            Ok(true)
        } else {
            let deadline = now + timeout;
            msg.state = MsgState::InFlight(deadline);
            Ok(self.push_timer(deadline, handle.seq))
        }
    }

    fn purge(&mut self) {
        self.msgs.clear();
        self.visible.clear();
        self.timers.clear();
        self.in_flight = 0;
        self.delayed = 0;
    }
}

#[derive(Debug)]
struct Queue {
    name: String,
    arn: String,
    /// Copy of `cfg.redrive`, readable without the state lock.
    redrive: RwLock<Option<Redrive>>,
    state: Mutex<QueueState>,
    notify: Notify,
}

impl Queue {
    fn new(name: &str, cfg: QueueConfig) -> Self {
        Queue {
            name: name.to_owned(),
            arn: format!("arn:aws:sqs:{REGION}:{ACCOUNT_ID}:{name}"),
            redrive: RwLock::new(cfg.redrive.clone()),
            state: Mutex::new(QueueState::new(cfg)),
            notify: Notify::new(),
        }
    }

    fn set_config(&self, state: &mut QueueState, cfg: QueueConfig) {
        *self.redrive.write().unwrap_or_else(PoisonError::into_inner) = cfg.redrive.clone();
        state.cfg = cfg;
    }

    fn redrive(&self) -> Option<Redrive> {
        self.redrive
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// One queue attribute by name, `None` if unknown or unset.
    fn attribute(&self, state: &QueueState, name: &str) -> Option<String> {
        let counts = state.counts();
        let cfg = &state.cfg;
        Some(match name {
            "QueueArn" => self.arn.clone(),
            "ApproximateNumberOfMessages" => counts.visible.to_string(),
            "ApproximateNumberOfMessagesNotVisible" => counts.in_flight.to_string(),
            "ApproximateNumberOfMessagesDelayed" => counts.delayed.to_string(),
            "CreatedTimestamp" => cfg.created_s.to_string(),
            "LastModifiedTimestamp" => cfg.modified_s.to_string(),
            "VisibilityTimeout" => cfg.visibility_timeout.to_string(),
            "MaximumMessageSize" => cfg.max_message_size.to_string(),
            "MessageRetentionPeriod" => cfg.retention_seconds.to_string(),
            "DelaySeconds" => cfg.delay_seconds.to_string(),
            "ReceiveMessageWaitTimeSeconds" => cfg.wait_seconds.to_string(),
            other => return cfg.extra.get(other).cloned(),
        })
    }
}

const COMPUTED_ATTRIBUTES: [&str; 11] = [
    "QueueArn",
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
    "CreatedTimestamp",
    "LastModifiedTimestamp",
    "VisibilityTimeout",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "DelaySeconds",
    "ReceiveMessageWaitTimeSeconds",
];

const OPTIONAL_ATTRIBUTES: [&str; 6] = [
    "Policy",
    "RedrivePolicy",
    "RedriveAllowPolicy",
    "KmsMasterKeyId",
    "KmsDataKeyReusePeriodSeconds",
    "SqsManagedSseEnabled",
];

// System attributes a receive can ask for.
const SYS_RECEIVE_COUNT: u8 = 1;
const SYS_SENT: u8 = 2;
const SYS_FIRST_RECEIVE: u8 = 4;
const SYS_SENDER_ID: u8 = 8;
const SYS_TRACE: u8 = 16;

fn system_attribute_mask<'a>(names: impl IntoIterator<Item = &'a String>) -> u8 {
    names.into_iter().fold(0, |mask, name| {
        mask | match name.as_str() {
            "All" => 0xff,
            "ApproximateReceiveCount" => SYS_RECEIVE_COUNT,
            "SentTimestamp" => SYS_SENT,
            "ApproximateFirstReceiveTimestamp" => SYS_FIRST_RECEIVE,
            "SenderId" => SYS_SENDER_ID,
            "AWSTraceHeader" => SYS_TRACE,
            _ => 0,
        }
    })
}

/// Which message attributes a receive asked for (`All`, `.*`, names, or
/// `prefix.*`).
enum AttributeSelector {
    None,
    All,
    Some {
        names: HashSet<String>,
        prefixes: Vec<String>,
    },
}

impl AttributeSelector {
    fn new(requested: &[String]) -> Self {
        if requested.is_empty() {
            return AttributeSelector::None;
        }
        if requested.iter().any(|n| n == "All" || n == ".*") {
            return AttributeSelector::All;
        }
        let mut names = HashSet::new();
        let mut prefixes = Vec::new();
        for name in requested {
            match name.strip_suffix(".*") {
                Some(prefix) => prefixes.push(format!("{prefix}.")),
                None => {
                    names.insert(name.clone());
                }
            }
        }
        AttributeSelector::Some { names, prefixes }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            AttributeSelector::None => false,
            AttributeSelector::All => true,
            AttributeSelector::Some { names, prefixes } => {
                names.contains(name) || prefixes.iter().any(|p| name.starts_with(p.as_str()))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The endpoint
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Inner {
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    counters: [AtomicU64; Op::COUNT],
    /// SQS requests as billed: one per 64 KB of request or answer, whichever is larger.
    billed_units: AtomicU64,
    next_seq: AtomicU64,
    next_request_id: AtomicU64,
    /// The EventBridge half of the endpoint.
    events: EventState,
    /// Random per instance, embedded in receipt handles so that a handle from
    /// an earlier run of a standalone server is rejected.
    instance: u32,
    /// Microseconds every PutEvents waits before it is served: the network and service time
    /// of a real region, which loopback does not have (0: none).
    put_events_delay_us: AtomicU64,
}

/// Cloneable handle to the in-memory SQS state. Clones share the same
/// queues and counters.
#[derive(Clone, Debug)]
pub struct BenchSqs {
    inner: Arc<Inner>,
}

impl Default for BenchSqs {
    fn default() -> Self {
        Self::new()
    }
}

impl BenchSqs {
    /// An empty endpoint state: no queues, all counters at zero.
    pub fn new() -> Self {
        BenchSqs {
            inner: Arc::new(Inner {
                queues: RwLock::new(HashMap::new()),
                counters: std::array::from_fn(|_| AtomicU64::new(0)),
                billed_units: AtomicU64::new(0),
                next_seq: AtomicU64::new(1),
                next_request_id: AtomicU64::new(1),
                events: EventState::new(),
                instance: fastrand::u32(..),
                put_events_delay_us: AtomicU64::new(0),
            }),
        }
    }

    /// Makes every PutEvents wait `delay` before it is served (and its events delivered), as
    /// a call to a real region would.
    pub fn set_put_events_delay(&self, delay: Duration) {
        self.inner
            .put_events_delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Request counts per operation since start or the last reset, SQS and
    /// EventBridge.
    pub fn stats(&self) -> Stats {
        self.collect_stats(|counter| counter.load(Ordering::Relaxed))
    }

    /// EventBridge's counters since start or the last reset.
    pub fn event_stats(&self) -> EventStats {
        self.inner
            .events
            .collect(|counter| counter.load(Ordering::Relaxed))
    }

    /// Zeroes the request counters (EventBridge's too).
    pub fn reset_stats(&self) {
        self.take_stats();
    }

    /// [`Self::stats`] with every queue's message counts.
    fn stats_with_queues(&self) -> Stats {
        let mut stats = self.stats();
        let queues: Vec<(String, Arc<Queue>)> = self
            .inner
            .queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, q)| (name.clone(), q.clone()))
            .collect();
        let now = Instant::now();
        for (name, queue) in queues {
            let mut state = lock(&queue.state);
            state.tick(now);
            stats.queues.insert(name, state.counts());
        }
        stats
    }

    /// Returns the counts and zeroes them, losing no concurrent increment.
    fn take_stats(&self) -> Stats {
        self.collect_stats(|counter| counter.swap(0, Ordering::Relaxed))
    }

    fn collect_stats(&self, read: impl Fn(&AtomicU64) -> u64) -> Stats {
        let mut stats = Stats::default();
        for (op, counter) in Op::ALL.iter().zip(&self.inner.counters) {
            let count = read(counter);
            if count > 0 {
                stats.requests.insert(op.name().to_owned(), count);
                stats.total += count;
            }
        }
        stats.billed_units = read(&self.inner.billed_units);
        stats.events = self.inner.events.collect(read);
        stats
    }

    /// Enqueues `bodies` directly, without HTTP, creating `queue` with
    /// default attributes if it does not exist. Messages are visible at once
    /// and have no message attributes.
    pub fn preload(&self, queue: &str, bodies: impl IntoIterator<Item = String>) {
        let queue = self.get_or_create(queue);
        let messages: Vec<Arc<MessageData>> = bodies
            .into_iter()
            .map(|body| Arc::new(MessageData::new(body, Attributes::new(), Attributes::new())))
            .collect();
        let count = u64::try_from(messages.len()).unwrap_or(u64::MAX);
        let first = self.inner.next_seq.fetch_add(count, Ordering::Relaxed);
        let now = Instant::now();
        {
            let mut state = lock(&queue.state);
            state.msgs.reserve(messages.len());
            for (seq, data) in (first..).zip(messages) {
                state.insert(seq, data, Duration::ZERO, now);
            }
        }
        queue.notify.notify_waiters();
    }

    /// Enqueues one message into `queue` as an EventBridge target delivery
    /// does: visible at once, no attributes. False if the queue does not
    /// exist.
    pub(crate) fn deliver(&self, queue: &str, body: String) -> bool {
        let Some(queue) = self.find(queue) else {
            return false;
        };
        let data = Arc::new(MessageData::new(body, Attributes::new(), Attributes::new()));
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let wake = {
            let mut state = lock(&queue.state);
            state.tick(now);
            state.insert(seq, data, Duration::ZERO, now)
        };
        if wake {
            queue.notify.notify_waiters();
        }
        true
    }

    /// Message counts of `queue`, `None` if it does not exist.
    pub fn counts(&self, queue: &str) -> Option<QueueCounts> {
        let queue = self.find(queue)?;
        let mut state = lock(&queue.state);
        state.tick(Instant::now());
        Some(state.counts())
    }

    fn find(&self, name: &str) -> Option<Arc<Queue>> {
        self.inner
            .queues
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn queue(&self, url: &str) -> Result<Arc<Queue>, SqsError> {
        self.find(queue_name_from_url(url))
            .ok_or_else(SqsError::no_queue)
    }

    fn get_or_create(&self, name: &str) -> Arc<Queue> {
        if let Some(queue) = self.find(name) {
            return queue;
        }
        let mut queues = self
            .inner
            .queues
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            queues
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(Queue::new(name, QueueConfig::new()))),
        )
    }

    fn queue_url(base: &str, name: &str) -> String {
        format!("http://{base}/{ACCOUNT_ID}/{name}")
    }

    // --- HTTP ---------------------------------------------------------------

    async fn handle(&self, request: Request<Incoming>, local: SocketAddr) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        if parts.method != Method::POST {
            return error_response(
                &SqsError::new(
                    ErrorKind::UnsupportedOperation,
                    "orderfleet-bench-sqs speaks the AWS JSON 1.0 protocol: POST / with X-Amz-Target.",
                ),
                self.request_id(),
            );
        }
        let body = match Limited::new(body, MAX_REQUEST_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                return error_response(
                    &SqsError::invalid(format!("could not read request body: {err}")),
                    self.request_id(),
                )
            }
        };
        let target = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let host = parts
            .headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| local.to_string(), str::to_owned);
        let result = match target {
            "OrderfleetBench.Stats" => to_json(&self.stats_with_queues()),
            "OrderfleetBench.Reset" => to_json(&self.take_stats()),
            _ => match target.strip_prefix("AmazonSQS.") {
                Some(name) => {
                    let answer = self.call(name, &body, &host).await;
                    let bytes = answer.as_ref().map_or(0, Vec::len).max(body.len());
                    let units = (bytes as u64).div_ceil(64 * 1024).max(1);
                    self.inner.billed_units.fetch_add(units, Ordering::Relaxed);
                    answer
                }
                // Checked after SQS so that the SQS path pays nothing for it.
                None => match target.strip_prefix("AWSEvents.") {
                    Some(name) => {
                        let delay = self.inner.put_events_delay_us.load(Ordering::Relaxed);
                        if name == "PutEvents" && delay > 0 {
                            tokio::time::sleep(Duration::from_micros(delay)).await;
                        }
                        return self
                            .inner
                            .events
                            .respond(self, name, &body, self.request_id());
                    }
                    None => Err(SqsError::new(
                        ErrorKind::UnknownOperation,
                        format!("Unknown X-Amz-Target {target:?}."),
                    )),
                },
            },
        };
        let request_id = self.request_id();
        match result {
            Ok(bytes) => {
                let mut response = Response::new(Full::new(Bytes::from(bytes)));
                let headers = response.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON_CONTENT_TYPE));
                headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), request_id);
                response
            }
            Err(err) => error_response(&err, request_id),
        }
    }

    fn request_id(&self) -> HeaderValue {
        HeaderValue::from(self.inner.next_request_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Counts and runs one `AmazonSQS.<name>` operation on a JSON body.
    /// `host` is the authority used in queue URLs.
    async fn call(&self, name: &str, body: &[u8], host: &str) -> OpResult {
        let op = Op::from_name(name);
        // `Op as usize` is the index of `op` in `Op::ALL` (declaration order).
        self.inner.counters[op as usize].fetch_add(1, Ordering::Relaxed);
        match op {
            Op::CreateQueue => self.create_queue(body, host),
            Op::DeleteQueue => self.delete_queue(body),
            Op::ListQueues => self.list_queues(body, host),
            Op::GetQueueUrl => self.get_queue_url(body, host),
            Op::GetQueueAttributes => self.get_queue_attributes(body),
            Op::SetQueueAttributes => self.set_queue_attributes(body),
            Op::SendMessage => self.send_message(body),
            Op::SendMessageBatch => self.send_message_batch(body),
            Op::ReceiveMessage => self.receive_message(body).await,
            Op::DeleteMessage => self.delete_message(body),
            Op::DeleteMessageBatch => self.delete_message_batch(body),
            Op::ChangeMessageVisibility => self.change_message_visibility(body),
            Op::ChangeMessageVisibilityBatch => self.change_message_visibility_batch(body),
            Op::PurgeQueue => self.purge_queue(body),
            Op::Unknown => Err(SqsError::new(
                ErrorKind::UnknownOperation,
                format!("Operation {name} is not supported by orderfleet-bench-sqs."),
            )),
        }
    }

    // --- Queue operations ---------------------------------------------------

    fn create_queue(&self, body: &[u8], host: &str) -> OpResult {
        let input: CreateQueueInput = parse(body)?;
        let name = input.queue_name;
        if name.ends_with(".fifo") {
            return Err(SqsError::new(
                ErrorKind::UnsupportedOperation,
                "FIFO queues are not supported by orderfleet-bench-sqs.",
            ));
        }
        if !valid_queue_name(&name) {
            return Err(SqsError::invalid(
                "Can only include alphanumeric characters, hyphens, or underscores. 1 to 80 in length",
            ));
        }
        let cfg = QueueConfig::new().with(&input.attributes)?;
        let mut queues = self
            .inner
            .queues
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = queues.get(&name) {
            let state = lock(&existing.state);
            for (key, value) in &input.attributes {
                if existing.attribute(&state, key).as_deref() != Some(value.as_str()) {
                    return Err(SqsError::new(
                        ErrorKind::QueueNameExists,
                        format!("A queue already exists with the same name and a different value for attribute {key}"),
                    ));
                }
            }
        } else {
            queues.insert(name.clone(), Arc::new(Queue::new(&name, cfg)));
        }
        to_json(&json!({ "QueueUrl": Self::queue_url(host, &name) }))
    }

    fn delete_queue(&self, body: &[u8]) -> OpResult {
        let input: QueueUrlInput = parse(body)?;
        let name = queue_name_from_url(&input.queue_url);
        let removed = self
            .inner
            .queues
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        match removed {
            Some(queue) => {
                // Long pollers still hold the queue; let them return now.
                queue.notify.notify_waiters();
                Ok(b"{}".to_vec())
            }
            None => Err(SqsError::no_queue()),
        }
    }

    fn list_queues(&self, body: &[u8], host: &str) -> OpResult {
        let input: ListQueuesInput = parse(body)?;
        let prefix = input.queue_name_prefix.unwrap_or_default();
        let queues = self
            .inner
            .queues
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<&String> = queues.keys().filter(|n| n.starts_with(&prefix)).collect();
        names.sort();
        names.truncate(input.max_results.unwrap_or(1000).min(1000));
        let urls: Vec<String> = names.iter().map(|n| Self::queue_url(host, n)).collect();
        to_json(&json!({ "QueueUrls": urls }))
    }

    fn get_queue_url(&self, body: &[u8], host: &str) -> OpResult {
        let input: GetQueueUrlInput = parse(body)?;
        let queue = self
            .find(&input.queue_name)
            .ok_or_else(SqsError::no_queue)?;
        to_json(&json!({ "QueueUrl": Self::queue_url(host, &queue.name) }))
    }

    fn get_queue_attributes(&self, body: &[u8]) -> OpResult {
        let input: GetQueueAttributesInput = parse(body)?;
        let queue = self.queue(&input.queue_url)?;
        let mut state = lock(&queue.state);
        state.tick(Instant::now());
        let all = input.attribute_names.iter().any(|n| n == "All");
        let mut attributes = BTreeMap::new();
        if all {
            for name in COMPUTED_ATTRIBUTES.iter().chain(&OPTIONAL_ATTRIBUTES) {
                if let Some(value) = queue.attribute(&state, name) {
                    attributes.insert(*name, value);
                }
            }
        } else {
            for name in &input.attribute_names {
                let known = COMPUTED_ATTRIBUTES.contains(&name.as_str())
                    || OPTIONAL_ATTRIBUTES.contains(&name.as_str());
                if !known {
                    return Err(SqsError::new(
                        ErrorKind::InvalidAttributeName,
                        format!("Unknown Attribute {name}."),
                    ));
                }
                if let Some(value) = queue.attribute(&state, name) {
                    attributes.insert(name.as_str(), value);
                }
            }
        }
        drop(state);
        to_json(&json!({ "Attributes": attributes }))
    }

    fn set_queue_attributes(&self, body: &[u8]) -> OpResult {
        let input: SetQueueAttributesInput = parse(body)?;
        let queue = self.queue(&input.queue_url)?;
        let mut state = lock(&queue.state);
        let cfg = state.cfg.with(&input.attributes)?;
        queue.set_config(&mut state, cfg);
        Ok(b"{}".to_vec())
    }

    fn purge_queue(&self, body: &[u8]) -> OpResult {
        let input: QueueUrlInput = parse(body)?;
        let queue = self.queue(&input.queue_url)?;
        lock(&queue.state).purge();
        Ok(b"{}".to_vec())
    }

    // --- Sending ------------------------------------------------------------

    /// Validates one message and builds its shared data.
    fn build_message(
        body: String,
        attributes: Attributes,
        system_attributes: Attributes,
        max_size: u32,
    ) -> Result<MessageData, SqsError> {
        if body.is_empty() {
            return Err(SqsError::new(
                ErrorKind::MissingParameter,
                "The request must contain the parameter MessageBody.",
            ));
        }
        let size = body.len()
            + attributes
                .iter()
                .map(|(name, value)| {
                    name.len()
                        + value.data_type.len()
                        + value.string_value.as_ref().map_or(0, String::len)
                        + value.binary_value.as_ref().map_or(0, |b| b.len() * 3 / 4)
                })
                .sum::<usize>();
        if size > usize::try_from(max_size).unwrap_or(usize::MAX) {
            return Err(SqsError::invalid(format!(
                "One or more parameters are invalid. Reason: Message must be shorter than {max_size} bytes."
            )));
        }
        if !body.chars().all(valid_body_char) {
            return Err(SqsError::new(
                ErrorKind::InvalidMessageContents,
                "Invalid characters found in the message body.",
            ));
        }
        if attributes.len() > MAX_MESSAGE_ATTRIBUTES {
            return Err(SqsError::invalid(format!(
                "Number of message attributes [{}] exceeds the allowed maximum [{MAX_MESSAGE_ATTRIBUTES}].",
                attributes.len()
            )));
        }
        for (name, value) in attributes.iter().chain(&system_attributes) {
            validate_attribute(name, value)?;
        }
        Ok(MessageData::new(body, attributes, system_attributes))
    }

    fn delay(requested: Option<i64>, default: u32) -> Result<Duration, SqsError> {
        let seconds = match requested {
            Some(value) => in_range("DelaySeconds", value, 0, MAX_DELAY_SECONDS)?,
            None => u64::from(default),
        };
        Ok(Duration::from_secs(seconds))
    }

    fn send_message(&self, body: &[u8]) -> OpResult {
        let input: SendMessageInput = parse(body)?;
        let queue = self.queue(&input.queue_url)?;
        let (max_size, default_delay) = {
            let state = lock(&queue.state);
            (state.cfg.max_message_size, state.cfg.delay_seconds)
        };
        let delay = Self::delay(input.delay_seconds, default_delay)?;
        let data = Arc::new(Self::build_message(
            input.message_body,
            input.message_attributes,
            input.message_system_attributes,
            max_size,
        )?);
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let wake = {
            let mut state = lock(&queue.state);
            state.tick(now);
            state.insert(seq, Arc::clone(&data), delay, now)
        };
        if wake {
            queue.notify.notify_waiters();
        }
        to_json(&send_output(&data))
    }

    fn send_message_batch(&self, body: &[u8]) -> OpResult {
        let input: SendMessageBatchInput = parse(body)?;
        let queue = self.queue(&input.queue_url)?;
        check_batch(input.entries.iter().map(|e| e.id.as_str()))?;
        let (max_size, default_delay) = {
            let state = lock(&queue.state);
            (state.cfg.max_message_size, state.cfg.delay_seconds)
        };
        let total: usize = input.entries.iter().map(|e| e.message_body.len()).sum();
        if total > usize::try_from(max_size).unwrap_or(usize::MAX) {
            return Err(SqsError::new(
                ErrorKind::BatchRequestTooLong,
                format!("Batch requests cannot be longer than {max_size} bytes."),
            ));
        }
        let mut accepted = Vec::with_capacity(input.entries.len());
        let mut failed = Vec::new();
        for entry in input.entries {
            let built = Self::delay(entry.delay_seconds, default_delay).and_then(|delay| {
                Self::build_message(
                    entry.message_body,
                    entry.message_attributes,
                    entry.message_system_attributes,
                    max_size,
                )
                .map(|data| (Arc::new(data), delay))
            });
            match built {
                Ok((data, delay)) => accepted.push((entry.id, data, delay)),
                Err(err) => failed.push(BatchFailure::new(&entry.id, err)),
            }
        }
        let count = u64::try_from(accepted.len()).unwrap_or(u64::MAX);
        let first = self.inner.next_seq.fetch_add(count, Ordering::Relaxed);
        let now = Instant::now();
        let mut wake = false;
        {
            let mut state = lock(&queue.state);
            state.tick(now);
            for (seq, (_, data, delay)) in (first..).zip(&accepted) {
                wake |= state.insert(seq, Arc::clone(data), *delay, now);
            }
        }
        if wake {
            queue.notify.notify_waiters();
        }
        let successful = accepted
            .iter()
            .map(|(id, data, _)| SendMessageBatchSuccess {
                id,
                output: send_output(data),
            })
            .collect();
        to_json(&BatchOutput { successful, failed })
    }

    // --- Receiving ----------------------------------------------------------

    async fn receive_message(&self, body: &[u8]) -> OpResult {
        let input: ReceiveMessageInput = parse(body)?;
        let max = in_range(
            "MaxNumberOfMessages",
            input.max_number_of_messages.unwrap_or(1),
            1,
            i64::try_from(MAX_BATCH_ENTRIES).unwrap_or(10),
        )?;
        let max = usize::try_from(max).unwrap_or(MAX_BATCH_ENTRIES);
        let visibility = input
            .visibility_timeout
            .map(|v| in_range("VisibilityTimeout", v, 0, MAX_VISIBILITY_TIMEOUT))
            .transpose()?;
        let wait = input
            .wait_time_seconds
            .map(|v| in_range("WaitTimeSeconds", v, 0, MAX_WAIT_SECONDS))
            .transpose()?;
        let queue = self.queue(&input.queue_url)?;
        let dead_letter = queue
            .redrive()
            .and_then(|policy| Some((self.find(&policy.target)?, policy.max_receive_count)));
        let redrive_max = dead_letter.as_ref().map(|(_, max)| *max);

        let start = Instant::now();
        let mut wait_until: Option<Instant> = None;
        let mut taken = Vec::with_capacity(max);
        let mut dead = Vec::new();
        loop {
            // Register interest before looking, so that a send between the
            // look and the wait still wakes this receive.
            let notified = queue.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let (wake, next_due, default_wait) = {
                let mut state = lock(&queue.state);
                let mut wake = state.tick(now);
                let seconds = visibility.unwrap_or(u64::from(state.cfg.visibility_timeout));
                wake |= state.take(
                    now,
                    max,
                    Duration::from_secs(seconds),
                    redrive_max,
                    &mut taken,
                    &mut dead,
                );
                (wake, state.next_due(), state.cfg.wait_seconds)
            };
            if wake {
                queue.notify.notify_waiters();
            }
            if let Some((target, _)) = &dead_letter {
                if !dead.is_empty() {
                    self.dead_letter(target, &mut dead);
                }
            }
            if !taken.is_empty() {
                break;
            }
            let until = *wait_until.get_or_insert_with(|| {
                start + Duration::from_secs(wait.unwrap_or(u64::from(default_wait)))
            });
            if now >= until {
                break;
            }
            let wake_at = next_due.map_or(until, |due| due.min(until));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake_at.into()) => {}
            }
        }
        self.render_received(&input, &taken)
    }

    fn dead_letter(&self, target: &Queue, dead: &mut Vec<(u64, Arc<MessageData>)>) {
        let now = Instant::now();
        {
            let mut state = lock(&target.state);
            for (seq, data) in dead.drain(..) {
                state.insert(seq, data, Duration::ZERO, now);
            }
        }
        target.notify.notify_waiters();
    }

    fn render_received(&self, input: &ReceiveMessageInput, taken: &[Taken]) -> OpResult {
        let mask = system_attribute_mask(
            input
                .attribute_names
                .iter()
                .chain(&input.message_system_attribute_names),
        );
        let selector = AttributeSelector::new(&input.message_attribute_names);
        let messages = taken
            .iter()
            .map(|t| {
                let data = &*t.data;
                let mut attributes = BTreeMap::new();
                if mask & SYS_RECEIVE_COUNT != 0 {
                    attributes.insert("ApproximateReceiveCount", t.receive_count.to_string());
                }
                if mask & SYS_SENT != 0 {
                    attributes.insert("SentTimestamp", data.sent_ms.to_string());
                }
                if mask & SYS_FIRST_RECEIVE != 0 {
                    attributes.insert(
                        "ApproximateFirstReceiveTimestamp",
                        t.first_receive_ms.to_string(),
                    );
                }
                if mask & SYS_SENDER_ID != 0 {
                    attributes.insert("SenderId", ACCOUNT_ID.to_owned());
                }
                if mask & SYS_TRACE != 0 {
                    if let Some(trace) = data.trace_header() {
                        attributes.insert("AWSTraceHeader", trace.to_owned());
                    }
                }
                let (message_attributes, md5_of_message_attributes) = match &selector {
                    AttributeSelector::None => (BTreeMap::new(), None),
                    AttributeSelector::All => (
                        data.attributes
                            .iter()
                            .map(|(k, v)| (k.as_str(), v))
                            .collect(),
                        data.md5_of_attributes.clone(),
                    ),
                    selector => {
                        let chosen: Vec<(&String, &AttributeValue)> = data
                            .attributes
                            .iter()
                            .filter(|(name, _)| selector.matches(name))
                            .collect();
                        let md5 = md5_of_attributes(chosen.iter().copied());
                        (
                            chosen.into_iter().map(|(k, v)| (k.as_str(), v)).collect(),
                            md5,
                        )
                    }
                };
                OutMessage {
                    message_id: &data.id,
                    receipt_handle: format_handle(self.inner.instance, t.handle),
                    md5_of_body: &data.md5_of_body,
                    body: &data.body,
                    attributes,
                    md5_of_message_attributes,
                    message_attributes,
                }
            })
            .collect();
        to_json(&ReceiveMessageOutput { messages })
    }

    // --- Deleting and visibility ---------------------------------------------

    fn delete_message(&self, body: &[u8]) -> OpResult {
        let input: DeleteMessageInput = parse(body)?;
        let queue = self.queue(&input.queue_url)?;
        let handle = parse_handle(self.inner.instance, &input.receipt_handle)
            .ok_or_else(|| invalid_handle(&input.receipt_handle))?;
        lock(&queue.state).delete(handle);
        Ok(b"{}".to_vec())
    }

    fn delete_message_batch(&self, body: &[u8]) -> OpResult {
        let input: DeleteMessageBatchInput = parse(body)?;
        let queue = self.queue(&input.queue_url)?;
        check_batch(input.entries.iter().map(|e| e.id.as_str()))?;
        let mut successful = Vec::with_capacity(input.entries.len());
        let mut failed = Vec::new();
        {
            let mut state = lock(&queue.state);
            for entry in &input.entries {
                match parse_handle(self.inner.instance, &entry.receipt_handle) {
                    Some(handle) => {
                        state.delete(handle);
                        successful.push(BatchIdOnly { id: &entry.id });
                    }
                    None => failed.push(BatchFailure::new(
                        &entry.id,
                        invalid_handle(&entry.receipt_handle),
                    )),
                }
            }
        }
        to_json(&BatchOutput { successful, failed })
    }

    fn change_message_visibility(&self, body: &[u8]) -> OpResult {
        let input: ChangeVisibilityInput = parse(body)?;
        let queue = self.queue(&input.queue_url)?;
        let seconds = in_range(
            "VisibilityTimeout",
            input.visibility_timeout,
            0,
            MAX_VISIBILITY_TIMEOUT,
        )?;
        let handle = parse_handle(self.inner.instance, &input.receipt_handle)
            .ok_or_else(|| invalid_handle(&input.receipt_handle))?;
        let wake = lock(&queue.state).change_visibility(
            handle,
            &input.receipt_handle,
            Duration::from_secs(seconds),
            Instant::now(),
        )?;
        if wake {
            queue.notify.notify_waiters();
        }
        Ok(b"{}".to_vec())
    }

    fn change_message_visibility_batch(&self, body: &[u8]) -> OpResult {
        let input: ChangeVisibilityBatchInput = parse(body)?;
        let queue = self.queue(&input.queue_url)?;
        check_batch(input.entries.iter().map(|e| e.id.as_str()))?;
        let mut successful = Vec::with_capacity(input.entries.len());
        let mut failed = Vec::new();
        let mut wake = false;
        let now = Instant::now();
        {
            let mut state = lock(&queue.state);
            for entry in &input.entries {
                let result = in_range(
                    "VisibilityTimeout",
                    entry.visibility_timeout,
                    0,
                    MAX_VISIBILITY_TIMEOUT,
                )
                .and_then(|seconds| {
                    let handle = parse_handle(self.inner.instance, &entry.receipt_handle)
                        .ok_or_else(|| invalid_handle(&entry.receipt_handle))?;
                    state.change_visibility(
                        handle,
                        &entry.receipt_handle,
                        Duration::from_secs(seconds),
                        now,
                    )
                });
                match result {
                    Ok(woke) => {
                        wake |= woke;
                        successful.push(BatchIdOnly { id: &entry.id });
                    }
                    Err(err) => failed.push(BatchFailure::new(&entry.id, err)),
                }
            }
        }
        if wake {
            queue.notify.notify_waiters();
        }
        to_json(&BatchOutput { successful, failed })
    }
}

fn send_output(data: &MessageData) -> SendMessageOutput<'_> {
    SendMessageOutput {
        message_id: &data.id,
        md5_of_message_body: &data.md5_of_body,
        md5_of_message_attributes: data.md5_of_attributes.as_deref(),
        md5_of_message_system_attributes: data.md5_of_system_attributes.as_deref(),
    }
}

fn validate_attribute(name: &str, value: &AttributeValue) -> Result<(), SqsError> {
    if name.is_empty() || name.len() > 256 {
        return Err(SqsError::invalid(
            "Message attribute name must be 1 to 256 characters.",
        ));
    }
    let base = value.data_type.split('.').next().unwrap_or_default();
    match base {
        "String" | "Number" if value.string_value.is_some() => Ok(()),
        "Binary"
            if value
                .binary_value
                .as_deref()
                .is_some_and(|b| base64_decode(b).is_some()) =>
        {
            Ok(())
        }
        "String" | "Number" | "Binary" => Err(SqsError::invalid(format!(
            "Message attribute '{name}' must contain a non-empty value of type '{}'.",
            value.data_type
        ))),
        _ => Err(SqsError::invalid(format!(
            "The type of message attribute '{name}' is invalid. You must use only the following supported type prefixes: Binary, Number, String."
        ))),
    }
}

/// Request-level batch checks: 1..=10 entries, valid and distinct ids.
fn check_batch<'a>(ids: impl ExactSizeIterator<Item = &'a str>) -> Result<(), SqsError> {
    match ids.len() {
        0 => {
            return Err(SqsError::new(
                ErrorKind::EmptyBatchRequest,
                "There should be at least one entry in the request.",
            ))
        }
        n if n > MAX_BATCH_ENTRIES => {
            return Err(SqsError::new(
                ErrorKind::TooManyEntriesInBatchRequest,
                format!(
                "Maximum number of entries per request are {MAX_BATCH_ENTRIES}. You have sent {n}."
            ),
            ))
        }
        _ => {}
    }
    let mut seen = HashSet::new();
    for id in ids {
        if !valid_batch_id(id) {
            return Err(SqsError::new(
                ErrorKind::InvalidBatchEntryId,
                "A batch entry id can only contain alphanumeric characters, hyphens and underscores. It can be at most 80 letters long.",
            ));
        }
        if !seen.insert(id) {
            return Err(SqsError::new(
                ErrorKind::BatchEntryIdsNotDistinct,
                format!("Id {id} repeated."),
            ));
        }
    }
    Ok(())
}

fn error_response(err: &SqsError, request_id: HeaderValue) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(err.body())));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON_CONTENT_TYPE));
    headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), request_id);
    // Query codes are ASCII constants, so this conversion cannot fail; an
    // error would only drop the header.
    if let Ok(value) = HeaderValue::from_str(&format!("{};Sender", err.kind.query_code())) {
        headers.insert(HeaderName::from_static(QUERY_ERROR_HEADER), value);
    }
    response
}

/// Serves the endpoint on `listener` until `shutdown` completes.
///
/// One task per connection, HTTP/1.1 with keep-alive, `TCP_NODELAY` set.
/// On shutdown the accept loop stops and open connections are closed after
/// their current request (a pending long poll runs to its end).
pub async fn serve(
    listener: TcpListener,
    state: BenchSqs,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    // Dropping the sender tells every connection to shut down gracefully.
    let (stop_tx, stop_rx) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(%err, "bench-sqs accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Best effort: without it small responses wait for delayed ACKs.
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.handle(request, local).await) }
            });
            let connection = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(stop_tx);
    Ok(())
}

/// An SQS client for the endpoint at `url` (static test credentials, us-east-1).
pub fn sqs_client(url: &str) -> aws_sdk_sqs::Client {
    use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(Credentials::new("bench", "bench", None, None, "bench"))
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

/// An EventBridge client for the endpoint at `url`, as [`sqs_client`].
pub fn events_client(url: &str) -> aws_sdk_eventbridge::Client {
    use aws_sdk_eventbridge::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_eventbridge::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(Credentials::new("bench", "bench", None, None, "bench"))
        .build();
    aws_sdk_eventbridge::Client::from_conf(config)
}

/// Binds `127.0.0.1:port` (0 = an ephemeral port), starts [`serve`] on a new
/// task and returns the bound address, the shared state and the server task.
/// The server runs until the task is aborted or the runtime shuts down.
pub async fn spawn_local(
    port: u16,
) -> anyhow::Result<(SocketAddr, BenchSqs, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    let addr = listener.local_addr()?;
    let state = BenchSqs::new();
    let server = tokio::spawn({
        let state = state.clone();
        async move {
            if let Err(err) = serve(listener, state, std::future::pending()).await {
                tracing::error!(%err, "bench-sqs server stopped");
            }
        }
    });
    Ok((addr, state, server))
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://localhost/000000000000/q";

    async fn call(sqs: &BenchSqs, op: &str, body: Value) -> Result<Value, SqsError> {
        let bytes = sqs
            .call(op, body.to_string().as_bytes(), "localhost")
            .await?;
        Ok(serde_json::from_slice(&bytes).expect("response is JSON"))
    }

    async fn receive(sqs: &BenchSqs, extra: Value) -> Vec<Value> {
        let mut body = json!({ "QueueUrl": URL, "MaxNumberOfMessages": 10 });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let out = call(sqs, "ReceiveMessage", body).await.expect("receive");
        out.get("Messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    fn handle_of(message: &Value) -> String {
        message["ReceiptHandle"]
            .as_str()
            .expect("handle")
            .to_owned()
    }

    #[test]
    fn md5_of_body_is_the_hex_md5_digest() {
        assert_eq!(md5_hex(b"hello"), "5d41402abc4b2a76b9719d911017c592");
    }

    #[test]
    fn md5_of_attributes_matches_known_sqs_digests() {
        let one: Attributes = [(
            "SellerName".to_owned(),
            AttributeValue {
                data_type: "String".into(),
                string_value: Some("Example Store".into()),
                binary_value: None,
            },
        )]
        .into();
        assert_eq!(
            md5_of_attributes(&one).as_deref(),
            Some("cd28f3b68aeee4b2eac9c66f2f694b58")
        );
        let two: Attributes = [
            (
                "ordinal".to_owned(),
                AttributeValue {
                    data_type: "Number".into(),
                    string_value: Some("1".into()),
                    binary_value: None,
                },
            ),
            (
                "category".to_owned(),
                AttributeValue {
                    data_type: "String".into(),
                    string_value: Some("test".into()),
                    binary_value: None,
                },
            ),
        ]
        .into();
        assert_eq!(
            md5_of_attributes(&two).as_deref(),
            Some("d21ae90c49061e927f57df5f5d72be1f")
        );
        assert_eq!(md5_of_attributes(&Attributes::new()), None);
    }

    #[test]
    fn base64_decodes_padded_and_unpadded_input_and_rejects_garbage() {
        assert_eq!(base64_decode("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(base64_decode("aGVsbG8").as_deref(), Some(&b"hello"[..]));
        assert_eq!(
            base64_decode("AAEC/w==").as_deref(),
            Some(&[0u8, 1, 2, 255][..])
        );
        assert_eq!(base64_decode("a*b"), None);
    }

    #[test]
    fn receipt_handles_round_trip_and_reject_foreign_handles() {
        let handle = Handle { seq: 42, nonce: 7 };
        let text = format_handle(0xabcd, handle);
        assert_eq!(parse_handle(0xabcd, &text), Some(handle));
        assert_eq!(parse_handle(0xabce, &text), None);
        assert_eq!(parse_handle(0xabcd, "AQEB-not-ours"), None);
    }

    #[test]
    fn queue_state_returns_timed_out_messages_and_ignores_stale_timers() {
        let mut state = QueueState::new(QueueConfig::new());
        let t0 = Instant::now();
        let data = Arc::new(MessageData::new(
            "m".into(),
            Attributes::new(),
            Attributes::new(),
        ));
        state.insert(1, data, Duration::ZERO, t0);
        let (mut out, mut dead) = (Vec::new(), Vec::new());
        state.take(t0, 10, Duration::from_secs(5), None, &mut out, &mut dead);
        assert_eq!(out.len(), 1);
        let first = out[0].handle;
        // Extending visibility leaves a stale timer at t0+5s behind.
        state
            .change_visibility(first, "h", Duration::from_secs(10), t0)
            .expect("in flight");
        assert!(!state.tick(t0 + Duration::from_secs(6)));
        assert_eq!(state.counts().in_flight, 1);
        assert!(state.tick(t0 + Duration::from_secs(10)));
        assert_eq!(
            state.counts(),
            QueueCounts {
                visible: 1,
                in_flight: 0,
                delayed: 0
            }
        );
        // The old handle no longer deletes; the new one does.
        out.clear();
        state.take(
            t0 + Duration::from_secs(10),
            10,
            Duration::from_secs(5),
            None,
            &mut out,
            &mut dead,
        );
        assert_eq!(out[0].receive_count, 2);
        state.delete(first);
        assert_eq!(state.counts().in_flight, 1);
        state.delete(out[0].handle);
        assert_eq!(state.counts(), QueueCounts::default());
    }

    #[test]
    fn delayed_messages_become_visible_when_their_delay_passes() {
        let mut state = QueueState::new(QueueConfig::new());
        let t0 = Instant::now();
        let data = Arc::new(MessageData::new(
            "m".into(),
            Attributes::new(),
            Attributes::new(),
        ));
        state.insert(1, data, Duration::from_secs(3), t0);
        assert_eq!(state.counts().delayed, 1);
        state.tick(t0 + Duration::from_secs(2));
        assert_eq!(state.counts().delayed, 1);
        state.tick(t0 + Duration::from_secs(3));
        assert_eq!(state.counts().visible, 1);
    }

    #[test]
    fn stale_timers_are_compacted_away() {
        let mut state = QueueState::new(QueueConfig::new());
        let t0 = Instant::now();
        for seq in 0..10_000 {
            let data = Arc::new(MessageData::new(
                "m".into(),
                Attributes::new(),
                Attributes::new(),
            ));
            state.insert(seq, data, Duration::ZERO, t0);
        }
        let (mut out, mut dead) = (Vec::new(), Vec::new());
        while state.counts().visible > 0 {
            out.clear();
            state.take(t0, 10, Duration::from_secs(30), None, &mut out, &mut dead);
            for taken in &out {
                state.delete(taken.handle);
            }
        }
        state.tick(t0);
        assert!(
            state.timers.len() <= 4096,
            "{} timers left",
            state.timers.len()
        );
    }

    #[tokio::test]
    async fn preloaded_messages_are_received_in_order() {
        let sqs = BenchSqs::new();
        sqs.preload("q", (0..25).map(|i| format!("m{i}")));
        assert_eq!(sqs.counts("q").map(|c| c.visible), Some(25));
        let bodies: Vec<String> = receive(&sqs, json!({}))
            .await
            .iter()
            .map(|m| m["Body"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(bodies, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
        assert_eq!(
            sqs.counts("q"),
            Some(QueueCounts {
                visible: 15,
                in_flight: 10,
                delayed: 0
            })
        );
    }

    #[tokio::test]
    async fn change_visibility_distinguishes_stale_handles_from_visible_messages() {
        let sqs = BenchSqs::new();
        sqs.preload("q", ["m".to_owned()]);
        let first = handle_of(&receive(&sqs, json!({"VisibilityTimeout": 30})).await[0]);
        let change = |handle: String, timeout: i64| {
            let sqs = sqs.clone();
            async move {
                call(
                    &sqs,
                    "ChangeMessageVisibility",
                    json!({"QueueUrl": URL, "ReceiptHandle": handle, "VisibilityTimeout": timeout}),
                )
                .await
            }
        };
        change(first.clone(), 0).await.expect("in flight");
        let err = change(first.clone(), 0).await.expect_err("visible again");
        assert_eq!(err.kind, ErrorKind::MessageNotInflight);
        let second = handle_of(&receive(&sqs, json!({})).await[0]);
        assert_ne!(first, second);
        let err = change(first.clone(), 10).await.expect_err("stale");
        assert_eq!(err.kind, ErrorKind::ReceiptHandleIsInvalid);
        let err = change("garbage".into(), 10).await.expect_err("garbage");
        assert_eq!(err.kind, ErrorKind::ReceiptHandleIsInvalid);
        // A stale delete succeeds and keeps the message.
        call(
            &sqs,
            "DeleteMessage",
            json!({"QueueUrl": URL, "ReceiptHandle": first}),
        )
        .await
        .expect("stale delete succeeds");
        assert_eq!(sqs.counts("q").map(|c| c.in_flight), Some(1));
        call(
            &sqs,
            "DeleteMessage",
            json!({"QueueUrl": URL, "ReceiptHandle": second}),
        )
        .await
        .expect("delete");
        assert_eq!(sqs.counts("q"), Some(QueueCounts::default()));
    }

    #[tokio::test]
    async fn redrive_moves_a_message_to_the_dead_letter_queue_after_max_receives() {
        let sqs = BenchSqs::new();
        call(&sqs, "CreateQueue", json!({"QueueName": "dlq"}))
            .await
            .expect("dlq");
        let policy = json!({
            "deadLetterTargetArn": "arn:aws:sqs:us-east-1:000000000000:dlq",
            "maxReceiveCount": "2",
        })
        .to_string();
        call(
            &sqs,
            "CreateQueue",
            json!({"QueueName": "q", "Attributes": {"RedrivePolicy": policy}}),
        )
        .await
        .expect("q");
        sqs.preload("q", ["poison".to_owned()]);
        for _ in 0..2 {
            let got = receive(&sqs, json!({"VisibilityTimeout": 0})).await;
            assert_eq!(got.len(), 1);
        }
        assert!(receive(&sqs, json!({})).await.is_empty());
        assert_eq!(sqs.counts("q"), Some(QueueCounts::default()));
        assert_eq!(sqs.counts("dlq").map(|c| c.visible), Some(1));
    }

    #[tokio::test]
    async fn batch_requests_are_validated_before_any_entry_runs() {
        let sqs = BenchSqs::new();
        sqs.preload("q", []);
        let entry = |id: &str| json!({"Id": id, "MessageBody": "x"});
        let err = call(
            &sqs,
            "SendMessageBatch",
            json!({"QueueUrl": URL, "Entries": []}),
        )
        .await
        .expect_err("empty");
        assert_eq!(err.kind, ErrorKind::EmptyBatchRequest);
        let err = call(
            &sqs,
            "SendMessageBatch",
            json!({"QueueUrl": URL, "Entries": [entry("a"), entry("a")]}),
        )
        .await
        .expect_err("duplicate");
        assert_eq!(err.kind, ErrorKind::BatchEntryIdsNotDistinct);
        let eleven: Vec<Value> = (0..11).map(|i| entry(&format!("e{i}"))).collect();
        let err = call(
            &sqs,
            "SendMessageBatch",
            json!({"QueueUrl": URL, "Entries": eleven}),
        )
        .await
        .expect_err("too many");
        assert_eq!(err.kind, ErrorKind::TooManyEntriesInBatchRequest);
        assert_eq!(sqs.counts("q"), Some(QueueCounts::default()));
    }

    #[tokio::test]
    async fn stats_count_each_operation_and_reset_returns_and_zeroes_them() {
        let sqs = BenchSqs::new();
        call(&sqs, "CreateQueue", json!({"QueueName": "q"}))
            .await
            .expect("create");
        receive(&sqs, json!({})).await;
        receive(&sqs, json!({})).await;
        let _ = call(&sqs, "Nope", json!({})).await;
        let stats = sqs.stats();
        assert_eq!(stats.get("CreateQueue"), 1);
        assert_eq!(stats.get("ReceiveMessage"), 2);
        assert_eq!(stats.get("Unknown"), 1);
        assert_eq!(stats.total, 4);
        assert_eq!(sqs.take_stats(), stats);
        assert_eq!(sqs.stats(), Stats::default());
    }

    #[tokio::test]
    async fn fifo_queues_are_refused() {
        let sqs = BenchSqs::new();
        let err = call(&sqs, "CreateQueue", json!({"QueueName": "q.fifo"}))
            .await
            .expect_err("fifo");
        assert_eq!(err.kind, ErrorKind::UnsupportedOperation);
    }
}
