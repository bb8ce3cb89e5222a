//! Shopify's Admin GraphQL API: `POST https://<shop>/admin/api/<version>/graphql.json` with the
//! app's access token in `X-Shopify-Access-Token`.
//!
//! | action | reads first | then |
//! |---|---|---|
//! | fulfill | the order's fulfillments (one with the tracking number is the call's effect) and its open fulfillment orders | `fulfillmentCreate` with the tracking number and carrier |
//! | cancel | the order's `cancelledAt` | `orderCancel` (no refund, no restock: money and stock are the fleet's) |
//! | refund | the order's refunds (one whose note carries the call's key is its effect) and its successful capture or sale | `refundCreate` of the amount against that transaction |
//!
//! GraphQL answers HTTP 200 with `errors` (a `THROTTLED` one is worth a retry) or with
//! `userErrors` in the payload (a refusal).

use async_trait::async_trait;
use hyper::body::Bytes;
use hyper::Method;
use serde_json::{json, Value};

use super::http::JsonClient;
use super::{Action, Call, PlatformApi, PlatformError};
use crate::domain::platform::Platform;

/// The Admin API version the fleet speaks.
pub const API_VERSION: &str = "2025-01";

/// A Shopify shop's Admin API.
pub struct Shopify {
    http: JsonClient,
    token: String,
    /// Where the Admin API is: `https://<shop>` unless set (a test's fake).
    base_url: Option<String>,
}

impl Shopify {
    pub fn new(http: JsonClient, token: String, base_url: Option<String>) -> Self {
        Shopify {
            http,
            token,
            base_url,
        }
    }

