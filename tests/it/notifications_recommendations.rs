//! "Customers also bought" in confirmation emails: completed orders feed personalization's
//! co-occurrence table, and the next confirmation lists what was bought together, most often
//! first. Handlers are built the way the worker builds them (`worker::deps::build` from `Deps`).

use crate::support;
use crate::support::notifications::*;
use crate::support::saga::{assert_no_dead_letters, order, stock_sku};
use orderfleet::domain::names::HandlerName;
use orderfleet::providers::email::EmailArgs;
use orderfleet::worker::deps::{self, Deps, DepsArgs};

/// (sku, quantity, unit price in EUR minor units).
type Line = (&'static str, i64, i64);

fn confirmation_text(outbox: &std::path::Path, order_id: &str) -> String {
    let raw = std::fs::read(outbox.join(format!("{order_id}.confirmation.eml"))).unwrap();
    assert_well_formed(&raw, "ada@example.com")
        .part("text/plain")
        .unwrap()
}

#[tokio::test]
async fn after_enough_orders_recommendations_appear_in_the_confirmation_email() {
    let (pool, url) = support::fresh_db().await;
    let clients = support::clients().await;
    let outbox = TempDir::new("of-outbox-");
    let args = DepsArgs {
        email: EmailArgs {
            outbox_dir: outbox.path().to_path_buf(),
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
    // The first confirmation went out before anything was bought: nothing to recommend.
    assert!(!confirmation_text(outbox.path(), "ord-h1").contains("also bought"));

    fleet
        .publish_event(&order("ord-new", &[("TEA-1", 1, 500)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();

    let text = confirmation_text(outbox.path(), "ord-new");
    assert!(
        text.contains(
            "Customers who bought these also bought:\n  - Product CUP-1 (CUP-1)\n  - Product SPOON-1 (SPOON-1)\n"
        ),
        "{text}"
    );
    assert!(
        !text.contains("MUG-1"),
        "never bought with a teapot: {text}"
    );
    let raw = std::fs::read(outbox.path().join("ord-new.confirmation.eml")).unwrap();
    let html = parse(&raw).part("text/html").unwrap();
    assert!(
        html.contains("Customers who bought these also bought"),
        "{html}"
    );
    assert!(html.contains("Product CUP-1"), "{html}");

    // A mug has no companions yet: its confirmation has no recommendations section.
    fleet
        .publish_event(&order("ord-mug", &[("MUG-1", 1, 500)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert!(!confirmation_text(outbox.path(), "ord-mug").contains("also bought"));
}
