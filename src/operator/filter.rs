//! `--filter EXPR`: which dead-lettered messages a redrive, peek, dry run or export touches.
//!
//! Grammar: `KEY OP VALUE`, where OP is `=`, `!=`, `~` (contains), `>` or `<`, and KEY is one of
//!
//! | key | what it reads | operators |
//! |---|---|---|
//! | `detail-type` | the envelope's `detail-type` | `=` `!=` `~` |
//! | `source` | the envelope's `source` | `=` `!=` `~` |
//! | `kind` | the failure kind the worker recorded (`permanent`, `poison`, `exhausted`) | `=` `!=` `~` |
//! | `reason` | the failure reason the worker recorded | `=` `!=` `~` |
//! | `receive_count` | receives before the worker gave up (`orderfleet.failure.receive_count`), else SQS's ApproximateReceiveCount | all |
//! | `age` | time since the message entered the queue; `90`, `90s`, `15m`, `2h`, `3d` | `>` `<` |
//! | `detail.<path>` | a field of the event's detail; dots walk objects, numbers index arrays | all |
//!
//! Several filters must all match. A message without the field (a poison body has no
//! `detail-type`) matches only `!=`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::message::DlqMessage;

/// The keys a filter can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    DetailType,
    Source,
    Kind,
    Reason,
    ReceiveCount,
    Age,
    /// A dot path into the event's detail.
    Detail(Vec<String>),
}

impl Key {
    fn numeric(&self) -> bool {
        matches!(self, Key::ReceiveCount | Key::Age | Key::Detail(_))
    }

    fn textual(&self) -> bool {
        !matches!(self, Key::ReceiveCount | Key::Age)
    }
}

/// A filter's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Contains,
    Gt,
    Lt,
}

/// One parsed `--filter`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub key: Key,
    pub op: Op,
    pub value: String,
    /// The value as a number (seconds for `age`), for numeric comparisons.
    number: Option<f64>,
    raw: String,
}

const KEYS_HELP: &str =
    "detail-type, source, kind, reason, receive_count, age, detail.<path> (e.g. detail.order_id)";
const OPS_HELP: &str = "KEY=VALUE, KEY!=VALUE, KEY~SUBSTRING, KEY>N or KEY<N";

impl FromStr for Filter {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let at = raw
            .find(['=', '!', '~', '>', '<'])
            .ok_or_else(|| format!("filter {raw:?} has no operator; write {OPS_HELP}"))?;
        let (key_text, rest) = raw.split_at(at);
        let (op, value) = if let Some(v) = rest.strip_prefix("!=") {
            (Op::Ne, v)
        } else if let Some(v) = rest.strip_prefix('=') {
            (Op::Eq, v)
        } else if let Some(v) = rest.strip_prefix('~') {
            (Op::Contains, v)
        } else if let Some(v) = rest.strip_prefix('>') {
            (Op::Gt, v)
        } else if let Some(v) = rest.strip_prefix('<') {
            (Op::Lt, v)
        } else {
            return Err(format!(
                "filter {raw:?} has an unknown operator; write {OPS_HELP}"
            ));
        };
        let key_text = key_text.trim();
        let key = match key_text {
            "detail-type" => Key::DetailType,
            "source" => Key::Source,
            "kind" => Key::Kind,
            "reason" => Key::Reason,
            "receive_count" => Key::ReceiveCount,
            "age" => Key::Age,
            "" => return Err(format!("filter {raw:?} has no key; keys: {KEYS_HELP}")),
            other => match other.strip_prefix("detail.") {
                Some(path) if !path.is_empty() && path.split('.').all(|s| !s.is_empty()) => {
                    Key::Detail(path.split('.').map(str::to_string).collect())
                }
                _ => {
                    return Err(format!(
                        "unknown filter key {other:?} in {raw:?}; keys: {KEYS_HELP}"
                    ))
                }
            },
        };
        let number = match key {
            Key::Age => Some(parse_age(value).ok_or_else(|| {
                format!("filter {raw:?}: age takes seconds or a duration like 90s, 15m, 2h, 3d")
            })?),
            _ => value.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        };
        match op {
            Op::Gt | Op::Lt if !key.numeric() => {
                return Err(format!(
                    "filter {raw:?}: `>` and `<` compare numbers, and {key_text} is text; use = != or ~"
                ))
            }
            Op::Gt | Op::Lt if number.is_none() => {
                return Err(format!("filter {raw:?}: `>` and `<` need a number"))
            }
            Op::Eq | Op::Ne | Op::Contains if key == Key::Age => {
                return Err(format!(
                    "filter {raw:?}: age is compared with `>` or `<` (e.g. age>1h)"
                ))
            }
            Op::Contains if !key.textual() => {
                return Err(format!(
                    "filter {raw:?}: `~` matches text, and {key_text} is a number"
                ))
            }
            Op::Eq | Op::Ne if key == Key::ReceiveCount && number.is_none() => {
                return Err(format!("filter {raw:?}: receive_count is a number"))
            }
            _ => {}
        }
        Ok(Filter {
            key,
            op,
            value: value.to_string(),
            number,
            raw: raw.to_string(),
        })
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// `90`, `90s`, `15m`, `2h`, `3d` as seconds.
pub(crate) fn parse_age(v: &str) -> Option<f64> {
    let v = v.trim();
    let (digits, unit) = match v.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&v[..i], c),
        _ => (v, 's'),
    };
    let n: f64 = digits.parse().ok().filter(|n: &f64| n.is_finite())?;
    let scale = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86_400.0,
        _ => return None,
    };
    Some(n * scale)
}

