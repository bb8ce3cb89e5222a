//! The benchmark endpoint's EventBridge pattern matcher (`orderfleet_bench::events::Pattern`)
//! against the patterns the fleet's topology really creates, and against each content filter.

use orderfleet::domain::catalogue::EVENTS;
use orderfleet::domain::names::HandlerName;
use orderfleet::infra::topology::{event_pattern, ExternalBus, Topology};
use orderfleet_bench::events::Pattern;
use serde_json::{json, Map, Value};

const PARTNER: &str = "aws.partner/shopify.com/1/orderfleet";

/// An event as EventBridge hands it to rules.
fn event(source: &str, detail_type: &str, detail: Value) -> Map<String, Value> {
    let Value::Object(map) = json!({
        "version": "0",
        "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
        "detail-type": detail_type,
        "source": source,
        "account": "000000000000",
        "time": "2026-12-06T19:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:s3:::lake"],
        "detail": detail,
    }) else {
        unreachable!("an object literal")
    };
    map
}

fn compile(pattern: &Value) -> Pattern {
    Pattern::compile(pattern).unwrap_or_else(|err| panic!("{pattern} is refused: {err}"))
}

fn matches_detail(pattern: Value, detail: Value) -> bool {
    compile(&pattern).matches(&event("test", "Test", detail))
}

#[test]
fn each_handler_rule_matches_exactly_the_catalogue_events_it_consumes() {
    for handler in HandlerName::ALL {
        let pattern = compile(&event_pattern(handler));
        for spec in EVENTS {
            let ev = event(&spec.source(), spec.detail_type, json!({"order_id": "o-1"}));
            assert_eq!(
                pattern.matches(&ev),
                spec.consumers.contains(&handler),
                "{handler:?} and {} from {}",
                spec.detail_type,
                spec.source()
            );
            let impostor = event("orderfleet.impostor", spec.detail_type, json!({}));
            assert!(
                !pattern.matches(&impostor),
                "{handler:?} takes {} from an unknown source",
                spec.detail_type
            );
        }
    }
}

#[test]
fn the_partner_rule_takes_every_event_of_its_source_and_nothing_else() {
    let topo = Topology {
        partner_sources: vec![PARTNER.into()],
        ..Topology::with_prefix("t")
    };
    let rules = topo.external_rules();
    let [rule] = rules.as_slice() else {
        panic!("one partner rule expected, got {rules:?}")
    };
    assert_eq!(rule.handler, HandlerName::Storefront);
    assert_eq!(rule.bus, ExternalBus::Partner(PARTNER.into()));
    let pattern = compile(&rule.pattern);
    assert!(pattern.matches(&event(PARTNER, "shopifyWebhook", json!({"metadata": {}}))));
    assert!(pattern.matches(&event(PARTNER, "anything", json!({}))));
    assert!(!pattern.matches(&event(
        "aws.partner/shopify.com/2/other",
        "shopifyWebhook",
        json!({})
    )));
    assert!(!pattern.matches(&event("orderfleet.storefront", "OrderPlaced", json!({}))));
}

#[test]
fn the_ses_rule_takes_bounces_and_complaints_of_its_configuration_set_only() {
    let topo = Topology {
        ses_configuration_set: Some("fleet-set".into()),
        ..Topology::with_prefix("t")
    };
    let rules = topo.external_rules();
    let [rule] = rules.as_slice() else {
        panic!("one SES rule expected, got {rules:?}")
    };
    assert_eq!(rule.bus, ExternalBus::Default);
    let pattern = compile(&rule.pattern);
    let mail = |set: &str| {
        json!({
            "eventType": "Bounce",
            "bounce": {"bounceType": "Permanent"},
            "mail": {"tags": {"ses:configuration-set": [set], "ses:caller-identity": ["me"]}}
        })
    };
    assert!(pattern.matches(&event("aws.ses", "Email Bounced", mail("fleet-set"))));
    assert!(pattern.matches(&event(
        "aws.ses",
        "Email Complaint Received",
        mail("fleet-set")
    )));
    assert!(
        !pattern.matches(&event("aws.ses", "Email Bounced", mail("other-set"))),
        "another configuration set's bounce must not reach the fleet"
    );
    assert!(!pattern.matches(&event("aws.ses", "Email Delivered", mail("fleet-set"))));
    assert!(!pattern.matches(&event("aws.ses", "Email Bounced", json!({"mail": {}}))));
    assert!(!pattern.matches(&event(
        "orderfleet.storefront",
        "Email Bounced",
        mail("fleet-set")
    )));
}

