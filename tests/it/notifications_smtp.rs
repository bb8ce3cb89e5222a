//! Customer emails through SMTP, against a real SMTP server (aiosmtpd) started by each test:
//! delivery, a throttled send retried, a rejected recipient recorded and not retried, an
//! unreachable server retried.

use std::sync::Arc;
use std::time::Duration;

use crate::support;
use crate::support::notifications::*;
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::providers::email::transport::Smtp;
use orderfleet::providers::email::SmtpTls;
use orderfleet::runtime::Executed;

#[tokio::test]
async fn a_confirmation_is_delivered_to_a_real_smtp_server() {
    let server = SmtpSink::start();
    let fleet = notifications_only(mailer(server.transport())).await;
    let event = envelope("OrderAccepted", &accepted("ord-smtp", "ada@example.com"));

    let outcome = fleet
        .deliver_to(HandlerName::Notifications, &event, 1)
        .await
        .unwrap();
    assert_eq!(outcome, Executed::Applied { emitted: 0 });

    let received = server.received();
    assert_eq!(received.len(), 1);
    let (raw, envelope) = &received[0];
    assert_eq!(envelope["mail_from"], "orders@example.com");
    assert_eq!(envelope["rcpt_tos"], serde_json::json!(["ada@example.com"]));
    let parsed = assert_well_formed(raw, "ada@example.com");
    assert_eq!(
        parsed.header("Message-ID"),
        Some("<confirmation.ord-smtp@example.com>")
    );
    let text = parsed.part("text/plain").unwrap();
    assert!(text.contains("Total: EUR 28.50"), "{text}");
    assert!(
        text.contains("2 x CUP-1 (CUP-1) at EUR 8.00: EUR 16.00"),
        "{text}"
    );

    let rows = emails(fleet.pool()).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "sent");
    assert_eq!(rows[0].transport, "smtp");
    // The server's reply is kept: it names the message in the server's logs.
    assert_eq!(
        rows[0].provider_message_id.as_deref(),
        Some("2.0.0 Ok: queued as Q0001")
    );
}

#[tokio::test]
async fn a_throttled_send_is_retried_and_delivered_once() {
    // The first MAIL FROM is answered 451 (throttled), later ones are accepted.
    let server = SmtpSink::start_with(&["--throttle-first", "1"]);
    let fleet = notifications_only(mailer(server.transport())).await;
    let event = envelope("OrderAccepted", &accepted("ord-451", "ada@example.com"));

    // First receive: retryable, and nothing is recorded (the claim rolled back).
    match fleet
        .deliver_to(HandlerName::Notifications, &event, 1)
        .await
    {
        Err(HandlerError::Retry { reason, .. }) => {
            assert!(reason.contains("451"), "{reason}");
            assert!(reason.contains("a***@example.com"), "{reason}");
            assert!(
                !reason.contains("ada@example.com"),
                "the address leaked: {reason}"
            );
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    assert!(emails(fleet.pool()).await.is_empty());
    assert!(server.received().is_empty());

    // Second receive (after the runtime's backoff in production): delivered.
    let outcome = fleet
        .deliver_to(HandlerName::Notifications, &event, 2)
        .await
        .unwrap();
    assert_eq!(outcome, Executed::Applied { emitted: 0 });
    assert_eq!(server.attempts(), 2);
    assert_eq!(server.received().len(), 1, "exactly one email");
    let rows = emails(fleet.pool()).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "sent");

    // A later duplicate sends nothing more.
    let dup = envelope("OrderAccepted", &accepted("ord-451", "ada@example.com"));
    fleet
        .deliver_to(HandlerName::Notifications, &dup, 1)
        .await
        .unwrap();
    assert_eq!(server.attempts(), 2);
    assert_eq!(server.received().len(), 1);
}

#[tokio::test]
async fn the_runtime_retries_a_throttled_send_until_it_goes_through() {
    let server = SmtpSink::start_with(&["--throttle-first", "2"]);
    let fleet = notifications_only(mailer(server.transport())).await;
    let event = envelope("OrderAccepted", &accepted("ord-451b", "ada@example.com"));
    let delivery = fleet
        .deliver_with_retries(HandlerName::Notifications, &event)
        .await;
    assert_eq!(delivery.attempts, 3);
    assert_eq!(delivery.outcome.unwrap(), Executed::Applied { emitted: 0 });
    assert_eq!(server.received().len(), 1);
    assert_eq!(fleet.stats().retries, 2);
}

#[tokio::test]
async fn a_recipient_the_server_rejects_is_recorded_as_permanent_and_not_retried() {
    let server = SmtpSink::start();
    let fleet = notifications_only(mailer(server.transport())).await;
    // The sink answers 550 5.1.1 to recipients whose local part starts with "reject".
    let event = envelope(
        "OrderAccepted",
        &accepted("ord-550", "rejected.customer@example.com"),
    );

    let delivery = fleet
        .deliver_with_retries(HandlerName::Notifications, &event)
        .await;
    assert_eq!(delivery.attempts, 1, "not retried");
    assert_eq!(delivery.outcome.unwrap(), Executed::Applied { emitted: 0 });
    assert!(fleet.dead_letters().is_empty(), "not dead-lettered");
    assert_eq!(server.attempts(), 1);
    assert!(server.received().is_empty());

    let rows = emails(fleet.pool()).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "failed_permanent");
    assert_eq!(rows[0].recipient_masked, "r***@example.com");
    let error = rows[0].error.as_deref().unwrap();
    assert!(error.contains("550"), "{error}");
    assert!(error.contains("<r***@example.com>"), "{error}");
    assert!(
        !error.contains("rejected.customer"),
        "the address leaked: {error}"
    );

    // Redelivered or duplicated later: still one attempt.
    let again = envelope(
        "OrderAccepted",
        &accepted("ord-550", "rejected.customer@example.com"),
    );
    fleet
        .deliver_to(HandlerName::Notifications, &again, 1)
        .await
        .unwrap();
    assert_eq!(server.attempts(), 1);
}