    async fn graphql(
        &self,
        shop: &str,
        what: &str,
        query: &str,
        variables: Value,
    ) -> Result<Value, PlatformError> {
        let base = match &self.base_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None if shop.is_empty() => {
                return Err(PlatformError::Refused(format!(
                    "Shopify {what}: the order names no shop domain"
                )))
            }
            None => format!("https://{shop}"),
        };
        let url = format!("{base}/admin/api/{API_VERSION}/graphql.json");
        let body = json!({"query": query, "variables": variables}).to_string();
        let answer = self
            .http
            .send(
                Method::POST,
                &url,
                &[
                    ("content-type", "application/json"),
                    ("x-shopify-access-token", &self.token),
                ],
                Some(Bytes::from(body)),
                &format!("Shopify {what}"),
            )
            .await?;
        if let Some(errors) = answer.get("errors").and_then(Value::as_array) {
            let throttled = errors.iter().any(|e| {
                e.pointer("/extensions/code").and_then(Value::as_str) == Some("THROTTLED")
            });
            let text = Value::Array(errors.clone()).to_string();
            return Err(if throttled {
                PlatformError::Retry(format!("Shopify {what}: throttled: {text}"))
            } else {
                PlatformError::Refused(format!("Shopify {what}: {text}"))
            });
        }
        answer
            .get("data")
            .cloned()
            .ok_or_else(|| PlatformError::Retry(format!("Shopify {what}: an answer without data")))
    }

    /// Fails with the mutation's user errors, if it has any.
    fn user_errors(what: &str, payload: &Value) -> Result<(), PlatformError> {
        let errors = payload
            .get("userErrors")
            .or_else(|| payload.get("orderCancelUserErrors"))
            .and_then(Value::as_array);
        match errors {
            Some(errors) if !errors.is_empty() => Err(PlatformError::Refused(format!(
                "Shopify {what}: {}",
                Value::Array(errors.clone())
            ))),
            _ => Ok(()),
        }
    }

    /// The id of what `mutation` created (its payload's `object`), or its user errors.
    fn created(data: &Value, mutation: &str, object: &str) -> Result<String, PlatformError> {
        let payload = &data[mutation];
        Self::user_errors(mutation, payload)?;
        Ok(payload[object]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    async fn fulfill(
        &self,
        call: &Call,
        carrier: &str,
        tracking: &str,
    ) -> Result<String, PlatformError> {
        let shop = &call.order.shop;
        let data = self
            .graphql(
                shop,
                "order fulfillments",
                "query OrderFulfillments($id: ID!) {
                   order(id: $id) {
                     fulfillments(first: 50) { id trackingInfo { number } }
                     fulfillmentOrders(first: 50) { nodes { id status } }
                   }
                 }",
                json!({"id": call.order.id}),
            )
            .await?;
        let order = data.get("order").filter(|o| !o.is_null()).ok_or_else(|| {
            PlatformError::Refused(format!("Shopify has no order {}", call.order.id))
        })?;
        let done = order["fulfillments"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| {
                f["trackingInfo"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t["number"].as_str() == Some(tracking))
            });
        if let Some(done) = done {
            return Ok(done["id"].as_str().unwrap_or_default().to_string());
        }
        let open: Vec<Value> = order["fulfillmentOrders"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| matches!(f["status"].as_str(), Some("OPEN" | "IN_PROGRESS")))
            .map(|f| json!({"fulfillmentOrderId": f["id"]}))
            .collect();
        if open.is_empty() {
            return Err(PlatformError::Refused(format!(
                "Shopify order {} has no open fulfillment order to fulfill",
                call.order.id
            )));
        }
        let data = self
            .graphql(
                shop,
                "fulfillmentCreate",
                "mutation Fulfill($fulfillment: FulfillmentInput!) {
                   fulfillmentCreate(fulfillment: $fulfillment) {
                     fulfillment { id status }
                     userErrors { field message }
                   }
                 }",
                json!({"fulfillment": {
                    "lineItemsByFulfillmentOrder": open,
                    "trackingInfo": {"number": tracking, "company": carrier},
                    "notifyCustomer": false
                }}),
            )
            .await?;
        Self::created(&data, "fulfillmentCreate", "fulfillment")
    }

    async fn cancel(&self, call: &Call, reason: &str) -> Result<String, PlatformError> {
        let shop = &call.order.shop;
        let data = self
            .graphql(
                shop,
                "order state",
                "query OrderState($id: ID!) { order(id: $id) { id cancelledAt } }",
                json!({"id": call.order.id}),
            )
            .await?;
        let order = data.get("order").filter(|o| !o.is_null()).ok_or_else(|| {
            PlatformError::Refused(format!("Shopify has no order {}", call.order.id))
        })?;
        if !order["cancelledAt"].is_null() {
            return Ok(call.order.id.clone());
        }
        let data = self
            .graphql(
                shop,
                "orderCancel",
                "mutation Cancel($orderId: ID!, $staffNote: String) {
                   orderCancel(orderId: $orderId, reason: OTHER, refund: false, restock: false,
                               notifyCustomer: false, staffNote: $staffNote) {
                     job { id }
                     orderCancelUserErrors { field message code }
                   }
                 }",
                json!({"orderId": call.order.id, "staffNote": format!("orderfleet: {reason}")}),
            )
            .await?;
        let payload = &data["orderCancel"];
        Self::user_errors("orderCancel", payload)?;
        Ok(payload["job"]["id"]
            .as_str()
            .unwrap_or(&call.order.id)
            .to_string())
    }

    async fn refund(
        &self,
        call: &Call,
        amount: crate::domain::events::Money,
    ) -> Result<String, PlatformError> {
        let shop = &call.order.shop;
        let marker = format!("orderfleet:{}", call.idempotency_key);
        let data = self
            .graphql(
                shop,
                "order refunds",
                "query OrderRefunds($id: ID!) {
                   order(id: $id) {
                     refunds(first: 50) { id note }
                     transactions(first: 50) { id kind status gateway }
                   }
                 }",
                json!({"id": call.order.id}),
            )
            .await?;
        let order = data.get("order").filter(|o| !o.is_null()).ok_or_else(|| {
            PlatformError::Refused(format!("Shopify has no order {}", call.order.id))
        })?;
        if let Some(done) = order["refunds"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["note"].as_str().is_some_and(|n| n.contains(&marker)))
        {
            return Ok(done["id"].as_str().unwrap_or_default().to_string());
        }
        let parent = order["transactions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| {
                matches!(t["kind"].as_str(), Some("CAPTURE" | "SALE"))
                    && t["status"].as_str() == Some("SUCCESS")
            })
            .ok_or_else(|| {
                PlatformError::Refused(format!(
                    "Shopify order {} has no successful capture or sale to refund",
                    call.order.id
                ))
            })?;
        let major = format_major(amount);
        let data = self
            .graphql(
                shop,
                "refundCreate",
                "mutation Refund($input: RefundInput!) {
                   refundCreate(input: $input) { refund { id } userErrors { field message } }
                 }",
                json!({"input": {
                    "orderId": call.order.id,
                    "note": marker,
                    "notify": false,
                    "transactions": [{
                        "orderId": call.order.id,
                        "parentId": parent["id"],
                        "gateway": parent["gateway"],
                        "kind": "REFUND",
                        "amount": major
                    }]
                }}),
            )
            .await?;
        Self::created(&data, "refundCreate", "refund")
    }
}

/// `amount` in major units as a decimal string (`1999` EUR cents → `"19.99"`).
pub fn format_major(amount: crate::domain::events::Money) -> String {
    let digits = amount.currency.minor_unit_exponent().unwrap_or(2);
    if digits == 0 {
        return amount.amount_minor.to_string();
    }
    let scale = 10i64.pow(digits);
    let sign = if amount.amount_minor < 0 { "-" } else { "" };
    let abs = amount.amount_minor.unsigned_abs();
    format!(
        "{sign}{}.{:0width$}",
        abs / scale as u64,
        abs % scale as u64,
        width = digits as usize
    )
}

#[async_trait]
impl PlatformApi for Shopify {
    fn platform(&self) -> Platform {
        Platform::Shopify
    }

    async fn apply(&self, call: &Call, action: &Action) -> Result<String, PlatformError> {
        match action {
            Action::Fulfill {
                carrier,
                tracking_number,
            } => self.fulfill(call, carrier, tracking_number).await,
            Action::Cancel { reason } => self.cancel(call, reason).await,
            Action::Refund { amount } => self.refund(call, *amount).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::events::{Currency, Money};

    #[test]
    fn amounts_are_written_in_major_units() {
        let eur = Currency::new("EUR").unwrap();
        assert_eq!(format_major(Money::new(1999, eur)), "19.99");
        assert_eq!(format_major(Money::new(5, eur)), "0.05");
        assert_eq!(
            format_major(Money::new(1200, Currency::new("JPY").unwrap())),
            "1200"
        );
    }
}
