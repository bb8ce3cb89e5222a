//! AWS SDK clients, built from the standard environment (`AWS_REGION`, `AWS_ENDPOINT_URL`,
//! credentials chain), so the same binary talks to AWS or to the local emulator.

use aws_config::{BehaviorVersion, SdkConfig};

/// Loads the shared SDK configuration from the environment.
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
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
