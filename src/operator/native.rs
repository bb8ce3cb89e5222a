//! SQS's native message move tasks: StartMessageMoveTask, ListMessageMoveTasks and
//! CancelMessageMoveTask.
//!
//! SQS moves the messages itself (at most 500 a second, no filtering) and the task survives
//! the CLI exiting. Endpoints without the API are recognised, so that the caller can fall back
//! to the client-side move: moto 5.2.5 answers all three with HTTP 500 and an HTML page (its
//! server raises `NotImplementedError`), other emulators answer with an error code such as
//! `NotImplemented` or `InvalidAction`.

use anyhow::Result;
use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use serde::Serialize;

use crate::domain::outcome::error_chain;

/// The rate SQS accepts for a move task.
pub const MAX_RATE: i32 = 500;

/// One move task as ListMessageMoveTasks reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MoveTask {
    /// Present only while the task is running (what CancelMessageMoveTask takes).
    pub handle: Option<String>,
    /// RUNNING, COMPLETED, CANCELLING, CANCELLED or FAILED.
    pub status: String,
    pub source_arn: Option<String>,
    pub destination_arn: Option<String>,
    pub rate: Option<i32>,
    pub moved: i64,
    pub to_move: Option<i64>,
    pub failure_reason: Option<String>,
    /// Start time, milliseconds since the epoch.
    pub started_at_ms: i64,
}

impl MoveTask {
    pub fn running(&self) -> bool {
        self.status == "RUNNING" || self.status == "CANCELLING"
    }
}

/// The answer of an endpoint to a move-task call.
#[derive(Debug)]
pub enum Native<T> {
    Supported(T),
    /// The endpoint has no such operation; the text says what it answered.
    Unsupported(String),
}

/// Whether an error means the endpoint does not implement the operation (as opposed to a
/// real failure of a supported call, which must not trigger a fallback).
pub fn is_unsupported<E: ProvideErrorMetadata>(
    err: &SdkError<E, aws_sdk_sqs::config::http::HttpResponse>,
) -> Option<String> {
    const CODES: [&str; 5] = [
        "NotImplemented",
        "InvalidAction",
        "UnknownOperation",
        "UnknownOperationException",
        "UnsupportedOperationException",
    ];
    let (code, status) = match err {
        SdkError::ServiceError(se) => (se.err().code(), Some(se.raw().status().as_u16())),
        SdkError::ResponseError(re) => (None, Some(re.raw().status().as_u16())),
        _ => return None,
    };
    match (code, status) {
        (Some(c), _) if CODES.contains(&c) => Some(format!("the endpoint answered {c}")),
        // An answer with no AWS error code at all and a 500/501 is not SQS (whose errors
        // always carry a code): moto's HTML "Internal Server Error" for a NotImplementedError.
        (None, Some(s @ (500 | 501))) => Some(format!(
            "the endpoint answered HTTP {s} without an AWS error code (moto has no move tasks)"
        )),
        _ => None,
    }
}

/// Starts a move task from `source_arn`. `destination_arn` is always worth giving: without
/// it SQS moves each message to the queue it was dead-lettered from by a redrive policy, and
/// messages the worker dead-lettered itself (permanent, poison) have no such origin.
pub async fn start(
    sqs: &aws_sdk_sqs::Client,
    source_arn: &str,
    destination_arn: Option<&str>,
    rate: Option<i32>,
) -> Result<Native<String>> {
    let result = sqs
        .start_message_move_task()
        .source_arn(source_arn)
        .set_destination_arn(destination_arn.map(str::to_string))
        .set_max_number_of_messages_per_second(rate)
        .customize()
        // Not retried: a retry after a lost answer would meet the task it started.
        .config_override(
            aws_sdk_sqs::config::Config::builder().retry_config(RetryConfig::disabled()),
        )
        .send()
        .await;
    match result {
        Ok(out) => Ok(Native::Supported(
            out.task_handle().unwrap_or_default().to_string(),
        )),
        Err(e) => match is_unsupported(&e) {
            Some(why) => Ok(Native::Unsupported(why)),
            None => Err(anyhow::anyhow!(
                "StartMessageMoveTask from {source_arn}: {}",
                error_chain(&e)
            )),
        },
    }
}

/// Lists the move tasks of a source queue (the most recent first, as SQS returns them).
pub async fn list(sqs: &aws_sdk_sqs::Client, source_arn: &str) -> Result<Native<Vec<MoveTask>>> {
    let result = sqs
        .list_message_move_tasks()
        .source_arn(source_arn)
        .max_results(10)
        .customize()
        // Unsupported endpoints answer 500, which the SDK would otherwise retry three times.
        .config_override(
            aws_sdk_sqs::config::Config::builder().retry_config(RetryConfig::disabled()),
        )
        .send()
        .await;
    match result {
        Ok(out) => Ok(Native::Supported(
            out.results()
                .iter()
                .map(|r| MoveTask {
                    handle: r.task_handle().map(str::to_string),
                    status: r.status().unwrap_or("UNKNOWN").to_string(),
                    source_arn: r.source_arn().map(str::to_string),
                    destination_arn: r.destination_arn().map(str::to_string),
                    rate: r.max_number_of_messages_per_second(),
                    moved: r.approximate_number_of_messages_moved(),
                    to_move: r.approximate_number_of_messages_to_move(),
                    failure_reason: r.failure_reason().map(str::to_string),
                    started_at_ms: r.started_timestamp(),
                })
                .collect(),
        )),
        Err(e) => match is_unsupported(&e) {
            Some(why) => Ok(Native::Unsupported(why)),
            None => Err(anyhow::anyhow!(
                "ListMessageMoveTasks for {source_arn}: {}",
                error_chain(&e)
            )),
        },
    }
}

/// Cancels a running task. Returns the messages it had moved.
pub async fn cancel(sqs: &aws_sdk_sqs::Client, handle: &str) -> Result<Native<i64>> {
    match sqs
        .cancel_message_move_task()
        .task_handle(handle)
        .send()
        .await
    {
        Ok(out) => Ok(Native::Supported(
            out.approximate_number_of_messages_moved(),
        )),
        Err(e) => match is_unsupported(&e) {
            Some(why) => Ok(Native::Unsupported(why)),
            None => Err(anyhow::anyhow!(
                "CancelMessageMoveTask: {}",
                error_chain(&e)
            )),
        },
    }
}
