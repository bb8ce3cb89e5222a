//! "Customers also bought": completed orders feed personalization's co-occurrence table, and
//! the recommendations email sent when an order completes lists what was bought together
//! with its items, most often first. It is marketing, so it needs an unsubscribe URL (see
//! `notifications_deliverability.rs` for the headers and opt-outs); the confirmation never
//! carries recommendations. Handlers are built the way the worker builds them
//! (`worker::deps::build` from `Deps`).

use crate::support;
use crate::support::notifications::*;
use crate::support::saga::{assert_no_dead_letters, order, stock_sku};
use orderfleet::domain::names::HandlerName;
use orderfleet::providers::email::{EmailArgs, Secret};
use orderfleet::worker::deps::{self, Deps, DepsArgs};

/// (sku, quantity, unit price in EUR minor units).
type Line = (&'static str, i64, i64);

fn email_text(outbox: &std::path::Path, order_id: &str, kind: &str) -> Option<String> {
    let raw = std::fs::read(outbox.join(format!("{order_id}.{kind}.eml"))).ok()?;
    assert_well_formed(&raw, "ada@example.com").part("text/plain")
}

#[tokio::test]
async fn after_enough_orders_a_completed_order_brings_a_recommendations_email() {
    let (pool, url) = support::fresh_db().await;
    let clients = support::clients().await;
    let outbox = TempDir::new("of-outbox-");
    let args = DepsArgs {
        email: EmailArgs {
            outbox_dir: outbox.path().to_path_buf(),
            unsubscribe_url: Some("https://shop.example/unsubscribe".into()),
            unsubscribe_key: Some(Secret("a key of at least thirty-two bytes".into())),
            hash_key: Some(Secret("an address hash key of thirty-two bytes".into())),
            ..EmailArgs::default()
        },
        ..DepsArgs::default()
    };
    let deps = Deps::new(&args, &pool, &clients).await.unwrap();
    let fleet = support::saga::sandbox_fleet(pool.clone(), &url)
        .with_handler(
            HandlerName::Personalization,
            deps::build(HandlerName::Personalization, &deps).unwrap(),
        )
        .with_handler(
            HandlerName::Notifications,
            deps::build(HandlerName::Notifications, &deps).unwrap(),
        );
    for sku in ["TEA-1", "CUP-1", "SPOON-1", "MUG-1"] {
        stock_sku(&fleet, sku, 500, 50).await;
    }

    // Teapots sell with cups three times, with a spoon once; mugs sell alone.
    let history: [(&str, &[Line]); 5] = [
        ("ord-h1", &[("TEA-1", 1, 500), ("CUP-1", 2, 500)]),
        ("ord-h2", &[("TEA-1", 1, 500), ("CUP-1", 1, 500)]),
        ("ord-h3", &[("CUP-1", 4, 500), ("TEA-1", 1, 500)]),
        ("ord-h4", &[("TEA-1", 1, 500), ("SPOON-1", 1, 500)]),
        ("ord-h5", &[("MUG-1", 1, 500)]),
    ];
    for (id, lines) in history {
        fleet
            .publish_event(&order(id, lines, "tok_visa"))
            .await
            .unwrap();
        fleet.run_until_quiet().await.unwrap();
        assert_eq!(support::saga::status(&pool, id).await, "completed");
    }
    assert_no_dead_letters(&fleet);
    // The first order completed before anything else was bought: nothing to recommend, so no
    // recommendations email; its confirmation has none either.
    assert!(email_text(outbox.path(), "ord-h1", "recommendations").is_none());
    assert!(!email_text(outbox.path(), "ord-h1", "confirmation")
        .unwrap()
        .contains("also bought"));

    fleet
        .publish_event(&order("ord-new", &[("TEA-1", 1, 500)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    let text = email_text(outbox.path(), "ord-new", "recommendations").unwrap();
    assert!(
        text.contains(
            "Customers who bought the same also bought:\n\n  - Product CUP-1 (CUP-1)\n  - Product SPOON-1 (SPOON-1)\n"
        ),
        "{text}"
    );
    assert!(
        !text.contains("MUG-1"),
        "never bought with a teapot: {text}"
    );
    let raw = std::fs::read(outbox.path().join("ord-new.recommendations.eml")).unwrap();
    let html = parse(&raw).part("text/html").unwrap();
    assert!(
        html.contains("Customers who bought the same also bought"),
        "{html}"
    );
    assert!(html.contains("Product CUP-1"), "{html}");

    // A mug has no companions yet: no recommendations email.
    fleet
        .publish_event(&order("ord-mug", &[("MUG-1", 1, 500)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert!(email_text(outbox.path(), "ord-mug", "recommendations").is_none());
    assert!(email_text(outbox.path(), "ord-mug", "confirmation").is_some());
}