#[test]
fn exact_values_match_by_type() {
    let pattern = json!({"detail": {"s": ["a"], "n": [5], "b": [true], "z": [null]}});
    assert!(matches_detail(
        pattern.clone(),
        json!({"s": "a", "n": 5.0, "b": true, "z": null})
    ));
    assert!(!matches_detail(
        pattern.clone(),
        json!({"s": "a", "n": "5", "b": true, "z": null})
    ));
    assert!(!matches_detail(
        pattern,
        json!({"s": "a", "n": 5, "b": "true", "z": null})
    ));
}

#[test]
fn an_event_array_matches_when_any_element_does() {
    let pattern = json!({"detail": {"tags": ["x"]}});
    assert!(matches_detail(pattern.clone(), json!({"tags": ["w", "x"]})));
    assert!(!matches_detail(pattern, json!({"tags": ["w", "y"]})));
}

#[test]
fn prefix_and_suffix_match_strings_with_and_without_case() {
    assert!(matches_detail(
        json!({"detail": {"r": [{"prefix": "us-"}]}}),
        json!({"r": "us-east-1"})
    ));
    assert!(!matches_detail(
        json!({"detail": {"r": [{"prefix": "us-"}]}}),
        json!({"r": "eu-west-1"})
    ));
    assert!(matches_detail(
        json!({"detail": {"r": [{"prefix": {"equals-ignore-case": "US-"}}]}}),
        json!({"r": "us-east-1"})
    ));
    assert!(matches_detail(
        json!({"detail": {"f": [{"suffix": ".png"}]}}),
        json!({"f": "a.png"})
    ));
    assert!(!matches_detail(
        json!({"detail": {"f": [{"suffix": ".png"}]}}),
        json!({"f": "a.PNG"})
    ));
    assert!(matches_detail(
        json!({"detail": {"f": [{"suffix": {"equals-ignore-case": ".png"}}]}}),
        json!({"f": "a.PNG"})
    ));
    assert!(!matches_detail(
        json!({"detail": {"n": [{"prefix": "1"}]}}),
        json!({"n": 12})
    ));
}

#[test]
fn anything_but_matches_every_present_value_it_does_not_name() {
    let cases = [
        (
            json!({"anything-but": "init"}),
            json!("done"),
            json!("init"),
        ),
        (json!({"anything-but": ["a", "b"]}), json!("c"), json!("b")),
        (json!({"anything-but": [1, 2]}), json!(3), json!(2)),
        (
            json!({"anything-but": {"prefix": "us-"}}),
            json!("eu-1"),
            json!("us-1"),
        ),
        (
            json!({"anything-but": {"suffix": ".png"}}),
            json!("a.jpg"),
            json!("a.png"),
        ),
        (
            json!({"anything-but": {"equals-ignore-case": ["Init", "x"]}}),
            json!("done"),
            json!("INIT"),
        ),
        (
            json!({"anything-but": {"wildcard": "*/lib/*"}}),
            json!("/usr/bin/x"),
            json!("/usr/lib/x"),
        ),
    ];
    for (filter, yes, no) in cases {
        let pattern = json!({"detail": {"v": [filter]}});
        assert!(
            matches_detail(pattern.clone(), json!({"v": yes})),
            "{pattern} {yes}"
        );
        assert!(
            !matches_detail(pattern.clone(), json!({"v": no})),
            "{pattern} {no}"
        );
        assert!(
            !matches_detail(pattern, json!({})),
            "anything-but needs the field"
        );
    }
}

