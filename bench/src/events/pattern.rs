//! EventBridge event patterns, compiled once at `PutRule` and matched against each event.
//!
//! The semantics follow the EventBridge user guide ("Creating event patterns", "Content
//! filtering in Amazon EventBridge event patterns", "Comparison operators for use in event
//! patterns", docs.aws.amazon.com/eventbridge/latest/userguide/) and the behaviour of
//! aws/event-ruler, the open-source matcher behind it, which flattens an event into leaf paths:
//!
//! - Every key of the pattern must match (AND). A pattern object recurses into the event
//!   object under the same key; a pattern array is a leaf and lists alternatives (OR).
//! - The event's values at a leaf path are its scalars: a scalar is one value, an array
//!   contributes its elements (nested arrays flatten), an object or an empty array contributes
//!   none. A leaf matches when some alternative matches some value; `exists: false` matches
//!   exactly when there is none, `exists: true` when there is one.
//! - A pattern object under a key holding an array of objects matches when one element
//!   matches the whole sub-pattern (each element is tried on its own, so two conditions are
//!   never satisfied by two different elements).
//! - Content filters: exact values (string, number compared as a number, boolean, null),
//!   `prefix` and `suffix` (optionally `{"equals-ignore-case": ..}`), `equals-ignore-case`,
//!   `wildcard` (`*`, with `\*` and `\\` escapes; `**` refused), `anything-but` (a value, a
//!   list of strings or of numbers, or `{prefix | suffix | equals-ignore-case | wildcard}`),
//!   `numeric` (`=`, `<`, `<=`, `>`, `>=`, or a lower and an upper bound, operands within
//!   ±5e9), `exists`, and `$or` (an array of at least two sub-patterns, any of which must
//!   match alongside the other keys).
//! - String filters only match strings. `anything-but` matches any present value that its
//!   inner condition does not match (so `anything-but: "x"` matches the number 5).
//!
//! Anything else (`cidr`, empty objects or arrays, a scalar where an array or object belongs,
//! an unknown operator) is refused with the reason, so that a rule is never matched wrongly.

use serde_json::{Map, Value};

/// The largest magnitude `numeric` accepts, as EventBridge documents.
const NUMERIC_LIMIT: f64 = 5.0e9;

/// A compiled event pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    root: Node,
}

impl Pattern {
    /// Compiles the JSON text of an event pattern, or says why it is not valid.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let value: Value = serde_json::from_str(text)
            .map_err(|err| format!("Event pattern is not valid JSON: {err}"))?;
        Pattern::compile(&value)
    }

    /// Compiles a parsed event pattern, or says why it is not valid.
    pub fn compile(value: &Value) -> Result<Pattern, String> {
        match value {
            Value::Object(map) => Ok(Pattern {
                root: Node::compile(map, "")?,
            }),
            _ => Err("Event pattern must be a JSON object.".into()),
        }
    }

    /// Whether `event` (the full event: `version`, `id`, `detail-type`, `source`, `account`,
    /// `time`, `region`, `resources`, `detail`) matches.
    pub fn matches(&self, event: &Map<String, Value>) -> bool {
        self.root.matches(Some(event))
    }
}

#[derive(Debug, Clone)]
struct Node {
    fields: Vec<(String, Field)>,
    /// Each entry is one `$or`: some alternative must match.
    ors: Vec<Vec<Node>>,
}

#[derive(Debug, Clone)]
enum Field {
    Leaf(Vec<Cond>),
    Object(Node),
}

#[derive(Debug, Clone)]
enum Cond {
    Exact(Scalar),
    Prefix(Text),
    Suffix(Text),
    EqualsIgnoreCase(String),
    Wildcard(Wildcard),
    AnythingBut(AnythingBut),
    Numeric(Vec<(NumOp, f64)>),
    Exists(bool),
}

#[derive(Debug, Clone)]
enum Scalar {
    String(String),
    Number(f64),
    Bool(bool),
    Null,
}

/// A string operand, lowercased when it ignores case.
#[derive(Debug, Clone)]
struct Text {
    text: String,
    ignore_case: bool,
}

#[derive(Debug, Clone)]
enum AnythingBut {
    Values(Vec<Scalar>),
    Prefix(String),
    Suffix(String),
    EqualsIgnoreCase(Vec<String>),
    Wildcard(Vec<Wildcard>),
}