#[tokio::test]
async fn an_unreachable_smtp_server_is_retried() {
    // A port nobody listens on: bind one, note it, free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let transport = Arc::new(
        Smtp::new(
            "127.0.0.1",
            port,
            SmtpTls::None,
            None,
            Duration::from_secs(5),
        )
        .unwrap(),
    );
    let fleet = notifications_only(mailer(transport)).await;
    let event = envelope("OrderAccepted", &accepted("ord-down", "ada@example.com"));
    match fleet
        .deliver_to(HandlerName::Notifications, &event, 1)
        .await
    {
        Err(HandlerError::Retry { reason, .. }) => {
            assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}")
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    assert!(emails(fleet.pool()).await.is_empty());
}

#[tokio::test]
async fn a_server_without_starttls_is_a_configuration_error_and_nothing_goes_in_clear() {
    let server = SmtpSink::start();
    let transport = Arc::new(
        Smtp::new(
            "127.0.0.1",
            server.port,
            SmtpTls::Starttls,
            None,
            Duration::from_secs(5),
        )
        .unwrap(),
    );
    let fleet = notifications_only(mailer(transport)).await;
    let event = envelope("OrderAccepted", &accepted("ord-tls", "ada@example.com"));
    // STARTTLS is required by our settings and the server does not offer it: no retry can
    // help, so the event goes to the DLQ with a reason that says what to fix.
    match fleet
        .deliver_to(HandlerName::Notifications, &event, 1)
        .await
    {
        Err(HandlerError::Permanent { reason }) => {
            assert!(reason.contains("STARTTLS"), "{reason}");
            assert!(reason.contains("fix the email settings"), "{reason}");
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert!(emails(fleet.pool()).await.is_empty(), "nothing recorded");
    assert_eq!(server.attempts(), 0, "nothing was sent in clear text");
    assert!(server.received().is_empty());
}

#[tokio::test]
async fn a_send_to_a_server_that_hangs_ends_before_the_handler_s_time_with_its_reason() {
    use orderfleet::handlers::notifications::Notifications;
    use orderfleet::runtime::lease::Leases;
    use orderfleet::runtime::{Consumer, Transactional};
    use orderfleet::telemetry::metrics::Counters;
    use tokio_util::sync::CancellationToken;

    // An SMTP server that accepts connections and never says a word; the transport's own
    // timeout (30 s) is far longer than the handler's (4 s).
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hung.local_addr().unwrap().port();
    let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
    let held = connections.clone();
    let listener = tokio::spawn(async move {
        while let Ok((socket, _)) = hung.accept().await {
            held.lock().unwrap().push(socket);
        }
    });
    let transport = Arc::new(
        Smtp::new(
            "127.0.0.1",
            port,
            SmtpTls::None,
            None,
            Duration::from_secs(30),
        )
        .unwrap(),
    );
    let mailer = Arc::new(
        Arc::try_unwrap(mailer(transport))
            .ok()
            .unwrap()
            .with_send_timeout(Duration::from_secs(30)),
    );
    let (pool, _) = support::fresh_db().await;
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let facts = orderfleet::sqs::queue::inspect_queue(
        &clients.sqs,
        &topo.queue_name(HandlerName::Inventory),
    )
    .await
    .unwrap();
    let mut cfg = support::consumer_config(&facts);
    cfg.handler_timeout = Duration::from_secs(4);
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let consumer = Consumer {
        cfg,
        sqs: clients.sqs.clone(),
        handler: Transactional::new(Arc::new(Notifications::new(mailer)), pool.clone()),
        leases: Leases::default(),
        counters: counters.clone(),
        relay_wake: None,
    };
    let task = tokio::spawn(consumer.run(stop.clone()));
    let event = envelope("OrderAccepted", &accepted("ord-hung", "ada@example.com"));
    support::send_bodies(
        &clients,
        &facts.queue_url,
        &[serde_json::to_string(&event).unwrap()],
    )
    .await;
    let c = counters.clone();
    support::wait_for(Duration::from_secs(20), "the first attempt's end", || {
        let c = c.clone();
        async move {
            let s = c.snapshot();
            (s.retried + s.timeouts > 0).then_some(())
        }
    })
    .await;
    let s = counters.snapshot();
    assert_eq!(
        (s.timeouts, s.retried),
        (0, 1),
        "the send must end by its own bound, with its reason, not be abandoned by the runtime"
    );
    assert_eq!(connections.lock().unwrap().len(), 1, "one connection tried");
    assert!(emails(&pool).await.is_empty(), "the claim was rolled back");
    stop.cancel();
    task.await.unwrap().unwrap();
    listener.abort();
}
