//! The EventBridge envelope: what an SQS message body looks like when a rule delivers an event,
//! and how the fleet tells one logical event from a redelivered copy.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::outcome::HandlerError;
use crate::domain::platform::Platform;

/// An EventBridge event as delivered to an SQS target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    #[serde(default = "default_version")]
    pub version: String,
    /// EventBridge's id for this delivery of the event.
    pub id: String,
    pub source: String,
    #[serde(rename = "detail-type")]
    pub detail_type: String,
    pub time: DateTime<Utc>,
    #[serde(default)]
    pub account: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub resources: Vec<String>,
    pub detail: Value,
}

fn default_version() -> String {
    "0".into()
}

impl Envelope {
    /// Decodes an SQS message body. Anything that is not an EventBridge event with an object
    /// `detail` is poison: no retry can fix it.
    pub fn decode(body: &str) -> Result<Envelope, HandlerError> {
        let env: Envelope = serde_json::from_str(body)
            .map_err(|e| HandlerError::poison(format!("body is not an EventBridge event: {e}")))?;
        if env.id.is_empty() {
            return Err(HandlerError::poison("event has an empty id"));
        }
        if !env.detail.is_object() {
            return Err(HandlerError::poison("event detail is not a JSON object"));
        }
        Ok(env)
    }

    /// The key that identifies this logical event across redeliveries.
    ///
    /// Events the fleet publishes carry their outbox id as `detail.event_id`: the relay
    /// publishes at least once, and EventBridge gives every PutEvents call a new `id`, so two
    /// publications of one outbox row must still count as one event. Events from elsewhere
    /// fall back to EventBridge's `id`. The inbox pairs the key with the detail-type, so a
    /// producer that reuses one id across detail-types still has each counted. A commerce
    /// platform's event (from its partner event source) is keyed by the platform's own id
    /// ([`Platform::event_key`]): the platform redelivers a webhook under the same id. An SES
    /// email event is keyed by SES's own ids ([`crate::domain::ses::event_key`]).
    pub fn event_key(&self) -> &str {
        if let Some(key) = Platform::of_source(&self.source).and_then(|p| p.event_key(&self.detail))
        {
            return key;
        }
        if self.source == crate::domain::ses::SOURCE {
            if let Some(key) = crate::domain::ses::event_key(&self.detail) {
                return key;
            }
        }
        self.detail
            .get("event_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.id)
    }

    /// `detail.order_id`, when the event concerns an order (for logs).
    pub fn order_id(&self) -> Option<&str> {
        self.detail.get("order_id").and_then(Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(detail: &str) -> String {
        format!(
            r#"{{"version":"0","id":"eb-1","detail-type":"StockReceived","source":"s","account":"1","time":"2026-01-02T03:04:05Z","region":"us-east-1","resources":[],"detail":{detail}}}"#
        )
    }

    #[test]
    fn fleet_events_are_keyed_by_their_outbox_id() {
        let env = Envelope::decode(&body(r#"{"event_id":"ob-7"}"#)).unwrap();
        assert_eq!(env.event_key(), "ob-7");
        let env = Envelope::decode(&body(r#"{"sku":"x"}"#)).unwrap();
        assert_eq!(env.event_key(), "eb-1");
    }

    #[test]
    fn undecodable_bodies_are_poison() {
        for bad in ["not json", "{}", &body("[1]"), r#"{"id":"x"}"#] {
            let err = Envelope::decode(bad).unwrap_err();
            assert_eq!(err.kind(), "poison", "{bad}");
        }
    }
}
