//! The event catalogue's contracts: one JSON Schema per detail-type in `schemas/`, checked
//! against the catalogue, against `orderfleet_testkit::examples` payloads, and against the payloads the
//! handlers really emit; and `docs/events.md`, generated from the catalogue and the schemas.
//!
//! The schemas use a small subset of JSON Schema (2020-12), checked here by a few dozen lines
//! rather than a validator crate: `type`, `required`, `properties`, `additionalProperties`,
//! `enum`, `minimum`, `minLength`, `minItems`, `items`, `pattern`, `format: date-time` and
//! local `$ref`s into `$defs`. A schema using anything else fails
//! `schemas_use_only_keywords_the_checker_understands`, so the subset cannot silently grow.
//!
//! To regenerate `docs/events.md` after changing the catalogue or a schema:
//! `UPDATE_EVENT_DOCS=1 cargo test --test it catalogue_schemas`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::support;
use orderfleet::cli::simulator::{self, OrderKind, PlanConfig};
use orderfleet::domain::catalogue::{self, Producer};
use orderfleet::domain::events::{self, Meta, OrderCancellationRequested};
use orderfleet_testkit::examples;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn schema(detail_type: &str) -> Value {
    let path = root().join("schemas").join(format!("{detail_type}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The checker
// ---------------------------------------------------------------------------------------------

/// Keywords that constrain a value, all implemented by [`check`].
const ASSERTIONS: &[&str] = &[
    "$ref",
    "type",
    "required",
    "properties",
    "additionalProperties",
    "enum",
    "minimum",
    "minLength",
    "minItems",
    "items",
    "pattern",
    "format",
];
/// Keywords that only annotate.
const ANNOTATIONS: &[&str] = &["$schema", "$id", "title", "description", "$defs"];

/// Every violation of `schema` by `value`, as "path: problem". `root` resolves `$ref`s.
fn check(root: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(s) = schema.as_object() else {
        errors.push(format!("{path}: schema is not an object"));
        return;
    };
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/$defs/").expect("only local $defs refs");
        let target = &root["$defs"][name];
        assert!(!target.is_null(), "dangling $ref {r}");
        check(root, target, value, path, errors);
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => panic!("{path}: bad type keyword {t}"),
        };
        let ok = types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            other => panic!("{path}: unknown type {other}"),
        });
        if !ok {
            errors.push(format!(
                "{path}: expected {}, got {value}",
                types.join(" or ")
            ));
            return;
        }
    }
    if let Some(options) = s.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            errors.push(format!("{path}: {value} is not one of {}", json!(options)));
        }
    }
    if let (Some(min), Some(n)) = (s.get("minimum").and_then(Value::as_i64), value.as_i64()) {
        if n < min {
            errors.push(format!("{path}: {n} is below the minimum {min}"));
        }
    }
    if let Some(text) = value.as_str() {
        if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
            if (text.chars().count() as u64) < min {
                errors.push(format!("{path}: {text:?} is shorter than {min}"));
            }
        }
        if let Some(p) = s.get("pattern").and_then(Value::as_str) {
            let re =
                regex_lite::Regex::new(p).unwrap_or_else(|e| panic!("{path}: pattern {p}: {e}"));
            if !re.is_match(text) {
                errors.push(format!("{path}: {text:?} does not match {p}"));
            }
        }
        match s.get("format").and_then(Value::as_str) {
            Some("date-time") if chrono::DateTime::parse_from_rfc3339(text).is_err() => {
                errors.push(format!("{path}: {text:?} is not an RFC 3339 date-time"));
            }
            Some("date-time") => {}
            Some(other) => panic!("{path}: unsupported format {other}"),
            None => {}
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if (items.len() as u64) < min {
                errors.push(format!("{path}: {} items, fewer than {min}", items.len()));
            }
        }
        if let Some(item_schema) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(root, item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(obj) = value.as_object() {
        for name in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = name.as_str().expect("required names are strings");
            if !obj.contains_key(name) {
                errors.push(format!("{path}: missing required {name}"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(prop) => check(root, prop, v, &format!("{path}.{k}"), errors),
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        errors.push(format!("{path}: unexpected property {k}"))
                    }
                    Some(extra @ Value::Object(_)) => {
                        check(root, extra, v, &format!("{path}.{k}"), errors)
                    }
                    _ => {}
                },
            }
        }
    }
}

