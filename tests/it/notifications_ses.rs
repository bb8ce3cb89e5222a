//! Customer emails through SES v2 on the local AWS emulator (moto 5.2.5): the real
//! `aws-sdk-sesv2` client sends the raw MIME message with `SendEmail`, and the test reads what
//! moto stored (`GET /moto-api/data.json`, section `ses.RawMessage`: `id`, `source`,
//! `destinations`, `raw_data`).

use std::sync::Arc;

use crate::support;
use crate::support::notifications::*;
use orderfleet::domain::names::HandlerName;
use orderfleet::domain::outcome::HandlerError;
use orderfleet::providers::email::transport::Ses;
use orderfleet::providers::email::{self, Mailer, Templates};
use orderfleet::runtime::Executed;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn sesv2() -> aws_sdk_sesv2::Client {
    support::env("AWS_ENDPOINT_URL");
    aws_sdk_sesv2::Client::new(&orderfleet::infra::aws::sdk_config().await)
}

/// A sender in a domain of its own, so that tests sharing the emulator do not see each
/// other's identities.
fn sender() -> (String, String) {
    let domain = format!("{}.example", support::unique("shop-"));
    (domain.clone(), format!("orders@{domain}"))
}

fn ses_mailer(client: aws_sdk_sesv2::Client, from: &str) -> Arc<Mailer> {
    Arc::new(Mailer::new(
        email::parse_from(&format!("orderfleet shop <{from}>")).unwrap(),
        Templates::built_in().unwrap(),
        Arc::new(Ses::new(client, from.to_string(), None)),
    ))
}

/// moto's state dump. The dump serialises every backend, and moto 5.2.5 fails it with a 500
/// ("Object of type Rule is not JSON serializable") while another test is changing its
/// EventBridge rules; so a 500 is asked again, a few times.
async fn moto_data() -> Value {
    for _ in 0..20 {
        if let Some(data) = moto_data_once().await {
            return data;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    panic!("moto's /moto-api/data.json kept answering 500");
}

/// One read of moto's state dump with a plain HTTP/1.0 GET (no HTTP client dependency for a
/// test); `None` on a 500.
async fn moto_data_once() -> Option<Value> {
    let endpoint = support::env("AWS_ENDPOINT_URL");
    let authority = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
    stream
        .write_all(
            format!("GET /moto-api/data.json HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let status = String::from_utf8_lossy(&response[..split]);
    if status.starts_with("HTTP/1.") && status.contains(" 500 ") {
        return None;
    }
    assert!(
        status.starts_with("HTTP/1.") && status.contains(" 200 "),
        "{status}"
    );
    Some(serde_json::from_slice(&response[split + 4..]).unwrap())
}

/// The raw messages moto's SES stored whose MIME holds `needle`.
async fn sent_raw_messages(needle: &str) -> Vec<Value> {
    let data = moto_data().await;
    data["ses"]["RawMessage"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m["raw_data"].as_str().is_some_and(|r| r.contains(needle)))
        .collect()
}

#[tokio::test]
async fn a_confirmation_sent_through_ses_v2_is_stored_by_the_emulator() {
    let client = sesv2().await;
    let (domain, from) = sender();
    // moto, like SES, refuses to send from an identity that is not verified; moto verifies
    // created identities at once.
    client
        .create_email_identity()
        .email_identity(&domain)
        .send()
        .await
        .unwrap();
    let fleet = notifications_only(ses_mailer(client, &from)).await;
    let order_id = support::unique("ord-ses-");
    let event = envelope("OrderAccepted", &accepted(&order_id, "ada@example.com"));

    let outcome = fleet
        .deliver_to(HandlerName::Notifications, &event, 1)
        .await
        .unwrap();
    assert_eq!(outcome, Executed::Applied { emitted: 0 });

    let message_id = format!("<confirmation.{order_id}@{domain}>");
    let stored = sent_raw_messages(&message_id).await;
    assert_eq!(stored.len(), 1, "{stored:#?}");
    let stored = &stored[0];
    assert_eq!(stored["source"], from.as_str());
    let destinations: Vec<&str> = stored["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(
        destinations.iter().any(|d| d.contains("ada@example.com")),
        "{destinations:?}"
    );
    // What SES received is the same well-formed MIME message the other transports send.
    let raw = stored["raw_data"].as_str().unwrap();
    let parsed = parse(raw.as_bytes());
    assert!(parsed.defects().is_empty(), "{:?}", parsed.defects());
    assert_eq!(parsed.header("Message-ID"), Some(message_id.as_str()));
    assert_eq!(parsed.content_type(), "multipart/alternative");
    assert_eq!(parsed.part_types(), vec!["text/plain", "text/html"]);
    assert!(parsed
        .part("text/plain")
        .unwrap()
        .contains("Total: EUR 28.50"));

    let rows = emails(fleet.pool()).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "sent");
    assert_eq!(rows[0].transport, "ses");
    // SES's own MessageId is kept, to match bounce and complaint notifications later.
    assert_eq!(
        rows[0].provider_message_id.as_deref(),
        stored["id"].as_str()
    );

    // A duplicate event sends nothing more.
    let dup = envelope("OrderAccepted", &accepted(&order_id, "ada@example.com"));
    fleet
        .deliver_to(HandlerName::Notifications, &dup, 1)
        .await
        .unwrap();
    assert_eq!(sent_raw_messages(&message_id).await.len(), 1);
}

#[tokio::test]
async fn an_unverified_sender_sends_the_event_to_the_dlq_to_redrive_once_fixed() {
    let client = sesv2().await;
    let (domain, from) = sender(); // never verified
    let fleet = notifications_only(ses_mailer(client.clone(), &from)).await;
    let order_id = support::unique("ord-ses-");
    let event = envelope("OrderAccepted", &accepted(&order_id, "ada@example.com"));

    match fleet
        .deliver_to(HandlerName::Notifications, &event, 1)
        .await
    {
        Err(HandlerError::Permanent { reason }) => {
            assert!(reason.contains("MessageRejected"), "{reason}");
            assert!(reason.contains("fix the email settings"), "{reason}");
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    // Nothing recorded, so the event still sends once redriven after the fix.
    assert!(emails(fleet.pool()).await.is_empty());

    client
        .create_email_identity()
        .email_identity(&domain)
        .send()
        .await
        .unwrap();
    let redriven = fleet
        .deliver_to(HandlerName::Notifications, &event, 1)
        .await
        .unwrap();
    assert_eq!(redriven, Executed::Applied { emitted: 0 });
    assert_eq!(
        sent_raw_messages(&format!("<confirmation.{order_id}@{domain}>"))
            .await
            .len(),
        1
    );
}
