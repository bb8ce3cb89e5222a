//! The support desk's view of one order: `orderfleet order show` (issue 15, part 2).

use orderfleet::store::db::pool_as;

use crate::support;
use crate::support::saga::*;

#[tokio::test]
async fn order_show_tells_the_whole_life_of_an_order_to_the_read_only_operator() {
    let (pool, url) = support::fresh_db().await;
    let fleet = sandbox_fleet(pool.clone(), &url);
    stock_sku(&fleet, "TEA-1", 1250, 10).await;
    let mut returned = order("ord-s1", &[("TEA-1", 2, 1250)], "tok_visa");
    returned.shipping_address.postal_code =
        orderfleet::providers::carrier::UNDELIVERABLE_POSTAL_CODE.into();
    fleet.publish_event(&returned).await.unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(status(&pool, "ord-s1").await, "returned");

    // Through the operator role: the desk sees the order without any personal data.
    let operator = pool_as(&url, 1, "orderfleet_operator").unwrap();
    let db = operator.get().await.unwrap();
    let view = orderfleet::operator::order::show(&db, "ord-s1")
        .await
        .unwrap()
        .expect("the order");
    assert_eq!(view.status, "returned");
    assert_eq!(view.total_minor, Some(2500));
    assert_eq!(view.lines.len(), 1);
    assert_eq!(view.lines[0].reservation.as_deref(), Some("released"));
    let payment = view.payment.as_ref().expect("a payment");
    assert_eq!(
        (payment.captured_minor, payment.refunded_minor),
        (2500, 2500)
    );
    assert_eq!(view.ledger.iter().map(|p| p.amount_minor).sum::<i64>(), 0);
    assert!(view.ledger.len() >= 4, "{:?}", view.ledger);
    let shipment = view.shipment.as_ref().expect("a shipment");
    assert_eq!(shipment.delivery_state.as_deref(), Some("failed"));
    let steps: Vec<&str> = view.timeline.iter().map(|s| s.what.as_str()).collect();
    assert_eq!(steps.first(), Some(&"placed"));
    assert_eq!(steps.last(), Some(&"returned (terminal)"), "{steps:?}");
    assert!(
        view.timeline.windows(2).all(|w| w[0].at <= w[1].at),
        "the timeline is in time order"
    );
    assert!(steps.iter().any(|s| s.starts_with("ledger: ")), "{steps:?}");
    assert!(
        steps.iter().any(|s| s.starts_with("shipment ")),
        "{steps:?}"
    );

    // The CLI prints the same, as text and as JSON; an unknown order exits 1.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_orderfleet"))
            .args(args)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap()
    };
    let text = cli(&["order", "show", "ord-s1"]);
    let shown = String::from_utf8_lossy(&text.stdout);
    assert!(text.status.success(), "{shown}");
    for part in ["order ord-s1  returned", "LEDGER", "SHIPMENT", "TIMELINE"] {
        assert!(shown.contains(part), "{part} missing from:\n{shown}");
    }
    assert!(!shown.contains("ada@example.com") && !shown.contains("James"));
    let json: serde_json::Value =
        serde_json::from_slice(&cli(&["order", "show", "ord-s1", "--json"]).stdout).unwrap();
    assert_eq!(json["status"], "returned");
    assert_eq!(cli(&["order", "show", "ord-nope"]).status.code(), Some(1));
}
