//! What an order costs on AWS: the fleet benchmark's request counts priced at us-east-1 list
//! prices.
//!
//! Only what grows with orders is priced. Fixed costs (compute, the database, custom metrics
//! per month, Firehose's JQ hours, log storage) do not depend on the order count and are left
//! to docs/BENCHMARKS.md, which also states where and when these prices were read.

use serde::Serialize;

/// us-east-1 list prices, USD (read 2026-12-06; sources in docs/BENCHMARKS.md).
pub mod price {
    /// SQS standard queue, per request (each 64 KB of payload is one request).
    pub const SQS_REQUEST: f64 = 0.40 / 1e6;
    /// EventBridge custom or partner event put on a bus (each 64 KB is one event).
    pub const EVENTBRIDGE_EVENT: f64 = 1.00 / 1e6;
    /// Firehose Direct PUT ingestion, per GB, each record rounded up to 5 KB.
    pub const FIREHOSE_GB: f64 = 0.029;
    /// Firehose dynamic partitioning, per GB delivered to S3.
    pub const FIREHOSE_PARTITIONING_GB: f64 = 0.020;
    /// SES outbound email, per message.
    pub const SES_MESSAGE: f64 = 0.10 / 1000.0;
    /// CloudWatch PutMetricData, per request.
    pub const PUT_METRIC_DATA: f64 = 0.01 / 1000.0;
    /// CloudWatch Logs ingestion (standard log class), per GB. EMF lines are logs too.
    pub const LOGS_GB: f64 = 0.50;
}

const GB: f64 = 1024.0 * 1024.0 * 1024.0;

/// What one order used, on average.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// SQS requests in billed 64 KB units.
    pub sqs_requests: f64,
    pub eventbridge_entries: f64,
    pub firehose_records: f64,
    /// Bytes put to Firehose, and the same with each record rounded up to 5 KB.
    pub firehose_bytes: f64,
    pub firehose_billed_bytes: f64,
    pub emails: f64,
    pub put_metric_data_calls: f64,
    /// Bytes the workers wrote to stdout and stderr: what CloudWatch Logs ingests.
    pub log_bytes: f64,
}

/// Dollars per 1,000 orders, by line.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Bill {
    pub sqs: f64,
    pub eventbridge: f64,
    pub firehose: f64,
    pub ses: f64,
    pub cloudwatch_metrics: f64,
    pub cloudwatch_logs: f64,
    pub total: f64,
}

impl Bill {
    /// The bill of 1,000 orders that each used `usage`.
    pub fn per_1000(usage: &Usage) -> Bill {
        let k = 1000.0;
        let mut bill = Bill {
            sqs: k * usage.sqs_requests * price::SQS_REQUEST,
            eventbridge: k * usage.eventbridge_entries * price::EVENTBRIDGE_EVENT,
            firehose: k
                * (usage.firehose_billed_bytes / GB * price::FIREHOSE_GB
                    + usage.firehose_bytes / GB * price::FIREHOSE_PARTITIONING_GB),
            ses: k * usage.emails * price::SES_MESSAGE,
            cloudwatch_metrics: k * usage.put_metric_data_calls * price::PUT_METRIC_DATA,
            cloudwatch_logs: k * usage.log_bytes / GB * price::LOGS_GB,
            total: 0.0,
        };
        bill.total = bill.lines().iter().map(|(_, v)| v).sum();
        bill
    }

    fn lines(&self) -> [(&'static str, f64); 6] {
        [
            ("sqs", self.sqs),
            ("eventbridge", self.eventbridge),
            ("firehose", self.firehose),
            ("ses", self.ses),
            ("cloudwatch_metrics", self.cloudwatch_metrics),
            ("cloudwatch_logs", self.cloudwatch_logs),
        ]
    }

    /// The name of the largest line.
    pub fn largest(&self) -> &'static str {
        self.lines()
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or("none", |(name, _)| name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_orders_of_known_usage_cost_what_the_price_list_says() {
        let usage = Usage {
            sqs_requests: 2.0,
            eventbridge_entries: 9.0,
            firehose_records: 9.0,
            firehose_bytes: 9.0 * 1000.0,
            firehose_billed_bytes: 9.0 * 5120.0,
            emails: 1.0,
            put_metric_data_calls: 0.0,
            log_bytes: 4096.0,
        };
        let bill = Bill::per_1000(&usage);
        // 2,000 SQS requests at $0.40 per million.
        assert!((bill.sqs - 0.0008).abs() < 1e-12);
        // 9,000 events at $1 per million.
        assert!((bill.eventbridge - 0.009).abs() < 1e-12);
        // 1,000 emails at $0.10 per thousand.
        assert!((bill.ses - 0.1).abs() < 1e-12);
        // 4 MB of logs at $0.50 per GB.
        assert!((bill.cloudwatch_logs - 4096.0 * 1000.0 / GB * 0.5).abs() < 1e-12);
        assert_eq!(bill.largest(), "ses");
        let sum = bill.sqs
            + bill.eventbridge
            + bill.firehose
            + bill.ses
            + bill.cloudwatch_metrics
            + bill.cloudwatch_logs;
        assert!((bill.total - sum).abs() < 1e-15);
    }
}
