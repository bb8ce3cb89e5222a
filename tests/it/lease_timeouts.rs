//! A hung ChangeMessageVisibilityBatch must not stop the other leases: a local proxy in front
//! of the emulator never answers the calls for one queue, and the leases on another queue are
//! still extended within the tick.

use std::sync::Arc;
use std::time::Duration;

use crate::support;
use orderfleet::runtime::lease::Leases;
use orderfleet::telemetry::metrics::Counters;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Reads one HTTP/1.1 request (headers and a `Content-Length` body) from `s`.
async fn read_request(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + length {
            return Some(buf);
        }
    }
}

/// A proxy to `upstream` that holds, unanswered, every connection whose first request
/// mentions `hang`, and forwards every other connection.
async fn hanging_proxy(upstream: String, hang: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (upstream, hang) = (upstream.clone(), hang.clone());
            tokio::spawn(async move {
                let Some(request) = read_request(&mut s).await else {
                    return;
                };
                if String::from_utf8_lossy(&request).contains(&hang) {
                    // Never answer; keep the connection open until the test ends.
                    std::future::pending::<()>().await;
                }
                let mut up = TcpStream::connect(&upstream).await.unwrap();
                up.write_all(&request).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_hung_lease_extension_on_one_queue_does_not_stop_the_leases_of_another() {
    let clients = support::clients().await;
    let endpoint = support::env("AWS_ENDPOINT_URL");
    let upstream = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let queue_url = clients
        .sqs
        .create_queue()
        .queue_name(support::unique("lease"))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    clients
        .sqs
        .send_message()
        .queue_url(&queue_url)
        .message_body("m")
        .send()
        .await
        .unwrap();
    let received = clients
        .sqs
        .receive_message()
        .queue_url(&queue_url)
        .visibility_timeout(2)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    let receipt = received.messages()[0].receipt_handle().unwrap().to_string();

    let hung_queue = support::unique("hung");
    let proxy = hanging_proxy(upstream, hung_queue.clone()).await;
    let config = orderfleet::infra::aws::sdk_config().await;
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&config)
            .endpoint_url(proxy)
            .build(),
    );

    let leases = Leases::default();
    // Both leases are due: half of their 2 s visibility is left.
    let received_at = Instant::now() - Duration::from_millis(1500);
    let live = Arc::new(Counters::default());
    let hung = Arc::new(Counters::default());
    let _live = leases.hold(
        queue_url.clone().into(),
        receipt,
        received_at,
        Duration::from_secs(2),
        live.clone(),
    );
    let _hung = leases.hold(
        format!("{endpoint}/123456789012/{hung_queue}").into(),
        "a-receipt".into(),
        received_at,
        Duration::from_secs(2),
        hung.clone(),
    );

    let started = Instant::now();
    let tick = tokio::spawn({
        let (leases, sqs) = (leases.clone(), sqs.clone());
        async move { leases.extend_due(&sqs).await }
    });
    // Within a lease tick (1 s) and well before the hung call's timeout (5 s).
    support::wait_for(
        Duration::from_secs(2),
        "the other queue's lease extended while one call hangs",
        || {
            let live = live.clone();
            async move { (live.snapshot().lease_extensions == 1).then_some(()) }
        },
    )
    .await;
    let finished = tokio::time::timeout(Duration::from_secs(8), tick).await;
    assert!(
        finished.is_ok(),
        "extend_due still waits on the hung call after {:?}",
        started.elapsed()
    );
    assert_eq!(hung.snapshot().lease_extensions, 0);
}
