//! AWS SDK clients, built from the standard environment (`AWS_REGION`, `AWS_ENDPOINT_URL`,
//! credentials chain), so the same binary talks to AWS or to the local emulator.
//!
//! Every call has a time limit, so a hung connection cannot stall a worker. The SDK
//! configuration bounds every operation by [`SDK_OPERATION_TIMEOUT`], which must exceed the
//! longest SQS long poll (20 s) plus slack, since the receive is one of those operations. The
//! runtime's short calls (lease extensions, deletes, PutEvents) are bounded more tightly
//! where they are made, with [`CALL_TIMEOUT`] or tighter: one hung call there would otherwise
//! hold up every lease, every delete or the whole outbox.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};

/// The longest SQS long poll (`WaitTimeSeconds` is at most 20).
pub const MAX_LONG_POLL: Duration = Duration::from_secs(20);

/// Limit on one attempt of any SDK operation, and on the operation with its retries: the
/// longest long poll plus 10 s for the answer to come back.
pub const SDK_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Limit on one short runtime call (DeleteMessageBatch, PutEvents), retries included. Such a
/// call returns in milliseconds when the service is healthy; one that takes this long is
/// abandoned and retried.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The SDK's time limits: connect as the SDK's default (3.1 s), each operation and each
/// attempt at most [`SDK_OPERATION_TIMEOUT`].
pub fn timeouts() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_millis(3100))
        .operation_attempt_timeout(SDK_OPERATION_TIMEOUT)
        .operation_timeout(SDK_OPERATION_TIMEOUT)
        .build()
}

/// Loads the shared SDK configuration from the environment, with [`timeouts`].
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts())
        .load()
        .await
}

/// The clients the fleet uses, built from one configuration.
#[derive(Clone, Debug)]
pub struct Clients {
    pub sqs: aws_sdk_sqs::Client,
    pub events: aws_sdk_eventbridge::Client,
    /// Kinesis Data Firehose: the analytics worker ships the lake through it, and
    /// `orderfleet provision` creates its delivery stream.
    pub firehose: aws_sdk_firehose::Client,
    /// S3: the lake bucket (provisioned by `orderfleet provision`, read by `orderfleet lake`).
    pub s3: aws_sdk_s3::Client,
}

impl Clients {
    pub fn new(config: &SdkConfig) -> Self {
        Clients {
            sqs: aws_sdk_sqs::Client::new(config),
            events: aws_sdk_eventbridge::Client::new(config),
            firehose: aws_sdk_firehose::Client::new(config),
            s3: s3_client(config),
        }
    }

    pub async fn from_env() -> Self {
        Clients::new(&sdk_config().await)
    }
}

/// An S3 client for `config`. With a custom endpoint (the local emulator) it addresses buckets
/// by path, because `<bucket>.127.0.0.1` does not resolve; against AWS it keeps the default
/// virtual-hosted style.
pub fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    let builder =
        aws_sdk_s3::config::Builder::from(config).force_path_style(config.endpoint_url().is_some());
    aws_sdk_s3::Client::from_conf(builder.build())
}
