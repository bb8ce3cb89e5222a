//! Amazon SES's email events, as they arrive through EventBridge: a configuration set with an
//! EventBridge event destination puts them on the account's default bus with source `aws.ses`,
//! and a rule there ([`crate::infra::topology::Topology::external_rules`]) routes the two this
//! fleet acts on into the notifications queue.
//!
//! | detail-type | `detail.eventType` | what notifications does |
//! |---|---|---|
//! | `Email Bounced` | `Bounce` | `bounceType` `Permanent`: suppress every bounced recipient; otherwise (`Transient`, `Undetermined`) count it |
//! | `Email Complaint Received` | `Complaint` | suppress every complained recipient |
//!
//! The `detail` is SES's event record: `eventType`, `mail` (`messageId`, `timestamp`,
//! `destination`, headers, `tags`), and `bounce` (`bounceType`, `bounceSubType`,
//! `bouncedRecipients[].emailAddress`, ...) or `complaint` (`complainedRecipients[]`,
//! `complaintFeedbackType`, ...). Only the fields used here are decoded; the rest is ignored.
//!
//! The dedup key ([`event_key`]) is SES's `feedbackId` of the report, else the message's
//! `mail.messageId`, paired with the detail-type by the inbox: one bounce report is one event
//! however often EventBridge delivers it (each delivery with a new EventBridge id).

use serde::Deserialize;
use serde_json::Value;

use crate::domain::envelope::Envelope;
use crate::domain::outcome::HandlerError;

/// The `source` of SES's events on the default bus.
pub const SOURCE: &str = "aws.ses";
/// A bounce (hard; soft ones only once SES has given up retrying).
pub const BOUNCED: &str = "Email Bounced";
/// A recipient marked the email as spam.
pub const COMPLAINT: &str = "Email Complaint Received";
/// The configuration set's tag SES puts on every event it publishes (`mail.tags`).
pub const CONFIGURATION_SET_TAG: &str = "ses:configuration-set";

/// One SES email event, as far as notifications reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SesEvent {
    pub event_type: String,
    pub mail: Mail,
    #[serde(default)]
    pub bounce: Option<Bounce>,
    #[serde(default)]
    pub complaint: Option<Complaint>,
}

/// The email the event is about.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mail {
    /// SES's id of the message (what SendEmail returned).
    pub message_id: String,
    #[serde(default)]
    pub timestamp: Option<String>,
}

/// `bounce`: who bounced, and how badly.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bounce {
    /// `Permanent`, `Transient` or `Undetermined`.
    pub bounce_type: String,
    #[serde(default)]
    pub bounce_sub_type: Option<String>,
    pub bounced_recipients: Vec<Recipient>,
    #[serde(default)]
    pub feedback_id: Option<String>,
}

/// `complaint`: who complained.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Complaint {
    pub complained_recipients: Vec<Recipient>,
    #[serde(default)]
    pub complaint_feedback_type: Option<String>,
    #[serde(default)]
    pub feedback_id: Option<String>,
}

/// A recipient SES reports on.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recipient {
    pub email_address: String,
}

/// What an SES event means for the suppression list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    /// A permanent bounce: suppress these addresses.
    PermanentBounce {
        recipients: Vec<String>,
        sub_type: Option<String>,
    },
    /// A transient or undetermined bounce: count, do not suppress.
    TransientBounce {
        recipients: Vec<String>,
        bounce_type: String,
    },
    /// A complaint: suppress these addresses.
    Complaint {
        recipients: Vec<String>,
        feedback_type: Option<String>,
    },
}

impl SesEvent {
    /// Decodes `event.detail`. A detail that does not match SES's shape is poison: no retry
    /// can fix it.
    pub fn decode(event: &Envelope) -> Result<SesEvent, HandlerError> {
        let ses = SesEvent::deserialize(&event.detail).map_err(|e| {
            HandlerError::poison(format!(
                "{} detail is not an SES event record: {e}",
                event.detail_type
            ))
        })?;
        Ok(ses)
    }

