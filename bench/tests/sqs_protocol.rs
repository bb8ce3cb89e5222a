//! Drives the in-memory benchmark SQS endpoint (`orderfleet_bench::sqs`)
//! with the real `aws-sdk-sqs` client, to pin the wire protocol down.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use md5::{Digest, Md5};
use orderfleet_bench::sqs::{spawn_local, sqs_client, BenchSqs};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound for any single step; generous for a loaded CI machine.
const STEP: Duration = Duration::from_secs(15);

struct Endpoint {
    client: Client,
    state: BenchSqs,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn start() -> Endpoint {
    let (addr, state, server) = spawn_local(0).await.expect("bench endpoint starts");
    Endpoint {
        client: sqs_client(&format!("http://{addr}")),
        state,
        addr,
        server,
    }
}

/// Awaits `future`, failing the test if it takes longer than [`STEP`].
async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .expect("step finished in time")
}

async fn create_queue(client: &Client, name: &str) -> String {
    within(client.create_queue().queue_name(name).send())
        .await
        .expect("create queue")
        .queue_url()
        .expect("queue url")
        .to_owned()
}

async fn receive(client: &Client, url: &str, max: i32, wait: i32) -> Vec<Message> {
    within(
        client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(max)
            .wait_time_seconds(wait)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send(),
    )
    .await
    .expect("receive")
    .messages
    .unwrap_or_default()
}

async fn queue_attributes(client: &Client, url: &str) -> HashMap<QueueAttributeName, String> {
    within(
        client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send(),
    )
    .await
    .expect("get queue attributes")
    .attributes
    .unwrap_or_default()
}

