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
}

impl Clients {
    pub fn new(config: &SdkConfig) -> Self {
        Clients {
            sqs: aws_sdk_sqs::Client::new(config),
            events: aws_sdk_eventbridge::Client::new(config),
        }
    }

    pub async fn from_env() -> Self {
        Clients::new(&sdk_config().await)
    }
}
