//! Which queue the operator means. A handler name is that handler's DLQ (for `dlq` commands)
//! or work queue (for `--to`); a queue name or an `http(s)://` URL is taken as given.

use anyhow::{bail, Context as _, Result};
use aws_sdk_sqs::types::QueueAttributeName;

use crate::domain::names::HandlerName;
use crate::domain::outcome::error_chain;
use crate::infra::topology::Topology;

/// A queue resolved to its URL and ARN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRef {
    pub name: String,
    pub url: String,
    pub arn: String,
    pub fifo: bool,
    /// The handler whose queue or DLQ this is, when the operator named a handler.
    pub handler: Option<HandlerName>,
}

/// What a handler name stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The handler's dead-letter queue (`<prefix>-<handler>-dlq`).
    Dlq,
    /// The handler's work queue (`<prefix>-<handler>`).
    Work,
}

/// Counts SQS reports for a queue (approximate, as SQS says).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
}

/// Resolves a QUEUE argument.
pub async fn resolve(
    sqs: &aws_sdk_sqs::Client,
    prefix: &str,
    arg: &str,
    role: Role,
) -> Result<QueueRef> {
    let arg = arg.trim();
    if arg.is_empty() {
        bail!("an empty queue name was given");
    }
    let (url, handler) = if arg.starts_with("https://") || arg.starts_with("http://") {
        (arg.to_string(), None)
    } else if let Ok(h) = arg.parse::<HandlerName>() {
        let topo = Topology::with_prefix(prefix);
        let name = match role {
            Role::Dlq => topo.dlq_name(h),
            Role::Work => topo.queue_name(h),
        };
        (crate::sqs::queue::queue_url(sqs, &name).await?, Some(h))
    } else {
        (crate::sqs::queue::queue_url(sqs, arg).await?, None)
    };
    let mut q = describe(sqs, &url).await?;
    q.handler = handler;
    Ok(q)
}

/// Reads a queue's ARN by URL.
pub async fn describe(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<QueueRef> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .attribute_names(QueueAttributeName::FifoQueue)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("reading attributes of {url}: {}", error_chain(&e)))?;
    let attrs = out.attributes().cloned().unwrap_or_default();
    let name = name_of(url).to_string();
    let arn = attrs
        .get(&QueueAttributeName::QueueArn)
        .cloned()
        .with_context(|| format!("queue {name} reported no QueueArn"))?;
    let fifo = attrs
        .get(&QueueAttributeName::FifoQueue)
        .is_some_and(|v| v == "true")
        || name.ends_with(".fifo");
    Ok(QueueRef {
        name,
        url: url.to_string(),
        arn,
        fifo,
        handler: None,
    })
}

/// The queue name at the end of a queue URL or ARN.
pub fn name_of(url_or_arn: &str) -> &str {
    url_or_arn
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or(url_or_arn)
}

/// Where a redrive from `source` goes when `--to` is not given: the handler's work queue when
/// the operator named a handler; otherwise the one queue whose redrive policy targets the DLQ
/// (ListDeadLetterSourceQueues); otherwise the DLQ's name without `-dlq`.
pub async fn default_target(
    sqs: &aws_sdk_sqs::Client,
    prefix: &str,
    source: &QueueRef,
) -> Result<QueueRef> {
    if let Some(h) = source.handler {
        return resolve(sqs, prefix, h.as_str(), Role::Work).await;
    }
    if let Ok(out) = sqs
        .list_dead_letter_source_queues()
        .queue_url(&source.url)
        .send()
        .await
    {
        if let [only] = out.queue_urls() {
            return describe(sqs, only).await;
        }
    }
    if let Some(work) = source.name.strip_suffix("-dlq") {
        if let Ok(url) = crate::sqs::queue::queue_url(sqs, work).await {
            return describe(sqs, &url).await;
        }
    }
    bail!(
        "cannot tell which queue the messages in {} came from; give --to QUEUE",
        source.name
    )
}

/// Reads a queue's visible, in-flight and delayed counts.
pub async fn counts(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<Counts> {
    use QueueAttributeName as Q;
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(Q::ApproximateNumberOfMessages)
        .attribute_names(Q::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(Q::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("reading counts of {url}: {}", error_chain(&e)))?;
    let attrs = out.attributes().cloned().unwrap_or_default();
    let n = |k: Q| attrs.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(Counts {
        visible: n(Q::ApproximateNumberOfMessages),
        in_flight: n(Q::ApproximateNumberOfMessagesNotVisible),
        delayed: n(Q::ApproximateNumberOfMessagesDelayed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_name_is_the_last_segment_of_a_url_or_arn() {
        assert_eq!(name_of("http://h:1/123/p-orders-dlq"), "p-orders-dlq");
        assert_eq!(name_of("arn:aws:sqs:us-east-1:123:p-orders"), "p-orders");
        assert_eq!(name_of("p-orders"), "p-orders");
    }
}