fn md5_hex(data: &[u8]) -> String {
    Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn system_attribute(message: &Message, name: MessageSystemAttributeName) -> Option<String> {
    message.attributes().and_then(|a| a.get(&name)).cloned()
}

/// Calls a non-AWS `OrderfleetBench.*` target with a plain HTTP/1.1 request.
async fn bench_call(addr: SocketAddr, target: &str) -> Value {
    let mut stream = within(tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let request = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nX-Amz-Target: {target}\r\n\
         Content-Type: application/x-amz-json-1.0\r\nContent-Length: 2\r\n\
         Connection: close\r\n\r\n{{}}"
    );
    within(stream.write_all(request.as_bytes()))
        .await
        .expect("write");
    let mut response = Vec::new();
    within(stream.read_to_end(&mut response))
        .await
        .expect("read");
    let text = String::from_utf8(response).expect("utf-8 response");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let (_, body) = text.split_once("\r\n\r\n").expect("headers end");
    serde_json::from_str(body).expect("JSON body")
}

#[tokio::test]
async fn a_created_queue_is_found_by_name_and_described_by_its_attributes() {
    let sqs = start().await;
    let url = within(
        sqs.client
            .create_queue()
            .queue_name("orders")
            .attributes(QueueAttributeName::VisibilityTimeout, "45")
            .send(),
    )
    .await
    .expect("create queue")
    .queue_url
    .expect("queue url");
    assert_eq!(url, format!("http://{}/000000000000/orders", sqs.addr));

    let found = within(sqs.client.get_queue_url().queue_name("orders").send())
        .await
        .expect("get queue url");
    assert_eq!(found.queue_url(), Some(url.as_str()));

    create_queue(&sqs.client, "orders-dlq").await;
    let policy = r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:000000000000:orders-dlq","maxReceiveCount":"5"}"#;
    within(
        sqs.client
            .set_queue_attributes()
            .queue_url(&url)
            .attributes(QueueAttributeName::RedrivePolicy, policy)
            .send(),
    )
    .await
    .expect("set queue attributes");

    let attributes = queue_attributes(&sqs.client, &url).await;
    let get = |name: QueueAttributeName| attributes.get(&name).map(String::as_str);
    assert_eq!(
        get(QueueAttributeName::QueueArn),
        Some("arn:aws:sqs:us-east-1:000000000000:orders")
    );
    assert_eq!(get(QueueAttributeName::VisibilityTimeout), Some("45"));
    assert_eq!(
        get(QueueAttributeName::MessageRetentionPeriod),
        Some("345600")
    );
    assert_eq!(
        get(QueueAttributeName::ApproximateNumberOfMessages),
        Some("0")
    );
    assert_eq!(
        get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        Some("0")
    );
    assert_eq!(
        get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        Some("0")
    );
    assert_eq!(get(QueueAttributeName::RedrivePolicy), Some(policy));
}

#[tokio::test]
async fn batch_sent_messages_are_received_with_their_attributes_and_checksums() {
    let sqs = start().await;
    let url = create_queue(&sqs.client, "orders").await;
    let kind = MessageAttributeValue::builder()
        .data_type("String")
        .string_value("order.placed")
        .build()
        .expect("attribute");
    let entries: Vec<SendMessageBatchRequestEntry> = (0..3)
        .map(|i| {
            SendMessageBatchRequestEntry::builder()
                .id(format!("e{i}"))
                .message_body(format!("{{\"order\":{i}}}"))
                .message_attributes("kind", kind.clone())
                .build()
                .expect("entry")
        })
        .collect();
    let sent = within(
        sqs.client
            .send_message_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send(),
    )
    .await
    .expect("send batch");
    assert!(sent.failed.is_empty(), "{:?}", sent.failed);
    assert_eq!(sent.successful.len(), 3);
    assert_eq!(sent.successful[0].id, "e0");
    assert_eq!(
        sent.successful[0].md5_of_message_body,
        md5_hex(b"{\"order\":0}")
    );
    let sent_attributes_md5 = sent.successful[0]
        .md5_of_message_attributes
        .clone()
        .expect("attributes md5");

    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let messages = receive(&sqs.client, &url, 10, 0).await;
    assert_eq!(messages.len(), 3);
    for (i, message) in messages.iter().enumerate() {
        let body = format!("{{\"order\":{i}}}");
        assert_eq!(message.body(), Some(body.as_str()));
        assert_eq!(
            message.md5_of_body(),
            Some(md5_hex(body.as_bytes()).as_str())
        );
        assert_eq!(
            message.message_id(),
            Some(sent.successful[i].message_id.as_str())
        );
        assert_eq!(
            system_attribute(message, MessageSystemAttributeName::ApproximateReceiveCount)
                .as_deref(),
            Some("1")
        );
        let sent_ms: i64 = system_attribute(message, MessageSystemAttributeName::SentTimestamp)
            .expect("SentTimestamp")
            .parse()
            .expect("epoch millis");
        let first_ms: i64 = system_attribute(
            message,
            MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
        )
        .expect("ApproximateFirstReceiveTimestamp")
        .parse()
        .expect("epoch millis");
        assert!(sent_ms <= first_ms && (first_ms - before_ms).abs() < 60_000);
        let attribute = message
            .message_attributes()
            .and_then(|a| a.get("kind"))
            .expect("message attribute kind");
        assert_eq!(attribute.string_value(), Some("order.placed"));
        assert_eq!(attribute.data_type(), "String");
        assert_eq!(
            message.md5_of_message_attributes(),
            Some(sent_attributes_md5.as_str())
        );
    }

    let attributes = queue_attributes(&sqs.client, &url).await;
    assert_eq!(
        attributes
            .get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .map(String::as_str),
        Some("3")
    );
}

#[tokio::test]
async fn delete_batch_removes_received_messages_and_reports_foreign_handles() {
    let sqs = start().await;
    let url = create_queue(&sqs.client, "orders").await;
    sqs.state.preload("orders", (0..4).map(|i| format!("m{i}")));
    let messages = receive(&sqs.client, &url, 10, 0).await;
    assert_eq!(messages.len(), 4);
    let mut entries: Vec<DeleteMessageBatchRequestEntry> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(format!("d{i}"))
                .receipt_handle(m.receipt_handle().expect("handle"))
                .build()
                .expect("entry")
        })
        .collect();
    entries.push(
        DeleteMessageBatchRequestEntry::builder()
            .id("foreign")
            .receipt_handle("AQEBnot-a-handle-from-this-server")
            .build()
            .expect("entry"),
    );
    let deleted = within(
        sqs.client
            .delete_message_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send(),
    )
    .await
    .expect("delete batch");
    assert_eq!(deleted.successful.len(), 4);
    assert_eq!(deleted.failed.len(), 1);
    assert_eq!(deleted.failed[0].id, "foreign");
    assert_eq!(deleted.failed[0].code, "ReceiptHandleIsInvalid");
    assert!(deleted.failed[0].sender_fault);

    let counts = sqs.state.counts("orders").expect("queue exists");
    assert_eq!((counts.visible, counts.in_flight), (0, 0));
}