/// What a message holds for a key.
enum Field {
    Missing,
    Text(String),
    Number(f64),
}

impl Filter {
    /// Whether `m` passes this filter at time `now` (for `age`).
    pub fn matches(&self, m: &DlqMessage, now: DateTime<Utc>) -> bool {
        let text = |s: Option<&str>| s.map_or(Field::Missing, |s| Field::Text(s.to_string()));
        let field = match &self.key {
            Key::DetailType => text(m.detail_type()),
            Key::Source => text(m.source()),
            Key::Kind => text(m.kind()),
            Key::Reason => text(m.reason()),
            Key::ReceiveCount => {
                Field::Number(f64::from(m.failed_after().unwrap_or(m.receive_count())))
            }
            Key::Age => m
                .age_secs(now)
                .map_or(Field::Missing, |s| Field::Number(s as f64)),
            Key::Detail(path) => match m.detail().and_then(|d| walk(d, path)) {
                None => Field::Missing,
                Some(Value::String(s)) => Field::Text(s.clone()),
                Some(Value::Number(n)) => n.as_f64().map_or(Field::Missing, Field::Number),
                Some(other) => Field::Text(other.to_string()),
            },
        };
        let equal = |field: &Field| match field {
            Field::Missing => false,
            Field::Text(s) => *s == self.value,
            Field::Number(n) => self.number == Some(*n),
        };
        let number = |field: &Field| match field {
            Field::Number(n) => Some(*n),
            Field::Text(s) => s.trim().parse::<f64>().ok(),
            Field::Missing => None,
        };
        match self.op {
            Op::Eq => equal(&field),
            Op::Ne => !equal(&field),
            Op::Contains => match &field {
                Field::Text(s) => s.contains(&self.value),
                Field::Number(n) => n.to_string().contains(&self.value),
                Field::Missing => false,
            },
            Op::Gt => matches!((number(&field), self.number), (Some(a), Some(b)) if a > b),
            Op::Lt => matches!((number(&field), self.number), (Some(a), Some(b)) if a < b),
        }
    }
}