#[derive(Debug, Clone, Copy)]
enum NumOp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A wildcard pattern split at its unescaped `*`s: the value starts with the first part,
/// ends with the last and holds the others in order in between.
#[derive(Debug, Clone)]
struct Wildcard {
    parts: Vec<String>,
}

fn path_of(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl Node {
    fn compile(map: &Map<String, Value>, path: &str) -> Result<Node, String> {
        if map.is_empty() {
            return Err(format!(
                "Empty objects are not allowed (at {:?}).",
                if path.is_empty() { "<root>" } else { path }
            ));
        }
        let mut node = Node {
            fields: Vec::with_capacity(map.len()),
            ors: Vec::new(),
        };
        for (key, value) in map {
            let here = path_of(path, key);
            if key == "$or" {
                let Value::Array(alternatives) = value else {
                    return Err(format!("\"$or\" at {here:?} must be an array of objects."));
                };
                if alternatives.len() < 2 {
                    return Err(format!(
                        "\"$or\" at {here:?} must list at least two alternatives."
                    ));
                }
                let mut compiled = Vec::with_capacity(alternatives.len());
                for alternative in alternatives {
                    let Value::Object(sub) = alternative else {
                        return Err(format!("\"$or\" at {here:?} must be an array of objects."));
                    };
                    compiled.push(Node::compile(sub, path)?);
                }
                node.ors.push(compiled);
                continue;
            }
            let field = match value {
                Value::Object(sub) => Field::Object(Node::compile(sub, &here)?),
                Value::Array(items) => Field::Leaf(compile_leaf(items, &here)?),
                _ => return Err(format!("\"{here}\" must be an object or an array.")),
            };
            node.fields.push((key.clone(), field));
        }
        Ok(node)
    }

    /// `object` is `None` where the event has no object at this path.
    fn matches(&self, object: Option<&Map<String, Value>>) -> bool {
        self.fields.iter().all(|(key, field)| {
            let value = object.and_then(|o| o.get(key));
            match field {
                Field::Leaf(conds) => leaf_matches(conds, value),
                Field::Object(node) => node.matches_value(value),
            }
        }) && self
            .ors
            .iter()
            .all(|alternatives| alternatives.iter().any(|node| node.matches(object)))
    }

    fn matches_value(&self, value: Option<&Value>) -> bool {
        match value {
            Some(Value::Object(map)) => self.matches(Some(map)),
            Some(Value::Array(items)) if !items.is_empty() => {
                items.iter().any(|item| self.matches_value(Some(item)))
            }
            _ => self.matches(None),
        }
    }
}

fn compile_leaf(items: &[Value], path: &str) -> Result<Vec<Cond>, String> {
    if items.is_empty() {
        return Err(format!("Empty arrays are not allowed (at {path:?})."));
    }
    items
        .iter()
        .map(|item| match item {
            Value::Object(op) => compile_operator(op, path),
            Value::Array(_) => Err(format!("Nested arrays are not allowed (at {path:?}).")),
            scalar => scalar_of(scalar)
                .map(Cond::Exact)
                .ok_or_else(|| format!("Invalid value at {path:?}.")),
        })
        .collect()
}

fn scalar_of(value: &Value) -> Option<Scalar> {
    Some(match value {
        Value::String(s) => Scalar::String(s.clone()),
        Value::Number(n) => Scalar::Number(n.as_f64()?),
        Value::Bool(b) => Scalar::Bool(*b),
        Value::Null => Scalar::Null,
        Value::Array(_) | Value::Object(_) => return None,
    })
}

fn compile_operator(op: &Map<String, Value>, path: &str) -> Result<Cond, String> {
    let mut entries = op.iter();
    let (Some((name, operand)), None) = (entries.next(), entries.next()) else {
        return Err(format!(
            "A filter at {path:?} must be an object with exactly one operator."
        ));
    };
    let bad = |what: &str| format!("{what} (at {path:?}).");
    match name.as_str() {
        "prefix" => Ok(Cond::Prefix(text_operand(operand).ok_or_else(|| {
            bad("\"prefix\" takes a string or {\"equals-ignore-case\": string}")
        })?)),
        "suffix" => Ok(Cond::Suffix(text_operand(operand).ok_or_else(|| {
            bad("\"suffix\" takes a string or {\"equals-ignore-case\": string}")
        })?)),
        "equals-ignore-case" => match operand {
            Value::String(s) => Ok(Cond::EqualsIgnoreCase(s.to_lowercase())),
            _ => Err(bad("\"equals-ignore-case\" takes a string")),
        },
        "wildcard" => match operand {
            Value::String(s) => Ok(Cond::Wildcard(Wildcard::compile(s).map_err(|e| bad(&e))?)),
            _ => Err(bad("\"wildcard\" takes a string")),
        },
        "exists" => match operand {
            Value::Bool(b) => Ok(Cond::Exists(*b)),
            _ => Err(bad("\"exists\" takes true or false")),
        },
        "numeric" => compile_numeric(operand)
            .map(Cond::Numeric)
            .map_err(|e| bad(&e)),
        "anything-but" => compile_anything_but(operand)
            .map(Cond::AnythingBut)
            .map_err(|e| bad(&e)),
        "cidr" => Err(bad(
            "\"cidr\" is not supported by orderfleet-bench-sqs's EventBridge",
        )),
        other => Err(bad(&format!("Unrecognized match type {other:?}"))),
    }
}

fn text_operand(operand: &Value) -> Option<Text> {
    match operand {
        Value::String(s) => Some(Text {
            text: s.clone(),
            ignore_case: false,
        }),
        Value::Object(map) if map.len() == 1 => match map.get("equals-ignore-case") {
            Some(Value::String(s)) => Some(Text {
                text: s.to_lowercase(),
                ignore_case: true,
            }),
            _ => None,
        },
        _ => None,
    }
}

fn compile_numeric(operand: &Value) -> Result<Vec<(NumOp, f64)>, String> {
    let Value::Array(items) = operand else {
        return Err("\"numeric\" takes an array of operators and numbers".into());
    };
    let mut terms = Vec::new();
    for pair in items.chunks(2) {
        let [Value::String(op), Value::Number(n)] = pair else {
            return Err("\"numeric\" takes operator, number pairs".into());
        };
        let op = match op.as_str() {
            "=" => NumOp::Eq,
            "<" => NumOp::Lt,
            "<=" => NumOp::Le,
            ">" => NumOp::Gt,
            ">=" => NumOp::Ge,
            other => return Err(format!("Unrecognized numeric operator {other:?}")),
        };
        let n = n
            .as_f64()
            .filter(|n| n.abs() <= NUMERIC_LIMIT)
            .ok_or_else(|| format!("Numbers in \"numeric\" must be within ±{NUMERIC_LIMIT:e}"))?;
        terms.push((op, n));
    }
    match terms.as_slice() {
        [_] => Ok(terms),
        [(NumOp::Gt | NumOp::Ge, low), (NumOp::Lt | NumOp::Le, high)] if low <= high => Ok(terms),
        [_, _] => Err(
            "A \"numeric\" range is a lower bound (> or >=) then a higher upper bound (< or <=)"
                .into(),
        ),
        _ => Err("\"numeric\" takes one comparison or one range".into()),
    }
}

fn compile_anything_but(operand: &Value) -> Result<AnythingBut, String> {
    match operand {
        Value::String(_) | Value::Number(_) => Ok(AnythingBut::Values(vec![scalar_of(operand)
            .ok_or("\"anything-but\" number out of range")?])),
        Value::Array(items) => {
            let all_strings = items.iter().all(Value::is_string);
            let all_numbers = items.iter().all(Value::is_number);
            if items.is_empty() || !(all_strings || all_numbers) {
                return Err(
                    "\"anything-but\" takes a non-empty list of strings only or numbers only"
                        .into(),
                );
            }
            items
                .iter()
                .map(|item| scalar_of(item).ok_or_else(|| "bad number".to_owned()))
                .collect::<Result<_, _>>()
                .map(AnythingBut::Values)
        }
        Value::Object(map) if map.len() == 1 => {
            let (name, inner) = map.iter().next().ok_or("empty \"anything-but\"")?;
            let strings = |inner: &Value| -> Option<Vec<String>> {
                match inner {
                    Value::String(s) => Some(vec![s.clone()]),
                    Value::Array(items) if !items.is_empty() => items
                        .iter()
                        .map(|i| i.as_str().map(str::to_owned))
                        .collect(),
                    _ => None,
                }
            };
            match (name.as_str(), inner) {
                ("prefix", Value::String(s)) => Ok(AnythingBut::Prefix(s.clone())),
                ("suffix", Value::String(s)) => Ok(AnythingBut::Suffix(s.clone())),
                ("equals-ignore-case", inner) => strings(inner)
                    .map(|v| AnythingBut::EqualsIgnoreCase(v.iter().map(|s| s.to_lowercase()).collect()))
                    .ok_or_else(|| "\"anything-but\" \"equals-ignore-case\" takes a string or a list of strings".into()),
                ("wildcard", inner) => strings(inner)
                    .ok_or_else(|| "\"anything-but\" \"wildcard\" takes a string or a list of strings".to_owned())?
                    .iter()
                    .map(|s| Wildcard::compile(s))
                    .collect::<Result<_, _>>()
                    .map(AnythingBut::Wildcard),
                (other, _) => Err(format!("Unsupported \"anything-but\" filter {other:?}")),
            }
        }
        _ => Err("\"anything-but\" takes a value, a list, or one of prefix, suffix, equals-ignore-case, wildcard".into()),
    }
}

impl Wildcard {
    fn compile(text: &str) -> Result<Wildcard, String> {
        let mut parts = Vec::new();
        let mut current = String::new();
        let mut chars = text.chars();
        let mut last_was_star = false;
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(escaped @ ('*' | '\\')) => current.push(escaped),
                    _ => return Err(format!("Invalid escape in wildcard {text:?}")),
                },
                '*' if last_was_star => {
                    return Err(format!(
                        "Consecutive wildcard characters are not allowed in {text:?}"
                    ))
                }
                '*' => parts.push(std::mem::take(&mut current)),
                other => current.push(other),
            }
            last_was_star = c == '*';
        }
        parts.push(current);
        Ok(Wildcard { parts })
    }

    fn matches(&self, value: &str) -> bool {
        match self.parts.as_slice() {
            [] => value.is_empty(),
            [only] => value == only,
            [first, middle @ .., last] => {
                if value.len() < first.len() + last.len()
                    || !value.starts_with(first.as_str())
                    || !value.ends_with(last.as_str())
                {
                    return false;
                }
                let mut rest = &value[first.len()..value.len() - last.len()];
                for part in middle {
                    match rest.find(part.as_str()) {
                        Some(at) => rest = &rest[at + part.len()..],
                        None => return false,
                    }
                }
                true
            }
        }
    }
}

