//! One dead-lettered message as the operator sees it: the raw SQS message plus what can be
//! read from it — the EventBridge envelope in its body (when the body is one) and the failure
//! the worker recorded in its message attributes ([`crate::sqs::attrs`]).

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::sqs::attrs;

/// A received message with its decoded envelope, if the body is a JSON object.
#[derive(Debug, Clone)]
pub struct DlqMessage {
    pub message: Message,
    /// The body parsed as JSON, when it is an object. Poison bodies have none.
    pub event: Option<Value>,
}

impl DlqMessage {
    pub fn new(message: Message) -> Self {
        let event = message
            .body()
            .and_then(|b| serde_json::from_str::<Value>(b).ok())
            .filter(Value::is_object);
        DlqMessage { message, event }
    }

    pub fn id(&self) -> &str {
        self.message.message_id().unwrap_or_default()
    }

    pub fn receipt(&self) -> Option<&str> {
        self.message.receipt_handle()
    }

    pub fn body(&self) -> &str {
        self.message.body().unwrap_or_default()
    }

    fn envelope_str(&self, field: &str) -> Option<&str> {
        self.event.as_ref()?.get(field)?.as_str()
    }

    /// The EventBridge event id (`id`).
    pub fn event_id(&self) -> Option<&str> {
        self.envelope_str("id")
    }

    pub fn source(&self) -> Option<&str> {
        self.envelope_str("source")
    }

    pub fn detail_type(&self) -> Option<&str> {
        self.envelope_str("detail-type")
    }

    /// The event's `detail`, when the body is an envelope.
    pub fn detail(&self) -> Option<&Value> {
        self.event.as_ref()?.get("detail")
    }

    /// The string value of a message attribute.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.message.message_attributes()?.get(name)?.string_value()
    }

    /// The failure kind the worker recorded: `permanent`, `poison` or `exhausted`.
    pub fn kind(&self) -> Option<&str> {
        self.attr(attrs::KIND)
    }

    pub fn reason(&self) -> Option<&str> {
        self.attr(attrs::REASON)
    }

    pub fn handler(&self) -> Option<&str> {
        self.attr(attrs::HANDLER)
    }

    /// How many receives the work queue made before the worker gave up on the message.
    pub fn failed_after(&self) -> Option<u32> {
        self.attr(attrs::RECEIVE_COUNT)?.parse().ok()
    }

    fn system(&self, name: MessageSystemAttributeName) -> Option<&str> {
        self.message.attributes()?.get(&name).map(String::as_str)
    }

    /// SQS's ApproximateReceiveCount in the queue being read, including the receive that
    /// returned this copy.
    pub fn receive_count(&self) -> u32 {
        attrs::receive_count(&self.message)
    }

    /// When the message was sent to the queue being read (SQS's SentTimestamp). For a message
    /// the worker dead-lettered, that is when it failed.
    pub fn sent_at(&self) -> Option<DateTime<Utc>> {
        let ms: i64 = self
            .system(MessageSystemAttributeName::SentTimestamp)?
            .parse()
            .ok()?;
        Utc.timestamp_millis_opt(ms).single()
    }

    /// Seconds since [`Self::sent_at`].
    pub fn age_secs(&self, now: DateTime<Utc>) -> Option<i64> {
        Some((now - self.sent_at()?).num_seconds().max(0))
    }

    /// What `dlq peek` shows for the message.
    pub fn summary(&self, now: DateTime<Utc>) -> Summary {
        Summary {
            message_id: self.id().to_string(),
            event_id: self.event_id().map(str::to_string),
            source: self.source().map(str::to_string),
            detail_type: self.detail_type().map(str::to_string),
            kind: self.kind().map(str::to_string),
            reason: self.reason().map(str::to_string),
            handler: self.handler().map(str::to_string),
            failed_after_receives: self.failed_after(),
            receive_count: self.receive_count(),
            age_secs: self.age_secs(now),
            sent_at: self.sent_at(),
            body: self.body().to_string(),
        }
    }
}

/// The operator's view of one message, as printed by `dlq peek --json` and in dry-run samples.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub message_id: String,
    pub event_id: Option<String>,
    pub source: Option<String>,
    pub detail_type: Option<String>,
    pub kind: Option<String>,
    pub reason: Option<String>,
    pub handler: Option<String>,
    /// Receives in the work queue before the worker dead-lettered it.
    pub failed_after_receives: Option<u32>,
    /// ApproximateReceiveCount in the DLQ, including this read.
    pub receive_count: u32,
    pub age_secs: Option<i64>,
    pub sent_at: Option<DateTime<Utc>>,
    pub body: String,
}

/// Formats seconds as a short age: `42s`, `7m`, `3h`, `2d`.
pub fn format_age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