#[tokio::test]
async fn changing_visibility_to_zero_makes_a_message_receivable_at_once() {
    let sqs = start().await;
    let url = create_queue(&sqs.client, "orders").await;
    sqs.state
        .preload("orders", ["a".to_owned(), "b".to_owned()]);
    let messages = receive(&sqs.client, &url, 10, 0).await;
    assert_eq!(messages.len(), 2);
    assert!(receive(&sqs.client, &url, 10, 0).await.is_empty());

    let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(format!("c{i}"))
                .receipt_handle(m.receipt_handle().expect("handle"))
                .visibility_timeout(0)
                .build()
                .expect("entry")
        })
        .collect();
    let changed = within(
        sqs.client
            .change_message_visibility_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send(),
    )
    .await
    .expect("change visibility batch");
    assert_eq!(changed.successful.len(), 2);
    assert!(changed.failed.is_empty());

    let again = receive(&sqs.client, &url, 10, 0).await;
    assert_eq!(again.len(), 2);
    let handle = again[0].receipt_handle().expect("handle");
    assert_ne!(Some(handle), messages[0].receipt_handle());
    within(
        sqs.client
            .change_message_visibility()
            .queue_url(&url)
            .receipt_handle(handle)
            .visibility_timeout(0)
            .send(),
    )
    .await
    .expect("change visibility");
    assert_eq!(receive(&sqs.client, &url, 10, 0).await.len(), 1);
}

#[tokio::test]
async fn a_stale_receipt_handle_is_rejected_by_change_message_visibility() {
    let sqs = start().await;
    let url = create_queue(&sqs.client, "orders").await;
    sqs.state.preload("orders", ["a".to_owned()]);
    let first = receive(&sqs.client, &url, 1, 0).await;
    let stale = first[0].receipt_handle().expect("handle").to_owned();
    within(
        sqs.client
            .delete_message()
            .queue_url(&url)
            .receipt_handle(&stale)
            .send(),
    )
    .await
    .expect("delete");
    // Deleting twice is fine, as in SQS.
    within(
        sqs.client
            .delete_message()
            .queue_url(&url)
            .receipt_handle(&stale)
            .send(),
    )
    .await
    .expect("second delete succeeds");
    let err = within(
        sqs.client
            .change_message_visibility()
            .queue_url(&url)
            .receipt_handle(&stale)
            .visibility_timeout(10)
            .send(),
    )
    .await
    .expect_err("stale handle is rejected")
    .into_service_error();
    assert!(err.is_receipt_handle_is_invalid(), "{err:?}");
}

#[tokio::test]
async fn an_unknown_queue_is_reported_as_queue_does_not_exist() {
    let sqs = start().await;
    let url = format!("http://{}/000000000000/missing", sqs.addr);
    let err = within(sqs.client.receive_message().queue_url(&url).send())
        .await
        .expect_err("missing queue")
        .into_service_error();
    assert!(err.is_queue_does_not_exist(), "{err:?}");
    let err = within(sqs.client.get_queue_url().queue_name("missing").send())
        .await
        .expect_err("missing queue")
        .into_service_error();
    assert!(err.is_queue_does_not_exist(), "{err:?}");
}