fn walk<'v>(mut v: &'v Value, path: &[String]) -> Option<&'v Value> {
    for seg in path {
        v = match v {
            Value::Object(map) => map.get(seg)?,
            Value::Array(items) => items.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// Whether every filter matches (true for no filters).
pub fn all_match(filters: &[Filter], m: &DlqMessage, now: DateTime<Utc>) -> bool {
    filters.iter().all(|f| f.matches(m, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};

    fn message(
        body: &str,
        kind: &str,
        reason: &str,
        failed_after: u32,
        age_secs: i64,
    ) -> DlqMessage {
        let sent = (Utc::now().timestamp_millis() - age_secs * 1000).to_string();
        let attr = |v: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .unwrap()
        };
        DlqMessage::new(
            Message::builder()
                .message_id("m-1")
                .body(body)
                .attributes(MessageSystemAttributeName::SentTimestamp, sent)
                .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "2")
                .message_attributes("orderfleet.failure.kind", attr(kind))
                .message_attributes("orderfleet.failure.reason", attr(reason))
                .message_attributes(
                    "orderfleet.failure.receive_count",
                    attr(&failed_after.to_string()),
                )
                .build(),
        )
    }

    fn order_event() -> DlqMessage {
        let body = r#"{"id":"e-1","source":"orderfleet.storefront","detail-type":"OrderPlaced","time":"2026-01-01T00:00:00Z","detail":{"order_id":"o-123","total":{"amount":4200},"lines":[{"sku":"A"},{"sku":"B"}],"gift":true}}"#;
        message(
            body,
            "permanent",
            "payment provider said card_declined",
            1,
            7200,
        )
    }

    fn check(expr: &str, m: &DlqMessage) -> bool {
        expr.parse::<Filter>()
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .matches(m, Utc::now())
    }

    #[test]
    fn each_operator_parses_with_its_key_and_value() {
        let f: Filter = "detail.order_id=o-123".parse().unwrap();
        assert_eq!(f.key, Key::Detail(vec!["order_id".into()]));
        assert_eq!((f.op, f.value.as_str()), (Op::Eq, "o-123"));
        assert_eq!("kind!=poison".parse::<Filter>().unwrap().op, Op::Ne);
        assert_eq!("reason~timeout".parse::<Filter>().unwrap().op, Op::Contains);
        assert_eq!("receive_count>3".parse::<Filter>().unwrap().op, Op::Gt);
        assert_eq!("age<15m".parse::<Filter>().unwrap().number, Some(900.0));
        assert_eq!("age>2d".parse::<Filter>().unwrap().number, Some(172_800.0));
        assert_eq!("age>90".parse::<Filter>().unwrap().number, Some(90.0));
        // Only the first operator splits: values may contain any of them.
        let f: Filter = "reason~a=b<c".parse().unwrap();
        assert_eq!((&f.key, f.value.as_str()), (&Key::Reason, "a=b<c"));
        assert_eq!(f.to_string(), "reason~a=b<c");
    }

    #[test]
    fn malformed_filters_are_refused_with_a_message_that_says_what_to_write() {
        for (expr, says) in [
            ("colour=red", "unknown filter key"),
            ("kind", "has no operator"),
            ("=x", "has no key"),
            ("detail.=x", "unknown filter key"),
            ("detail..a=x", "unknown filter key"),
            ("kind>3", "compare numbers"),
            ("receive_count>many", "need a number"),
            ("receive_count~3", "matches text"),
            ("receive_count=three", "is a number"),
            ("age=5m", "compared with"),
            ("age>5y", "duration"),
            ("age<", "duration"),
        ] {
            let err = expr.parse::<Filter>().unwrap_err();
            assert!(err.contains(says), "{expr}: {err}");
        }
        let err = "colour=red".parse::<Filter>().unwrap_err();
        assert!(
            err.contains("detail-type") && err.contains("detail.<path>"),
            "{err}"
        );
    }

    #[test]
    fn envelope_and_failure_keys_match_the_message() {
        let m = order_event();
        assert!(check("detail-type=OrderPlaced", &m));
        assert!(!check("detail-type=OrderShipped", &m));
        assert!(check("source~storefront", &m));
        assert!(check("kind=permanent", &m));
        assert!(check("kind!=poison", &m));
        assert!(check("reason~card_declined", &m));
        assert!(check("receive_count<2", &m));
        assert!(check("receive_count=1", &m));
        assert!(check("age>1h", &m));
        assert!(!check("age<1h", &m));
    }

    #[test]
    fn detail_paths_walk_objects_and_arrays_and_compare_numbers_as_numbers() {
        let m = order_event();
        assert!(check("detail.order_id=o-123", &m));
        assert!(check("detail.total.amount=4200", &m));
        assert!(check("detail.total.amount=4200.0", &m));
        assert!(check("detail.total.amount>4199", &m));
        assert!(!check("detail.total.amount<100", &m));
        assert!(check("detail.lines.1.sku=B", &m));
        assert!(check("detail.gift=true", &m));
        assert!(!check("detail.lines.7.sku=B", &m));
    }

    #[test]
    fn a_missing_field_matches_only_not_equal() {
        let poison = message(
            "not json at all",
            "poison",
            "body is not an EventBridge event",
            1,
            5,
        );
        assert!(!check("detail-type=OrderPlaced", &poison));
        assert!(check("detail-type!=OrderPlaced", &poison));
        assert!(!check("detail.order_id~o-", &poison));
        assert!(!check("detail.total.amount>0", &poison));
        assert!(check("kind=poison", &poison));
    }

    #[test]
    fn all_filters_must_match() {
        let m = order_event();
        let f = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<Filter>>()
        };
        assert!(all_match(&[], &m, Utc::now()));
        assert!(all_match(
            &f(&["kind=permanent", "detail.order_id=o-123"]),
            &m,
            Utc::now()
        ));
        assert!(!all_match(
            &f(&["kind=permanent", "detail.order_id=o-9"]),
            &m,
            Utc::now()
        ));
    }
}
