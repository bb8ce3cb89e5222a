//! The message attributes the fleet reads and writes, in one place: the failure the runtime
//! records on a dead-lettered message, the redrive history the operator's mover adds, and
//! SQS's own receive count.

use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};

/// Every attribute of the failure record starts with this; a redrive drops them all.
pub const FAILURE_PREFIX: &str = "orderfleet.failure.";
pub const KIND: &str = "orderfleet.failure.kind";
pub const REASON: &str = "orderfleet.failure.reason";
pub const HANDLER: &str = "orderfleet.failure.handler";
pub const RECEIVE_COUNT: &str = "orderfleet.failure.receive_count";
pub const SOURCE_QUEUE: &str = "orderfleet.failure.source_queue";
pub const FAILED_AT: &str = "orderfleet.failure.at";
pub const ORIGINAL_MESSAGE_ID: &str = "orderfleet.original_message_id";

/// Attribute naming the queue a redriven message came from.
pub const REDRIVEN_FROM: &str = "orderfleet.redriven_from";
/// Attribute counting how often a message was redriven.
pub const REDRIVE_COUNT: &str = "orderfleet.redrive_count";
/// Attribute carrying the move's deterministic key for the source message.
pub const REDRIVE_KEY: &str = "orderfleet.redrive_key";
/// SQS's limit of message attributes per message.
pub const MAX_ATTRIBUTES: usize = 10;

/// Whether `name` is part of the failure record the runtime writes.
pub fn is_failure_record(name: &str) -> bool {
    name.starts_with(FAILURE_PREFIX) || name == ORIGINAL_MESSAGE_ID
}

/// A message attribute value of `data_type` (`String` or `Number`).
pub fn value(data_type: &str, value: &str) -> Option<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type(data_type)
        .string_value(value)
        .build()
        .ok()
}

/// SQS's ApproximateReceiveCount of `msg`, including the receive that returned it (1 when SQS
/// did not say).
pub fn receive_count(msg: &Message) -> u32 {
    msg.attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}
