//! commercetools' HTTP API: an OAuth client-credentials token from the auth URL
//! (`POST <auth>/oauth/token`, HTTP basic auth with the API client's id and secret), then
//! `GET`/`POST <api>/<projectKey>/orders/<id>` with update actions against the order's current
//! `version` (a concurrent change answers 409, which is retried).
//!
//! | action | reads first | then |
//! |---|---|---|
//! | fulfill | the order's deliveries (a parcel with the tracking number is the call's effect) | `addDelivery` of every line with the parcel's tracking data, `changeShipmentState` to `Shipped` |
//! | cancel | the order's `orderState` | `changeOrderState` to `Cancelled` |
//! | refund | the order's payment (expanded) and its transactions (one whose `interactionId` is the call's key is its effect) | `addTransaction` of type `Refund` on the payment |

use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use hyper::body::Bytes;
use hyper::Method;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::http::JsonClient;
use super::{Action, Call, PlatformApi, PlatformError};
use crate::domain::events::Money;
use crate::domain::platform::Platform;

/// The API client's settings.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// e.g. `https://auth.europe-west1.gcp.commercetools.com`
    pub auth_url: String,
    /// e.g. `https://api.europe-west1.gcp.commercetools.com`
    pub api_url: String,
    pub client_id: String,
    pub client_secret: String,
}

/// A commercetools project's HTTP API.
pub struct Commercetools {
    http: JsonClient,
    credentials: Credentials,
    token: Mutex<Option<(String, Instant)>>,
}

impl Commercetools {
    pub fn new(http: JsonClient, credentials: Credentials) -> Self {
        Commercetools {
            http,
            credentials,
            token: Mutex::new(None),
        }
    }

    /// A bearer token, fetched again a minute before the last one expires.
    async fn token(&self) -> Result<String, PlatformError> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.credentials.client_id, self.credentials.client_secret
        ));
        let answer = self
            .http
            .send(
                Method::POST,
                &format!(
                    "{}/oauth/token",
                    self.credentials.auth_url.trim_end_matches('/')
                ),
                &[
                    ("authorization", &format!("Basic {basic}")),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                Some(Bytes::from_static(b"grant_type=client_credentials")),
                "commercetools token",
            )
            .await?;
        let token = answer["access_token"]
            .as_str()
            .ok_or_else(|| {
                PlatformError::Refused("commercetools token: no access_token in the answer".into())
            })?
            .to_string();
        let lifetime = answer["expires_in"].as_u64().unwrap_or(3600);
        *cached = Some((
            token.clone(),
            Instant::now() + Duration::from_secs(lifetime.saturating_sub(60)),
        ));
        Ok(token)
    }

    fn url(&self, project: &str, path: &str) -> String {
        format!(
            "{}/{project}/{path}",
            self.credentials.api_url.trim_end_matches('/')
        )
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<Value>,
        what: &str,
    ) -> Result<Value, PlatformError> {
        let token = self.token().await?;
        let auth = format!("Bearer {token}");
        let mut headers = vec![("authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        self.http
            .send(
                method,
                url,
                &headers,
                body.map(|b| Bytes::from(b.to_string())),
                &format!("commercetools {what}"),
            )
            .await
    }

    async fn order(&self, call: &Call, expand: &str) -> Result<Value, PlatformError> {
        let mut url = self.url(&call.order.shop, &format!("orders/{}", call.order.id));
        if !expand.is_empty() {
            url.push_str(&format!("?expand={expand}"));
        }
        self.call(Method::GET, &url, None, "order").await
    }

    async fn update_order(
        &self,
        call: &Call,
        order: &Value,
        actions: Value,
        what: &str,
    ) -> Result<Value, PlatformError> {
        let url = self.url(&call.order.shop, &format!("orders/{}", call.order.id));
        self.call(
            Method::POST,
            &url,
            Some(json!({"version": order["version"], "actions": actions})),
            what,
        )
        .await
    }

    async fn fulfill(
        &self,
        call: &Call,
        carrier: &str,
        tracking: &str,
    ) -> Result<String, PlatformError> {
        let order = self.order(call, "").await?;
        let parcels = order["shippingInfo"]["deliveries"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|d| d["parcels"].as_array().into_iter().flatten());
        for parcel in parcels {
            if parcel["trackingData"]["trackingId"].as_str() == Some(tracking) {
                return Ok(parcel["id"].as_str().unwrap_or_default().to_string());
            }
        }
        let items: Vec<Value> = order["lineItems"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|li| json!({"id": li["id"], "quantity": li["quantity"]}))
            .collect();
        let updated = self
            .update_order(
                call,
                &order,
                json!([
                    {"action": "addDelivery", "items": items,
                     "parcels": [{"trackingData": {"trackingId": tracking, "carrier": carrier}}]},
                    {"action": "changeShipmentState", "shipmentState": "Shipped"}
                ]),
                "addDelivery",
            )
            .await?;
        Ok(updated["shippingInfo"]["deliveries"]
            .as_array()
            .and_then(|d| d.last())
            .and_then(|d| d["id"].as_str())
            .unwrap_or_default()
            .to_string())
    }

    async fn cancel(&self, call: &Call) -> Result<String, PlatformError> {
        let order = self.order(call, "").await?;
        if order["orderState"].as_str() == Some("Cancelled") {
            return Ok(call.order.id.clone());
        }
        self.update_order(
            call,
            &order,
            json!([{"action": "changeOrderState", "orderState": "Cancelled"}]),
            "changeOrderState",
        )
        .await?;
        Ok(call.order.id.clone())
    }

    async fn refund(&self, call: &Call, amount: Money) -> Result<String, PlatformError> {
        let order = self.order(call, "paymentInfo.payments[*]").await?;
        let payment = order["paymentInfo"]["payments"]
            .as_array()
            .and_then(|p| p.first())
            .map(|p| &p["obj"])
            .filter(|p| p.is_object())
            .ok_or_else(|| {
                PlatformError::Refused(format!(
                    "commercetools order {} has no payment to refund",
                    call.order.id
                ))
            })?;
        let done = payment["transactions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["interactionId"].as_str() == Some(call.idempotency_key.as_str()));
        if let Some(done) = done {
            return Ok(done["id"].as_str().unwrap_or_default().to_string());
        }
        let payment_id = payment["id"].as_str().unwrap_or_default();
        let url = self.url(&call.order.shop, &format!("payments/{payment_id}"));
        let updated = self
            .call(
                Method::POST,
                &url,
                Some(json!({
                    "version": payment["version"],
                    "actions": [{"action": "addTransaction", "transaction": {
                        "type": "Refund",
                        "amount": {"centAmount": amount.amount_minor,
                                   "currencyCode": amount.currency.as_str()},
                        "interactionId": call.idempotency_key,
                        "state": "Success"
                    }}]
                })),
                "addTransaction",
            )
            .await?;
        Ok(updated["transactions"]
            .as_array()
            .and_then(|t| t.last())
            .and_then(|t| t["id"].as_str())
            .unwrap_or_default()
            .to_string())
    }
}

#[async_trait]
impl PlatformApi for Commercetools {
    fn platform(&self) -> Platform {
        Platform::Commercetools
    }

    async fn apply(&self, call: &Call, action: &Action) -> Result<String, PlatformError> {
        match action {
            Action::Fulfill {
                carrier,
                tracking_number,
            } => self.fulfill(call, carrier, tracking_number).await,
            Action::Cancel { .. } => self.cancel(call).await,
            Action::Refund { amount } => self.refund(call, *amount).await,
        }
    }
}
