//! Customer emails through the file outbox: `.eml` files a mail client can open (checked with
//! Python's standard email parser), one per order and kind, for every step of the saga.

use crate::support;
use crate::support::notifications::*;
use crate::support::saga::{assert_no_dead_letters, order, stock_sku};
use orderfleet::domain::names::HandlerName;
use orderfleet::runtime::Executed;

fn read(dir: &std::path::Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}; the outbox holds {:?}", eml_files(dir)))
}

#[tokio::test]
async fn a_completed_order_gets_one_confirmation_and_one_shipped_email_as_private_eml_files() {
    let outbox = TempDir::new("of-outbox-");
    let fleet = fleet(file_mailer(outbox.path())).await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1250, 10).await;
    stock_sku(&fleet, "CUP-1", 800, 4).await;
    fleet
        .publish_event(&order(
            "ord-1",
            &[("TEA-1", 2, 1250), ("CUP-1", 1, 800)],
            "tok_visa",
        ))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_no_dead_letters(&fleet);
    assert_eq!(support::saga::status(&pool, "ord-1").await, "completed");

    assert_eq!(
        eml_files(outbox.path()),
        vec![
            outbox.path().join("ord-1.confirmation.eml"),
            outbox.path().join("ord-1.shipped.eml"),
        ]
    );
    for file in eml_files(outbox.path()) {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is readable by others", file.display());
    }

    let confirmation = assert_well_formed(
        &read(outbox.path(), "ord-1.confirmation.eml"),
        "ada@example.com",
    );
    assert_eq!(
        confirmation.header("Message-ID"),
        Some("<confirmation.ord-1@example.com>")
    );
    assert_eq!(
        confirmation.header("Subject"),
        Some("Your order ord-1 is confirmed")
    );
    assert!(confirmation.header("To").unwrap().contains("Ada Lovelace"));
    let text = confirmation.part("text/plain").unwrap();
    for expected in [
        "Hello Ada Lovelace",
        "2 x Product TEA-1 (TEA-1) at EUR 12.50: EUR 25.00",
        "1 x Product CUP-1 (CUP-1) at EUR 8.00: EUR 8.00",
        "Total: EUR 33.00",
        "SW1Y 4JH London",
    ] {
        assert!(text.contains(expected), "{expected:?} not in\n{text}");
    }
    // Nothing was bought before, so nothing to recommend yet.
    assert!(!text.contains("also bought"), "{text}");
    let html = confirmation.part("text/html").unwrap();
    assert!(
        html.contains("Product TEA-1") && html.contains("EUR 33.00"),
        "{html}"
    );

    let shipped = assert_well_formed(&read(outbox.path(), "ord-1.shipped.eml"), "ada@example.com");
    let tracking = support::saga::order_row(&pool, "ord-1")
        .await
        .tracking_number
        .unwrap();
    assert_eq!(
        shipped.header("Message-ID"),
        Some("<shipped.ord-1@example.com>")
    );
    let text = shipped.part("text/plain").unwrap();
    assert!(
        text.contains(&format!("Tracking number: {tracking}")),
        "{text}"
    );
    assert!(text.contains("2 x Product TEA-1 (TEA-1)"), "{text}");
    assert!(shipped.part("text/html").unwrap().contains(&tracking));

    let rows = emails(&pool).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for (row, kind) in rows.iter().zip(["confirmation", "shipped"]) {
        assert_eq!(row.kind, kind);
        assert_eq!(row.status, "sent");
        assert!(row.sent);
        assert_eq!(row.transport, "file");
        assert_eq!(row.recipient_masked, "a***@example.com");
        assert_eq!(row.message_id, format!("<{kind}.ord-1@example.com>"));
        assert_eq!(
            row.provider_message_id.as_deref(),
            Some(format!("ord-1.{kind}.eml").as_str())
        );
    }
}

