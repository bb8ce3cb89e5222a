//! Finding a queue: its URL by name, and what its attributes say (its dead-letter queue,
//! maxReceiveCount, visibility timeout and retention), checked so that a consumer never runs
//! on a queue whose failures would have nowhere to go.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use aws_sdk_sqs::types::QueueAttributeName;

use crate::domain::outcome::error_chain;

/// What a queue says about itself, read at startup.
#[derive(Debug, Clone)]
pub struct QueueFacts {
    pub queue_url: String,
    pub dlq_url: String,
    pub max_receive_count: u32,
    pub visibility_timeout: Duration,
    pub retention: Duration,
}

/// Reads the queue's attributes and checks that the consumer can run safely on it: the queue
/// exists and has a redrive policy whose DLQ exists. The error says what to change.
pub async fn inspect_queue(sqs: &aws_sdk_sqs::Client, queue_name: &str) -> Result<QueueFacts> {
    let url = queue_url(sqs, queue_name).await?;
    let out = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "reading attributes of queue {queue_name}: {}",
                error_chain(&e)
            )
        })?;
    let attrs = out.attributes().cloned().unwrap_or_default();
    let get = |k: QueueAttributeName| attrs.get(&k).cloned();
    let Some(policy) = get(QueueAttributeName::RedrivePolicy) else {
        bail!(
            "queue {queue_name} has no RedrivePolicy, so failing messages would never reach a \
             dead-letter queue; run `orderfleet provision`, or set a RedrivePolicy with a \
             deadLetterTargetArn and maxReceiveCount on the queue"
        );
    };
    let policy: serde_json::Value = serde_json::from_str(&policy)
        .with_context(|| format!("queue {queue_name}: RedrivePolicy is not JSON"))?;
    let dlq_arn = policy["deadLetterTargetArn"]
        .as_str()
        .with_context(|| format!("queue {queue_name}: RedrivePolicy lacks deadLetterTargetArn"))?;
    let max_receive_count = match &policy["maxReceiveCount"] {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .with_context(|| format!("queue {queue_name}: RedrivePolicy lacks maxReceiveCount"))?
        as u32;
    let dlq_name = dlq_arn.rsplit(':').next().unwrap_or(dlq_arn);
    let dlq_url = queue_url(sqs, dlq_name).await.with_context(|| {
        format!("queue {queue_name}: its dead-letter queue {dlq_name} is missing")
    })?;
    let secs = |k: QueueAttributeName, default: u64| {
        get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(default))
    };
    Ok(QueueFacts {
        queue_url: url,
        dlq_url,
        max_receive_count,
        visibility_timeout: secs(QueueAttributeName::VisibilityTimeout, 30),
        retention: secs(QueueAttributeName::MessageRetentionPeriod, 345_600),
    })
}

/// Resolves a queue name to its URL, with an error that names the queue.
pub async fn queue_url(sqs: &aws_sdk_sqs::Client, name: &str) -> Result<String> {
    let out = sqs
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "queue {name} does not exist or cannot be reached ({}); run `orderfleet provision`",
                error_chain(&e)
            )
        })?;
    out.queue_url()
        .map(str::to_string)
        .with_context(|| format!("GetQueueUrl for {name} returned no URL"))
}