#[test]
fn numeric_compares_numbers_only() {
    let range = json!({"detail": {"p": [{"numeric": [">", 0, "<=", 5]}]}});
    assert!(matches_detail(range.clone(), json!({"p": 5})));
    assert!(matches_detail(range.clone(), json!({"p": 0.5})));
    assert!(!matches_detail(range.clone(), json!({"p": 0})));
    assert!(!matches_detail(range.clone(), json!({"p": 5.01})));
    assert!(!matches_detail(range, json!({"p": "3"})));
    let equal = json!({"detail": {"p": [{"numeric": ["=", 300]}]}});
    assert!(matches_detail(equal.clone(), json!({"p": 300.0})));
    assert!(!matches_detail(equal, json!({"p": 301})));
}

#[test]
fn exists_tests_for_a_leaf_value() {
    let present = json!({"detail": {"c": [{"exists": true}]}});
    let absent = json!({"detail": {"c": [{"exists": false}]}});
    assert!(matches_detail(present.clone(), json!({"c": "x"})));
    assert!(!matches_detail(present, json!({"d": "x"})));
    assert!(matches_detail(absent.clone(), json!({"d": "x"})));
    assert!(!matches_detail(absent, json!({"c": null})));
}

#[test]
fn equals_ignore_case_and_wildcard_match_strings() {
    let eic = json!({"detail": {"n": [{"equals-ignore-case": "alice"}]}});
    assert!(matches_detail(eic.clone(), json!({"n": "ALICE"})));
    assert!(!matches_detail(eic, json!({"n": "alicia"})));
    let wild = json!({"detail": {"k": [{"wildcard": "dir/*.png"}]}});
    assert!(matches_detail(wild.clone(), json!({"k": "dir/a/b.png"})));
    assert!(!matches_detail(wild, json!({"k": "dir/a.jpg"})));
}

#[test]
fn or_needs_one_alternative_besides_the_other_keys() {
    let pattern = json!({
        "source": ["test"],
        "detail": {"$or": [{"a": ["1"]}, {"b": [{"numeric": [">", 10]}]}]}
    });
    assert!(matches_detail(pattern.clone(), json!({"a": "1"})));
    assert!(matches_detail(pattern.clone(), json!({"b": 11})));
    assert!(!matches_detail(pattern.clone(), json!({"a": "2", "b": 3})));
    let wrong_source = compile(&pattern).matches(&event("other", "Test", json!({"a": "1"})));
    assert!(!wrong_source);
}

#[test]
fn patterns_it_cannot_match_faithfully_are_refused() {
    let refused = [
        json!([]),
        json!({}),
        json!({"source": "orderfleet.orders"}),
        json!({"source": []}),
        json!({"detail": {}}),
        json!({"source": [["nested"]]}),
        json!({"detail": {"ip": [{"cidr": "10.0.0.0/24"}]}}),
        json!({"detail": {"x": [{"contains": "y"}]}}),
        json!({"detail": {"x": [{"prefix": 1}]}}),
        json!({"detail": {"x": [{"prefix": "a", "suffix": "b"}]}}),
        json!({"detail": {"x": [{"numeric": ["<", 1, ">", 0]}]}}),
        json!({"detail": {"x": [{"numeric": [">", "1"]}]}}),
        json!({"detail": {"x": [{"numeric": ["<", 6e9]}]}}),
        json!({"detail": {"x": [{"exists": "yes"}]}}),
        json!({"detail": {"x": [{"anything-but": ["a", 1]}]}}),
        json!({"detail": {"x": [{"wildcard": "a**"}]}}),
        json!({"detail": {"$or": [{"a": ["1"]}]}}),
    ];
    for pattern in refused {
        assert!(
            Pattern::compile(&pattern).is_err(),
            "{pattern} should be refused"
        );
    }
    assert!(Pattern::parse("{\"source\": [").is_err());
}