#[tokio::test]
async fn a_cancelled_order_says_why_and_that_the_hold_was_released() {
    let outbox = TempDir::new("of-outbox-");
    let fleet = fleet(file_mailer(outbox.path())).await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 10).await;
    fleet
        .publish_event(&order("ord-c", &[("TEA-1", 2, 1000)], "tok_visa"))
        .await
        .unwrap();
    // The cancellation arrives while the reservation and authorization are in flight.
    fleet
        .publish_event(&support::saga::cancellation("ord-c"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_no_dead_letters(&fleet);
    assert_eq!(support::saga::status(&pool, "ord-c").await, "cancelled");
    assert_eq!(support::saga::payment(&pool, "ord-c").await.0, "voided");

    let cancelled = assert_well_formed(
        &read(outbox.path(), "ord-c.cancelled.eml"),
        "ada@example.com",
    );
    assert_eq!(
        cancelled.header("Subject"),
        Some("Your order ord-c was cancelled")
    );
    let text = cancelled.part("text/plain").unwrap();
    assert!(text.contains("was cancelled, as requested."), "{text}");
    assert!(
        text.contains(
            "the hold of EUR 20.00 on your card has been released. You were not charged."
        ),
        "{text}"
    );
    assert!(!outbox.path().join("ord-c.shipped.eml").exists());
    let kinds: Vec<String> = emails(&pool).await.into_iter().map(|r| r.kind).collect();
    assert_eq!(kinds, vec!["cancelled", "confirmation"]);
}

#[tokio::test]
async fn an_order_cancelled_for_a_declined_card_says_nothing_was_charged() {
    let outbox = TempDir::new("of-outbox-");
    let fleet = fleet(file_mailer(outbox.path())).await;
    stock_sku(&fleet, "TEA-1", 1000, 10).await;
    fleet
        .publish_event(&order("ord-d", &[("TEA-1", 1, 1000)], "tok_decline"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_no_dead_letters(&fleet);

    let cancelled = assert_well_formed(
        &read(outbox.path(), "ord-d.cancelled.eml"),
        "ada@example.com",
    );
    let text = cancelled.part("text/plain").unwrap();
    assert!(
        text.contains("because the payment could not be authorized."),
        "{text}"
    );
    assert!(text.contains("Your money: nothing was charged."), "{text}");
    let html = cancelled.part("text/html").unwrap();
    assert!(html.contains("nothing was charged"), "{html}");
}

#[tokio::test]
async fn a_returned_parcel_is_refunded_and_the_customer_is_told() {
    let outbox = TempDir::new("of-outbox-");
    let fleet = fleet(file_mailer(outbox.path())).await;
    let pool = fleet.pool().clone();
    stock_sku(&fleet, "TEA-1", 1000, 10).await;
    let mut placed = order("ord-ret", &[("TEA-1", 2, 1000)], "tok_visa");
    placed.shipping_address.postal_code =
        orderfleet::providers::carrier::UNDELIVERABLE_POSTAL_CODE.into();
    fleet.publish_event(&placed).await.unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_no_dead_letters(&fleet);
    assert_eq!(support::saga::payment(&pool, "ord-ret").await.0, "refunded");

    let refunded = assert_well_formed(
        &read(outbox.path(), "ord-ret.refunded.eml"),
        "ada@example.com",
    );
    assert_eq!(
        refunded.header("Subject"),
        Some("Refund of EUR 20.00 for order ord-ret")
    );
    let text = refunded.part("text/plain").unwrap();
    assert!(
        text.contains("could not be delivered and came back to us"),
        "{text}"
    );
    assert!(
        text.contains("We refunded EUR 20.00 for order ord-ret"),
        "{text}"
    );
    let kinds: Vec<String> = emails(&pool).await.into_iter().map(|r| r.kind).collect();
    assert_eq!(kinds, vec!["confirmation", "refunded", "shipped"]);
}

#[tokio::test]
async fn duplicate_events_give_one_email() {
    let outbox = TempDir::new("of-outbox-");
    let fleet = notifications_only(file_mailer(outbox.path())).await;
    let event = envelope("OrderAccepted", &accepted("ord-dup", "ada@example.com"));

    let first = fleet
        .deliver_to(HandlerName::Notifications, &event, 1)
        .await
        .unwrap();
    assert_eq!(first, Executed::Applied { emitted: 0 });
    let sent = std::fs::read(outbox.path().join("ord-dup.confirmation.eml")).unwrap();

    // The same event again (SQS redelivery): the inbox drops it.
    let again = fleet
        .deliver_to(HandlerName::Notifications, &event, 2)
        .await
        .unwrap();
    assert_eq!(again, Executed::Duplicate);

    // Another event for the same order and kind (a re-publication under a new event id): the
    // emails table drops it.
    let other = envelope("OrderAccepted", &accepted("ord-dup", "ada@example.com"));
    let applied = fleet
        .deliver_to(HandlerName::Notifications, &other, 1)
        .await
        .unwrap();
    assert_eq!(applied, Executed::Applied { emitted: 0 });

    assert_eq!(eml_files(outbox.path()).len(), 1);
    assert_eq!(
        std::fs::read(outbox.path().join("ord-dup.confirmation.eml")).unwrap(),
        sent,
        "the email was written once"
    );
    let rows = emails(fleet.pool()).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_send_one_email() {
    let outbox = TempDir::new("of-outbox-");
    let fleet = notifications_only(file_mailer(outbox.path())).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (fleet, event) = (
            fleet.clone(),
            envelope("OrderAccepted", &accepted("ord-race", "ada@example.com")),
        );
        tasks.spawn(async move {
            fleet
                .deliver_to(HandlerName::Notifications, &event, 1)
                .await
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.unwrap();
        assert_eq!(outcome.unwrap(), Executed::Applied { emitted: 0 });
    }
    assert_eq!(eml_files(outbox.path()).len(), 1);
    let rows = emails(fleet.pool()).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "sent");
}

#[tokio::test]
async fn an_invalid_address_is_recorded_as_permanent_and_not_retried() {
    let outbox = TempDir::new("of-outbox-");
    let fleet = notifications_only(file_mailer(outbox.path())).await;
    let event = envelope("OrderAccepted", &accepted("ord-bad", "ada.example.com"));

    let delivery = fleet
        .deliver_with_retries(HandlerName::Notifications, &event)
        .await;
    assert_eq!(delivery.attempts, 1, "not retried");
    assert_eq!(delivery.outcome.unwrap(), Executed::Applied { emitted: 0 });
    assert!(fleet.dead_letters().is_empty(), "not dead-lettered");
    assert!(eml_files(outbox.path()).is_empty());

    let rows = emails(fleet.pool()).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.status, "failed_permanent");
    assert!(!row.sent);
    assert_eq!(row.recipient_masked, "a***");
    let error = row.error.as_deref().unwrap();
    assert!(error.contains("invalid address a***"), "{error}");
    assert!(
        !error.contains("ada.example.com"),
        "the address leaked: {error}"
    );

    // A later event for the same order and kind does not try again.
    let again = envelope("OrderAccepted", &accepted("ord-bad", "ada.example.com"));
    fleet
        .deliver_to(HandlerName::Notifications, &again, 1)
        .await
        .unwrap();
    assert_eq!(emails(fleet.pool()).await, rows);
}

#[tokio::test]
async fn customer_data_is_escaped_in_the_html_part_only() {
    let outbox = TempDir::new("of-outbox-");
    let fleet = notifications_only(file_mailer(outbox.path())).await;
    let mut detail = accepted("ord-x", "ada@example.com");
    detail.customer.name = "Ada <b>Lovelace</b> & Co".into();
    fleet
        .deliver_to(
            HandlerName::Notifications,
            &envelope("OrderAccepted", &detail),
            1,
        )
        .await
        .unwrap();
    let parsed = assert_well_formed(
        &std::fs::read(outbox.path().join("ord-x.confirmation.eml")).unwrap(),
        "ada@example.com",
    );
    let html = parsed.part("text/html").unwrap();
    // minijinja escapes `/` too, as `&#x2f;`.
    assert!(
        html.contains("Hello Ada &lt;b&gt;Lovelace&lt;&#x2f;b&gt; &amp; Co"),
        "{html}"
    );
    assert!(!html.contains("<b>Lovelace"), "{html}");
    let text = parsed.part("text/plain").unwrap();
    assert!(text.contains("Hello Ada <b>Lovelace</b> & Co"), "{text}");
}

#[tokio::test]
async fn a_group_writes_each_email_once_and_a_group_run_again_rewrites_the_same_files() {
    use orderfleet::domain::envelope::Envelope;
    use orderfleet::domain::outcome::HandlerError;
    use orderfleet::handlers::notifications::Notifications;
    use orderfleet::handlers::AnyHandler;
    use orderfleet::runtime::group::execute_group;

    let outbox = TempDir::new("of-outbox-");
    let (pool, _) = support::fresh_db().await;
    let handler = Notifications::new(file_mailer(outbox.path()));
    assert!(AnyHandler::group_commit(&handler), "the file outbox groups");

    // A confirmation for o1 and o2, o1's again under another event id, and between them an
    // OrderAccepted that cannot be read (poison): the group writes o1's and o2's files, reaches the
    // bad event and rolls back; the bad one is judged alone and the rest run again together.
    let mut broken = serde_json::to_value(accepted("grp-bad", "ada@example.com")).unwrap();
    broken["lines"] = serde_json::json!("not a list");
    let events: Vec<Envelope> = vec![
        envelope("OrderAccepted", &accepted("grp-1", "ada@example.com")),
        envelope("OrderAccepted", &accepted("grp-2", "grace@example.com")),
        envelope("OrderAccepted", &broken),
        envelope("OrderAccepted", &accepted("grp-1", "ada@example.com")),
    ];
    let outcome = execute_group(&handler, &pool, &support::refs(&events, 1)).await;
    let results = &outcome.results;
    assert!(
        matches!(&results[2], Err(HandlerError::Poison { .. })),
        "{results:?}"
    );
    for i in [0, 1, 3] {
        assert!(
            matches!(results[i], Ok(Executed::Applied { emitted: 0 })),
            "{i}: {results:?}"
        );
    }
    // The first round, the bad event alone, the rest together.
    assert_eq!(outcome.transactions, 3, "{results:?}");

    // One file per order and kind, though the first round wrote two of them before it rolled
    // back: the second round wrote the same names.
    let names: Vec<String> = eml_files(outbox.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["grp-1.confirmation.eml", "grp-2.confirmation.eml"]);
    let rows = emails(&pool).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter().all(|r| r.status == "sent" && r.sent),
        "{rows:?}"
    );
    assert_well_formed(
        &read(outbox.path(), "grp-2.confirmation.eml"),
        "grace@example.com",
    );
}

#[tokio::test]
async fn over_a_transport_that_sends_remotely_each_email_has_a_transaction_of_its_own() {
    use async_trait::async_trait;
    use orderfleet::handlers::notifications::Notifications;
    use orderfleet::handlers::AnyHandler;
    use orderfleet::providers::email::{EmailKey, SendError, Sent, Transport};

    /// A transport that never sends: only its kind matters here.
    struct Remote;
    #[async_trait]
    impl Transport for Remote {
        fn name(&self) -> &'static str {
            "ses"
        }
        async fn send(&self, _: &EmailKey, _: &lettre::Message) -> Result<Sent, SendError> {
            unreachable!("not sent in this test")
        }
    }
    let handler = Notifications::new(mailer(std::sync::Arc::new(Remote)));
    assert!(!AnyHandler::group_commit(&handler));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rival_groups_claiming_the_same_emails_in_opposite_order_send_each_once() {
    use orderfleet::domain::envelope::Envelope;
    use orderfleet::domain::outcome::HandlerError;
    use orderfleet::handlers::notifications::Notifications;
    use orderfleet::handlers::AnyHandler;
    use orderfleet::runtime::group::execute_group;
    use std::sync::Arc;
    use std::time::Duration;

    let outbox = TempDir::new("of-outbox-");
    let (pool, _) = support::fresh_db().await;
    let handler: Arc<dyn AnyHandler> = Arc::new(support::AtOnce {
        inner: Arc::new(Notifications::new(file_mailer(outbox.path()))),
        barrier: tokio::sync::Barrier::new(2),
    });
    // Two processes' groups at once, with the same six orders' confirmations (each its own
    // event ids) in opposite orders.
    let orders: Vec<String> = (1..=6).map(|i| format!("rival-{i}")).collect();
    let first: Vec<Envelope> = orders
        .iter()
        .map(|o| envelope("OrderAccepted", &accepted(o, "ada@example.com")))
        .collect();
    let second: Vec<Envelope> = orders
        .iter()
        .rev()
        .map(|o| envelope("OrderAccepted", &accepted(o, "ada@example.com")))
        .collect();
    let run = |events: Vec<Envelope>| {
        let (handler, pool) = (handler.clone(), pool.clone());
        tokio::spawn(async move {
            let outcome = execute_group(&*handler, &pool, &support::refs(&events, 1)).await;
            (events, outcome)
        })
    };
    let (a, b) = (run(first), run(second));
    let (a, b) = tokio::time::timeout(Duration::from_secs(20), async {
        (a.await.unwrap(), b.await.unwrap())
    })
    .await
    .expect("the groups stalled");

    // Each event was applied, or answered with a retry (PostgreSQL broke the deadlock by
    // aborting one transaction): the retried ones are received again later.
    let mut retried = Vec::new();
    for (events, outcome) in [a, b] {
        for (event, result) in events.into_iter().zip(outcome.results) {
            match result {
                Ok(Executed::Applied { .. }) => {}
                Err(HandlerError::Retry { .. }) => retried.push(event),
                other => panic!("{other:?}"),
            }
        }
    }
    let handler = Notifications::new(file_mailer(outbox.path()));
    for event in &retried {
        orderfleet::runtime::execute(&handler, &pool, event, 2)
            .await
            .unwrap();
    }
    assert_eq!(eml_files(outbox.path()).len(), orders.len());
    let rows = emails(&pool).await;
    assert_eq!(rows.len(), orders.len());
    assert!(rows.iter().all(|r| r.status == "sent"), "{rows:?}");
}