fn violations(detail_type: &str, payload: &Value) -> Vec<String> {
    let s = schema(detail_type);
    let mut errors = Vec::new();
    check(&s, &s, payload, detail_type, &mut errors);
    errors
}

/// Walks a schema and collects every keyword it uses, descending into subschemas.
fn keywords(schema: &Value, out: &mut BTreeSet<String>) {
    let Some(s) = schema.as_object() else { return };
    for (k, v) in s {
        out.insert(k.clone());
        match k.as_str() {
            "properties" | "$defs" => {
                for sub in v.as_object().into_iter().flat_map(|m| m.values()) {
                    keywords(sub, out);
                }
            }
            "items" | "additionalProperties" => keywords(v, out),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The schemas against the catalogue and the examples
// ---------------------------------------------------------------------------------------------

#[test]
fn every_catalogued_event_has_a_versioned_schema_and_no_schema_is_orphaned() {
    let mut files: BTreeSet<String> = std::fs::read_dir(root().join("schemas"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for spec in catalogue::EVENTS {
        let s = schema(spec.detail_type);
        assert_eq!(s["title"], spec.detail_type);
        assert_eq!(
            s["description"], spec.description,
            "{}: the schema's description is the catalogue's",
            spec.detail_type
        );
        assert_eq!(s["type"], "object");
        let (oldest, newest) = events::versions(spec.detail_type);
        assert_eq!(
            s["properties"]["version"]["enum"],
            json!((oldest..=newest).collect::<Vec<u32>>()),
            "{}: the schema lists the versions this build applies",
            spec.detail_type
        );
        let required = s["required"].as_array().unwrap();
        assert!(required.contains(&json!("version")), "{}", spec.detail_type);
        assert!(
            s["properties"]["event_id"].is_object(),
            "{}: every payload may carry its event_id",
            spec.detail_type
        );
        assert_eq!(
            required.contains(&json!("event_id")),
            spec.requires_event_id,
            "{}: the schema requires event_id exactly when the catalogue does",
            spec.detail_type
        );
        files.remove(&format!("{}.json", spec.detail_type));
    }
    assert!(
        files.is_empty(),
        "schemas of no catalogued event: {files:?}"
    );
}

#[test]
fn schemas_use_only_keywords_the_checker_understands() {
    for spec in catalogue::EVENTS {
        let mut used = BTreeSet::new();
        keywords(&schema(spec.detail_type), &mut used);
        let unknown: Vec<&String> = used
            .iter()
            .filter(|k| !ASSERTIONS.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
            .collect();
        assert!(unknown.is_empty(), "{}: {unknown:?}", spec.detail_type);
    }
}

#[test]
fn every_example_payload_matches_its_schema() {
    for spec in catalogue::EVENTS {
        let example = examples::example(spec.detail_type).expect(spec.detail_type);
        let errors = violations(spec.detail_type, &example);
        assert!(errors.is_empty(), "{errors:#?}");
        // The fleet's events carry the outbox's event_id; storefront ones their own.
        let mut stamped = example.clone();
        stamped["event_id"] = json!(uuid::Uuid::new_v4().to_string());
        assert!(violations(spec.detail_type, &stamped).is_empty());
    }
}

#[test]
fn the_checker_rejects_what_the_schemas_forbid() {
    let good = examples::example("OrderAccepted").unwrap();
    let broken = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        violations("OrderAccepted", &v)
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "missing field",
            broken(&|v| {
                v.as_object_mut().unwrap().remove("total");
            }),
        ),
        (
            "lowercase currency",
            broken(&|v| v["total"]["currency"] = json!("eur")),
        ),
        (
            "float amount",
            broken(&|v| v["total"]["amount_minor"] = json!(25.99)),
        ),
        ("unknown property", broken(&|v| v["discount"] = json!(5))),
        (
            "zero quantity",
            broken(&|v| v["lines"][0]["quantity"] = json!(0)),
        ),
        ("no lines", broken(&|v| v["lines"] = json!([]))),
        ("bad time", broken(&|v| v["placed_at"] = json!("yesterday"))),
        ("version 4", broken(&|v| v["version"] = json!(4))),
        (
            "nested unknown",
            broken(&|v| v["customer"]["phone"] = json!("555")),
        ),
    ];
    for (what, errors) in cases {
        assert!(!errors.is_empty(), "{what} was accepted");
    }
    let mut cancelled = examples::example("OrderCancelled").unwrap();
    cancelled["reason"] = json!("bored");
    assert!(!violations("OrderCancelled", &cancelled).is_empty());
}

#[test]
fn product_documents_may_carry_fields_of_their_own() {
    let mut product = examples::example("ProductUpserted").unwrap();
    product["category"] = json!("tea");
    product["images"] = json!(["a.jpg"]);
    assert!(violations("ProductUpserted", &product).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Real payloads
// ---------------------------------------------------------------------------------------------

/// Runs the simulator's catalogue and a mix of orders through the four saga handlers in
/// process, plus a cancellation that catches an order while it is ready to ship, and checks
/// every event that went through the outbox, storefront's and fleet's, against its schema.
#[tokio::test]
async fn every_payload_the_saga_really_emits_matches_its_schema() {
    let fleet = support::saga::fleet().await;
    let pool = fleet.pool().clone();
    let run = "schemas";
    let products = simulator::catalogue(simulator::DEFAULT_SKUS);
    for e in simulator::seed_events(run, &products, 200).unwrap() {
        fleet.publish(e.detail_type, &e.detail).await.unwrap();
    }
    fleet.run_until_quiet().await.unwrap();
    let plan = simulator::plan_orders(
        &PlanConfig {
            orders: 150,
            seed: 3,
            run_id: run.into(),
            regular_only: false,
        },
        &products,
    )
    .unwrap();
    let counts = plan.counts();
    for kind in [
        OrderKind::Regular,
        OrderKind::CardDeclined,
        OrderKind::ScarceStock,
        OrderKind::CancelRequested,
        OrderKind::Undeliverable,
    ] {
        assert!(counts.contains_key(&kind), "seed 3 plans no {kind:?}");
    }
    assert!(
        counts.keys().any(|k| k.is_invalid()),
        "seed 3 plans no invalid order"
    );
    for e in &plan.events {
        fleet.publish(e.detail_type, &e.detail).await.unwrap();
    }
    fleet.run_until_quiet_concurrently(4, 16).await.unwrap();

    // A cancellation that arrives while the order is ready to ship: hold OrderReadyToShip back
    // from fulfillment so that the stop request gets there first.
    let late = support::saga::order(
        "ord-schemas-late",
        &[(products[0].sku.as_str(), 1, 895)],
        "tok_visa",
    );
    fleet.publish_event(&late).await.unwrap();
    let held = fleet.deliver_until("OrderReadyToShip").await.unwrap();
    fleet
        .publish_event(&OrderCancellationRequested {
            meta: Meta::with_id("schemas-late-cancel"),
            order_id: late.order_id.clone(),
            reason: "too slow".into(),
        })
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    fleet.deliver(&held).await;
    // What the shop's unsubscribe page publishes.
    fleet
        .publish_event(&orderfleet::domain::events::MarketingOptOut {
            meta: Meta::with_id("schemas-opt-out"),
            customer: orderfleet::domain::events::OptOutSubject {
                id: Some("cus-1".into()),
                email: None,
            },
            channel: orderfleet::domain::events::OptOutChannel::Link,
        })
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    // The support desk's events, as `orderfleet order refund` and `order cancel` write them:
    // a partial refund of a completed order (PaymentRefunded version 2), and a cancellation.
    {
        use orderfleet::store::operator_actions::{request, Action};
        let c = pool.get().await.unwrap();
        let done: String = c
            .query_one(
                "SELECT id FROM orders WHERE status = 'completed' ORDER BY id LIMIT 1",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        request(
            &c,
            &done,
            Action::Refund { amount_minor: 1 },
            "schemas",
            "ci",
        )
        .await
        .unwrap();
        request(&c, &done, Action::Cancel, "schemas", "ci")
            .await
            .unwrap();
    }
    fleet.run_until_quiet().await.unwrap();
    support::saga::assert_no_dead_letters(&fleet);

    let rows = pool
        .get()
        .await
        .unwrap()
        .query("SELECT detail_type, detail FROM outbox ORDER BY id", &[])
        .await
        .unwrap();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    for r in &rows {
        let (detail_type, detail): (String, Value) = (r.get(0), r.get(1));
        errors.extend(violations(&detail_type, &detail));
        *seen.entry(detail_type).or_default() += 1;
    }
    assert!(
        errors.is_empty(),
        "{} violations: {errors:#?}",
        errors.len()
    );
    // PaymentFailed at capture cannot happen with the sandbox; everything else did.
    let missing: Vec<&str> = catalogue::EVENTS
        .iter()
        .map(|e| e.detail_type)
        .filter(|t| !seen.contains_key(*t))
        .collect();
    assert!(
        missing.is_empty(),
        "never emitted: {missing:?} (seen {seen:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// docs/events.md
// ---------------------------------------------------------------------------------------------

fn producer(p: Producer) -> String {
    match p {
        Producer::Storefront => "storefront".into(),
        Producer::Handler(h) => h.as_str().into(),
        Producer::Operator => "operator (`orderfleet order`)".into(),
    }
}

/// A property's type as a reader wants it: `string`, `Money`, `array of SkuQuantity`, or the
/// allowed values.
fn type_name(prop: &Value) -> String {
    if let Some(r) = prop.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/$defs/");
        return format!("[{name}](#{})", name.to_lowercase());
    }
    if let Some(options) = prop.get("enum").and_then(Value::as_array) {
        let names: Vec<String> = options
            .iter()
            .map(|o| format!("`{}`", o.as_str().map_or(o.to_string(), str::to_string)))
            .collect();
        return format!("one of {}", names.join(", "));
    }
    match prop["type"].as_str() {
        Some("array") => format!("array of {}", type_name(&prop["items"])),
        Some("string") if prop["format"] == "date-time" => "date-time (UTC)".into(),
        Some(t) => t.to_string(),
        None => "any".into(),
    }
}

/// The whole of `docs/events.md`.
fn render_event_docs() -> String {
    let mut out = String::new();
    out.push_str(
        "<!-- Generated by tests/it/catalogue_schemas.rs from src/domain/catalogue.rs and schemas/*.json.\n     \
         Do not edit: run `UPDATE_EVENT_DOCS=1 cargo test --test it catalogue_schemas`. -->\n\n",
    );
    out.push_str("# Event catalogue\n\n");
    out.push_str(
        "Every event on the bus, who publishes it, who consumes it, and its JSON Schema. The \
         single source is [`src/domain/catalogue.rs`](../src/domain/catalogue.rs) (which also drives the \
         EventBridge rules); the payloads are the structs of [`src/domain/events.rs`](../src/domain/events.rs). \
         A test checks each schema against the catalogue, against an example payload, and \
         against every payload the saga handlers really emit.\n\n",
    );
    out.push_str(
        "Conventions of every payload:\n\n\
         - `version` is the payload's schema version, 1 for every event today. A consumer \
         dead-letters a version it does not know (permanent failure) rather than guess.\n\
         - `event_id` identifies the logical event; with the detail-type it is the consumers' \
         inbox key, so one id may be reused across detail-types. The storefront sets its own, \
         the same on every retry of an event; the outbox stamps a UUID on the fleet's, so a \
         republished event is recognised. Storefront events that change stock or money (marked \
         \"`event_id`: required\" below) must carry one: without it a retry would get a new \
         EventBridge id and be applied twice, so such an event is dead-lettered with a reason \
         that names the missing `event_id`.\n\
         - Money is `{\"amount_minor\": integer, \"currency\": \"EUR\"}`: integer minor units and \
         an ISO 4217 code, never a float. Times are RFC 3339 in UTC.\n\
         - The schemas describe what decodes. Business rules (an `OrderPlaced` with a zero \
         quantity, mixed currencies, an unknown SKU or no email) are checked by orders and \
         answered with `OrderRejected`, not by the schema.\n\
         - Analytics archives every event.\n\n",
    );
    out.push_str("| event | producer | consumers | schema |\n|---|---|---|---|\n");
    for spec in catalogue::EVENTS {
        let consumers: Vec<&str> = spec.consumers.iter().map(|h| h.as_str()).collect();
        out.push_str(&format!(
            "| [{0}](#{1}) | {2} | {3} | [{0}.json](../schemas/{0}.json) |\n",
            spec.detail_type,
            spec.detail_type.to_lowercase(),
            producer(spec.producer),
            consumers.join(", "),
        ));
    }
    for spec in catalogue::EVENTS {
        let s = schema(spec.detail_type);
        let consumers: Vec<&str> = spec.consumers.iter().map(|h| h.as_str()).collect();
        out.push_str(&format!(
            "\n## {}\n\n{}\n\n",
            spec.detail_type, spec.description
        ));
        out.push_str(&format!(
            "- Producer: {} (source `{}`)\n- Consumers: {}\n- Schema: [schemas/{}.json](../schemas/{}.json)\n",
            producer(spec.producer),
            spec.source(),
            consumers.join(", "),
            spec.detail_type,
            spec.detail_type,
        ));
        if spec.requires_event_id {
            out.push_str(
                "- `event_id`: required (it changes stock or money; one without it is dead-lettered)\n",
            );
        }
        let required: Vec<&str> = s["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        out.push_str("\n| field | type | required | meaning |\n|---|---|---|---|\n");
        for (name, prop) in s["properties"].as_object().into_iter().flatten() {
            if name == "version" || name == "event_id" {
                continue;
            }
            out.push_str(&format!(
                "| `{name}` | {} | {} | {} |\n",
                type_name(prop),
                if required.contains(&name.as_str()) {
                    "yes"
                } else {
                    "no"
                },
                prop["description"].as_str().unwrap_or_default(),
            ));
        }
        if s["additionalProperties"] == json!(true) {
            out.push_str("| (any other) | any | no | Kept as the storefront sent it. |\n");
        }
    }
    // The shared types, as each schema defines them in its `$defs` (identical across files).
    let mut defs: BTreeMap<String, Value> = BTreeMap::new();
    for spec in catalogue::EVENTS {
        for (name, def) in schema(spec.detail_type)["$defs"]
            .as_object()
            .into_iter()
            .flatten()
        {
            if let Some(seen) = defs.get(name) {
                assert_eq!(seen, def, "$defs/{name} differs in {}", spec.detail_type);
            }
            defs.insert(name.clone(), def.clone());
        }
    }
    out.push_str("\n## Shared types\n");
    for (name, def) in &defs {
        out.push_str(&format!(
            "\n### {name}\n\n{}\n\n| field | type | required | meaning |\n|---|---|---|---|\n",
            def["description"].as_str().unwrap_or_default()
        ));
        let required: Vec<&str> = def["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for (field, prop) in def["properties"].as_object().into_iter().flatten() {
            out.push_str(&format!(
                "| `{field}` | {} | {} | {} |\n",
                type_name(prop),
                if required.contains(&field.as_str()) {
                    "yes"
                } else {
                    "no"
                },
                prop["description"].as_str().unwrap_or_default(),
            ));
        }
    }
    out
}

#[test]
fn the_event_docs_are_generated_from_the_catalogue_and_the_schemas() {
    let path: &Path = &root().join("docs/events.md");
    let expected = render_event_docs();
    if std::env::var_os("UPDATE_EVENT_DOCS").is_some() {
        std::fs::write(path, &expected).unwrap();
    }
    let actual = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        actual == expected,
        "docs/events.md is out of date: run `UPDATE_EVENT_DOCS=1 cargo test --test it catalogue_schemas`"
    );
}