#[tokio::test]
async fn a_long_poll_on_an_empty_queue_returns_nothing_after_its_wait_time() {
    let sqs = start().await;
    let url = create_queue(&sqs.client, "orders").await;
    let started = Instant::now();
    let messages = receive(&sqs.client, &url, 10, 1).await;
    let waited = started.elapsed();
    assert!(messages.is_empty());
    assert!(
        waited >= Duration::from_millis(950),
        "returned after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "returned after {waited:?}");
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_a_message_is_sent() {
    let sqs = start().await;
    let url = create_queue(&sqs.client, "orders").await;
    let poll = tokio::spawn({
        let client = sqs.client.clone();
        let url = url.clone();
        async move {
            let started = Instant::now();
            let messages = receive(&client, &url, 10, 10).await;
            (messages, started.elapsed())
        }
    });
    // Wait until the poll has reached the server, then give it a moment to
    // park, so that the send below has to wake it.
    within(async {
        while sqs.state.stats().get("ReceiveMessage") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    within(
        sqs.client
            .send_message()
            .queue_url(&url)
            .message_body("wake up")
            .send(),
    )
    .await
    .expect("send");
    let (messages, waited) = within(poll).await.expect("poll task");
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].body(), Some("wake up"));
    assert!(waited < Duration::from_secs(5), "returned after {waited:?}");
}

#[tokio::test]
async fn message_reappears_after_its_visibility_timeout() {
    let sqs = start().await;
    let url = create_queue(&sqs.client, "orders").await;
    sqs.state.preload("orders", ["a".to_owned()]);
    let first = within(
        sqs.client
            .receive_message()
            .queue_url(&url)
            .visibility_timeout(1)
            .send(),
    )
    .await
    .expect("receive")
    .messages
    .unwrap_or_default();
    assert_eq!(first.len(), 1);
    let received_at = Instant::now();
    assert!(receive(&sqs.client, &url, 10, 0).await.is_empty());

    // A long poll parked before the timeout is woken when it passes.
    let again = receive(&sqs.client, &url, 10, 5).await;
    let waited = received_at.elapsed();
    assert_eq!(again.len(), 1);
    assert!(
        waited >= Duration::from_millis(900),
        "came back after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(4),
        "came back after {waited:?}"
    );
    assert_eq!(again[0].message_id(), first[0].message_id());
    assert_ne!(again[0].receipt_handle(), first[0].receipt_handle());
    assert_eq!(
        system_attribute(
            &again[0],
            MessageSystemAttributeName::ApproximateReceiveCount
        )
        .as_deref(),
        Some("2")
    );
}

#[tokio::test]
async fn stats_count_requests_per_operation_and_reset_zeroes_them() {
    let sqs = start().await;
    let url = create_queue(&sqs.client, "orders").await;
    for _ in 0..3 {
        receive(&sqs.client, &url, 10, 0).await;
    }
    within(sqs.client.purge_queue().queue_url(&url).send())
        .await
        .expect("purge");

    let stats = bench_call(sqs.addr, "OrderfleetBench.Stats").await;
    assert_eq!(stats["requests"]["CreateQueue"], 1);
    assert_eq!(stats["requests"]["ReceiveMessage"], 3);
    assert_eq!(stats["requests"]["PurgeQueue"], 1);
    assert_eq!(stats["total"], 5);
    assert_eq!(sqs.state.stats().get("ReceiveMessage"), 3);

    let reset = bench_call(sqs.addr, "OrderfleetBench.Reset").await;
    assert_eq!(reset["total"], 5);
    let after = bench_call(sqs.addr, "OrderfleetBench.Stats").await;
    assert_eq!(after["total"], 0);
    assert_eq!(after["requests"], serde_json::json!({}));
}

/// Throughput check for the benchmark target (>= 20,000 messages/s consumed
/// on 2 cores). Meaningful only in release mode:
/// `cargo test --release --test bench_sqs_protocol -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput measurement; run in release mode"]
async fn an_sdk_consumer_drains_a_preloaded_backlog_quickly() {
    const MESSAGES: usize = 100_000;
    const CONSUMERS: usize = 16;
    let sqs = start().await;
    let url = create_queue(&sqs.client, "orders").await;
    sqs.state.preload(
        "orders",
        (0..MESSAGES).map(|i| format!("{{\"order\":{i}}}")),
    );
    sqs.state.reset_stats();
    let started = Instant::now();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| {
            let client = sqs.client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut done = 0usize;
                loop {
                    let messages = receive(&client, &url, 10, 0).await;
                    if messages.is_empty() {
                        return done;
                    }
                    done += messages.len();
                    let entries = messages
                        .iter()
                        .enumerate()
                        .map(|(i, m)| {
                            DeleteMessageBatchRequestEntry::builder()
                                .id(i.to_string())
                                .set_receipt_handle(m.receipt_handle.clone())
                                .build()
                                .expect("entry")
                        })
                        .collect();
                    within(
                        client
                            .delete_message_batch()
                            .queue_url(&url)
                            .set_entries(Some(entries))
                            .send(),
                    )
                    .await
                    .expect("delete batch");
                }
            })
        })
        .collect();
    let mut total = 0;
    for consumer in consumers {
        total += consumer.await.expect("consumer");
    }
    let elapsed = started.elapsed();
    let rate = total as f64 / elapsed.as_secs_f64();
    eprintln!(
        "consumed {total} messages in {elapsed:?}: {rate:.0} messages/s; {:?}",
        sqs.state.stats()
    );
    assert_eq!(total, MESSAGES);
}