/// Calls `f` on every scalar the event holds at a leaf path; stops at the first `true`.
fn any_scalar(value: &Value, f: &mut impl FnMut(&Value) -> bool) -> bool {
    match value {
        Value::Array(items) => items.iter().any(|item| any_scalar(item, f)),
        Value::Object(_) => false,
        scalar => f(scalar),
    }
}

fn leaf_matches(conds: &[Cond], value: Option<&Value>) -> bool {
    let present = value.is_some_and(|v| any_scalar(v, &mut |_| true));
    conds.iter().any(|cond| match cond {
        Cond::Exists(wanted) => *wanted == present,
        cond => value.is_some_and(|v| any_scalar(v, &mut |scalar| cond.accepts(scalar))),
    })
}

fn lower(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()) {
        std::borrow::Cow::Owned(s.to_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

impl Scalar {
    fn equals(&self, value: &Value) -> bool {
        match (self, value) {
            (Scalar::String(a), Value::String(b)) => a == b,
            (Scalar::Number(a), Value::Number(b)) => b.as_f64() == Some(*a),
            (Scalar::Bool(a), Value::Bool(b)) => a == b,
            (Scalar::Null, Value::Null) => true,
            _ => false,
        }
    }
}

impl Text {
    fn starts(&self, value: &str) -> bool {
        if self.ignore_case {
            lower(value).starts_with(self.text.as_str())
        } else {
            value.starts_with(self.text.as_str())
        }
    }

    fn ends(&self, value: &str) -> bool {
        if self.ignore_case {
            lower(value).ends_with(self.text.as_str())
        } else {
            value.ends_with(self.text.as_str())
        }
    }
}

impl Cond {
    /// Whether one scalar of the event satisfies this condition (never called for `exists`).
    fn accepts(&self, value: &Value) -> bool {
        match self {
            Cond::Exact(scalar) => scalar.equals(value),
            Cond::Prefix(text) => value.as_str().is_some_and(|s| text.starts(s)),
            Cond::Suffix(text) => value.as_str().is_some_and(|s| text.ends(s)),
            Cond::EqualsIgnoreCase(text) => {
                value.as_str().is_some_and(|s| lower(s) == text.as_str())
            }
            Cond::Wildcard(wildcard) => value.as_str().is_some_and(|s| wildcard.matches(s)),
            Cond::Numeric(terms) => value.as_f64().is_some_and(|n| {
                terms.iter().all(|(op, bound)| match op {
                    NumOp::Eq => n == *bound,
                    NumOp::Lt => n < *bound,
                    NumOp::Le => n <= *bound,
                    NumOp::Gt => n > *bound,
                    NumOp::Ge => n >= *bound,
                })
            }),
            Cond::AnythingBut(but) => !but.excludes(value),
            Cond::Exists(_) => false,
        }
    }
}

impl AnythingBut {
    fn excludes(&self, value: &Value) -> bool {
        let text = value.as_str();
        match self {
            AnythingBut::Values(values) => values.iter().any(|v| v.equals(value)),
            AnythingBut::Prefix(p) => text.is_some_and(|s| s.starts_with(p.as_str())),
            AnythingBut::Suffix(p) => text.is_some_and(|s| s.ends_with(p.as_str())),
            AnythingBut::EqualsIgnoreCase(values) => {
                text.is_some_and(|s| values.iter().any(|v| lower(s) == v.as_str()))
            }
            AnythingBut::Wildcard(patterns) => {
                text.is_some_and(|s| patterns.iter().any(|w| w.matches(s)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(detail: Value) -> Map<String, Value> {
        let Value::Object(map) = json!({
            "version": "0", "id": "1", "detail-type": "OrderPlaced",
            "source": "orderfleet.storefront", "account": "000000000000",
            "time": "2026-12-06T19:00:00Z", "region": "us-east-1",
            "resources": ["arn:aws:s3:::a", "arn:aws:s3:::b"], "detail": detail,
        }) else {
            unreachable!()
        };
        map
    }

    fn matches(pattern: Value, detail: Value) -> bool {
        Pattern::compile(&pattern)
            .expect("valid pattern")
            .matches(&event(detail))
    }

    #[test]
    fn wildcards_anchor_both_ends_and_keep_middle_parts_in_order() {
        let w = Wildcard::compile("a*b*c").expect("valid");
        assert!(w.matches("abc"));
        assert!(w.matches("a-b-c"));
        assert!(!w.matches("acb"));
        assert!(!w.matches("ab"));
        let w = Wildcard::compile("ab*ba").expect("valid");
        assert!(!w.matches("aba"), "prefix and suffix may not overlap");
        assert!(Wildcard::compile("a\\*").expect("valid").matches("a*"));
        assert!(Wildcard::compile("a**").is_err());
    }

    #[test]
    fn array_elements_are_matched_one_at_a_time() {
        let pattern = json!({"detail": {"items": {"sku": ["A"], "qty": [2]}}});
        assert!(matches(
            pattern.clone(),
            json!({"items": [{"sku": "B", "qty": 2}, {"sku": "A", "qty": 2}]})
        ));
        assert!(!matches(
            pattern,
            json!({"items": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 2}]})
        ));
    }

    #[test]
    fn exists_false_matches_a_missing_path_even_under_a_missing_parent() {
        assert!(matches(
            json!({"detail": {"a": {"b": [{"exists": false}]}}}),
            json!({})
        ));
        assert!(!matches(
            json!({"detail": {"a": [{"exists": true}]}}),
            json!({"a": []})
        ));
        assert!(matches(
            json!({"detail": {"a": [{"exists": false}]}}),
            json!({"a": {"b": 1}})
        ));
    }

    #[test]
    fn resources_match_when_any_element_does() {
        assert!(matches(json!({"resources": ["arn:aws:s3:::b"]}), json!({})));
        assert!(!matches(
            json!({"resources": ["arn:aws:s3:::c"]}),
            json!({})
        ));
    }
}