    /// What the event says about deliverability.
    pub fn feedback(&self) -> Result<Feedback, HandlerError> {
        let addresses = |rs: &[Recipient]| -> Vec<String> {
            rs.iter()
                .map(|r| r.email_address.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect()
        };
        match (self.event_type.as_str(), &self.bounce, &self.complaint) {
            ("Bounce", Some(b), _) if b.bounce_type == "Permanent" => {
                Ok(Feedback::PermanentBounce {
                    recipients: addresses(&b.bounced_recipients),
                    sub_type: b.bounce_sub_type.clone(),
                })
            }
            ("Bounce", Some(b), _) => Ok(Feedback::TransientBounce {
                recipients: addresses(&b.bounced_recipients),
                bounce_type: b.bounce_type.clone(),
            }),
            ("Complaint", _, Some(c)) => Ok(Feedback::Complaint {
                recipients: addresses(&c.complained_recipients),
                feedback_type: c.complaint_feedback_type.clone(),
            }),
            (other, _, _) => Err(HandlerError::poison(format!(
                "SES event of type {other:?} without its bounce or complaint object"
            ))),
        }
    }
}

/// The dedup key of an SES event: SES's `feedbackId` of the bounce or complaint report when
/// present, else the message's `mail.messageId` (the inbox pairs the key with the
/// detail-type, so a bounce and a complaint of one message are two events). `None` when the
/// detail has neither (then the EventBridge id is used).
pub fn event_key(detail: &Value) -> Option<&str> {
    detail
        .pointer("/bounce/feedbackId")
        .or_else(|| detail.pointer("/complaint/feedbackId"))
        .or_else(|| detail.pointer("/mail/messageId"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(detail_type: &str, detail: Value) -> Envelope {
        serde_json::from_value(json!({
            "id": "eb-1", "source": SOURCE, "detail-type": detail_type,
            "time": "2026-12-06T10:00:00Z", "detail": detail
        }))
        .unwrap()
    }

    #[test]
    fn a_permanent_bounce_suppresses_and_a_transient_one_does_not() {
        let hard = json!({
            "eventType": "Bounce",
            "mail": {"messageId": "m-1", "timestamp": "2026-12-06T09:59:00Z", "destination": ["ada@example.com"]},
            "bounce": {"bounceType": "Permanent", "bounceSubType": "General", "feedbackId": "f-1",
                       "bouncedRecipients": [{"emailAddress": "ada@example.com", "status": "5.1.1"}]}
        });
        let ev = SesEvent::decode(&envelope(BOUNCED, hard.clone())).unwrap();
        assert_eq!(
            ev.feedback().unwrap(),
            Feedback::PermanentBounce {
                recipients: vec!["ada@example.com".into()],
                sub_type: Some("General".into())
            }
        );
        assert_eq!(event_key(&hard), Some("f-1"));
        let mut soft = hard;
        soft["bounce"]["bounceType"] = json!("Transient");
        let ev = SesEvent::decode(&envelope(BOUNCED, soft)).unwrap();
        assert!(matches!(
            ev.feedback().unwrap(),
            Feedback::TransientBounce { .. }
        ));
    }

    #[test]
    fn a_complaint_suppresses_and_a_stray_shape_is_poison() {
        let detail = json!({
            "eventType": "Complaint", "mail": {"messageId": "m-2"},
            "complaint": {"complainedRecipients": [{"emailAddress": "bob@example.com"}], "complaintFeedbackType": "abuse"}
        });
        let ev = SesEvent::decode(&envelope(COMPLAINT, detail.clone())).unwrap();
        assert!(matches!(ev.feedback().unwrap(), Feedback::Complaint { .. }));
        assert_eq!(event_key(&detail), Some("m-2"));
        let err =
            SesEvent::decode(&envelope(COMPLAINT, json!({"eventType": "Complaint"}))).unwrap_err();
        assert_eq!(err.kind(), "poison");
        let ev = SesEvent::decode(&envelope(
            COMPLAINT,
            json!({"eventType": "Complaint", "mail": {"messageId": "m"}}),
        ))
        .unwrap();
        assert_eq!(ev.feedback().unwrap_err().kind(), "poison");
    }
}
