//! HTTP fakes of the commerce platforms' APIs: an HTTP/1.1 server on loopback that keeps every
//! request and answers through a function of the test, and the answers of Shopify's Admin
//! GraphQL API and commercetools' HTTP API for the calls the storefront's write-back makes.
//! They check what they are sent (credentials, API version, paths) and answer 401/404
//! otherwise, so a request the fleet gets wrong fails the test.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub const SHOPIFY_TOKEN: &str = "shpat_test_0123456789abcdef";
pub const CT_CLIENT_ID: &str = "orderfleet-writer";
pub const CT_CLIENT_SECRET: &str = "ct-secret-for-tests";
pub const CT_TOKEN: &str = "ct-access-token-1";

// ---------------------------------------------------------------------------------------------
// The platform's API, faked: every request kept, answered by the test's function

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The GraphQL operation name of a Shopify request (`query OrderState(...)` → OrderState,
    /// `mutation Fulfill(...) { fulfillmentCreate` → fulfillmentCreate for mutations).
    pub fn graphql(&self) -> String {
        let query = self.json()["query"].as_str().unwrap_or("").to_string();
        for mutation in ["fulfillmentCreate", "orderCancel", "refundCreate"] {
            if query.contains(&format!("{mutation}(")) {
                return mutation.into();
            }
        }
        query
            .split(|c: char| c == '(' || c.is_whitespace())
            .nth(1)
            .unwrap_or("")
            .to_string()
    }
}

pub type Answer = dyn Fn(&Seen, &[Seen]) -> (u16, Value) + Send + Sync;

/// How long a [`Fake`] holds a request before answering it, given the ones before it.
pub type Hold = dyn Fn(&Seen, &[Seen]) -> std::time::Duration + Send + Sync;

#[derive(Clone)]
pub struct Fake {
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    pub async fn start(
        answer: impl Fn(&Seen, &[Seen]) -> (u16, Value) + Send + Sync + 'static,
    ) -> Fake {
        Fake::start_holding(|_, _| std::time::Duration::ZERO, answer).await
    }

    /// A fake that holds each request for `hold` before answering it, and every request after
    /// it meanwhile. The hold is a timer, not a sleeping thread: a test's runtime keeps both
    /// its threads for the code under test (a blocked worker thread also strands the task
    /// tokio last woke on it, which made a timeout under test fire seconds late).
    pub async fn start_holding(
        hold: impl Fn(&Seen, &[Seen]) -> std::time::Duration + Send + Sync + 'static,
        answer: impl Fn(&Seen, &[Seen]) -> (u16, Value) + Send + Sync + 'static,
    ) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer: Arc<Answer> = Arc::new(answer);
        let hold: Arc<Hold> = Arc::new(hold);
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        let kept = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (seen, answer, hold, turn) =
                    (kept.clone(), answer.clone(), hold.clone(), turn.clone());
                tokio::spawn(async move {
                    let _ = serve(socket, seen, answer, hold, turn).await;
                });
            }
        });
        Fake { url, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// HTTP/1.1 with keep-alive, one request after the other on a connection.
async fn serve(
    socket: tokio::net::TcpStream,
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Arc<Answer>,
    hold: Arc<Hold>,
    turn: Arc<tokio::sync::Mutex<()>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(socket);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let request = Seen {
            method,
            path,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        // Requests are answered one at a time, so a held one holds the rest. A request is
        // kept as it arrives: a held call has reached the service, as a slow answer from
        // the real one would have.
        let turn = turn.lock().await;
        let (wait, n) = {
            let mut seen = seen.lock().unwrap();
            let n = seen.len();
            seen.push(request.clone());
            (hold(&request, &seen[..n]), n)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let (status, reply) = answer(&request, &seen.lock().unwrap()[..n]);
        drop(turn);
        let reply = reply.to_string();
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            reply.len()
        );
        reader.get_mut().write_all(head.as_bytes()).await?;
        reader.get_mut().write_all(reply.as_bytes()).await?;
    }
}

/// EventBridge's answer to a PutEvents call whose every entry it took (for a [`Fake`] standing
/// in for EventBridge).
pub fn put_events_accepted(req: &Seen, before: &[Seen]) -> (u16, Value) {
    let entries = req.json()["Entries"].as_array().map_or(0, Vec::len);
    let ids: Vec<Value> = (0..entries)
        .map(|i| json!({"EventId": format!("ev-{}-{i}", before.len())}))
        .collect();
    (200, json!({"FailedEntryCount": 0, "Entries": ids}))
}

/// A [`Fake`] EventBridge that takes every PutEvents call but answers the first one only after
/// `hold` (holding, meanwhile, every other request to it).
pub async fn put_events_slow_at_first(hold: std::time::Duration) -> Fake {
    Fake::start_holding(
        move |_, before| {
            if before.is_empty() {
                hold
            } else {
                std::time::Duration::ZERO
            }
        },
        put_events_accepted,
    )
    .await
}

/// EventBridge throttling a PutEvents call.
pub fn put_events_throttled() -> (u16, Value) {
    (
        400,
        json!({"__type": "ThrottlingException", "message": "Rate exceeded"}),
    )
}

/// Answers as Shopify's Admin GraphQL API does for the fleet's queries and mutations: an
/// order with one open fulfillment order, fulfilled once `fulfillmentCreate` was called.
pub fn shopify_answer(req: &Seen, before: &[Seen]) -> (u16, Value) {
    if req
        .headers
        .get("x-shopify-access-token")
        .map(String::as_str)
        != Some(SHOPIFY_TOKEN)
    {
        return (
            401,
            json!({"errors": "[API] Invalid API key or access token"}),
        );
    }
    if req.path != "/admin/api/2025-01/graphql.json" {
        return (404, json!({"errors": "Not Found"}));
    }
    let body = req.json();
    let order_id = body["variables"]["id"].as_str().unwrap_or("").to_string();
    let fulfilled: Vec<Value> = before
        .iter()
        .filter(|s| s.graphql() == "fulfillmentCreate")
        .map(|s| {
            let number = s.json()["variables"]["fulfillment"]["trackingInfo"]["number"].clone();
            json!({"id": "gid://shopify/Fulfillment/255858046", "trackingInfo": [{"number": number}]})
        })
        .collect();
    match req.graphql().as_str() {
        "OrderFulfillments" => (
            200,
            json!({"data": {"order": {
                "fulfillments": fulfilled,
                "fulfillmentOrders": {"nodes": [{"id": format!("{order_id}-fo").replace("Order", "FulfillmentOrder"), "status": "OPEN"}]}
            }}}),
        ),
        "fulfillmentCreate" => (
            200,
            json!({"data": {"fulfillmentCreate": {
                "fulfillment": {"id": "gid://shopify/Fulfillment/255858046", "status": "SUCCESS"},
                "userErrors": []
            }}}),
        ),
        "OrderState" => (
            200,
            json!({"data": {"order": {"id": order_id, "cancelledAt": null}}}),
        ),
        "orderCancel" => (
            200,
            json!({"data": {"orderCancel": {"job": {"id": "gid://shopify/Job/1"}, "orderCancelUserErrors": []}}}),
        ),
        // Refunds made so far carry the note they were made with.
        "OrderRefunds" => {
            let refunds: Vec<Value> = before
                .iter()
                .filter(|s| s.graphql() == "refundCreate")
                .enumerate()
                .map(|(i, s)| {
                    json!({"id": format!("gid://shopify/Refund/{}", i + 1),
                           "note": s.json()["variables"]["input"]["note"]})
                })
                .collect();
            (
                200,
                json!({"data": {"order": {
                    "refunds": refunds,
                    "transactions": [
                        {"id": "gid://shopify/OrderTransaction/7", "kind": "AUTHORIZATION", "status": "SUCCESS", "gateway": "shopify_payments"},
                        {"id": "gid://shopify/OrderTransaction/8", "kind": "CAPTURE", "status": "SUCCESS", "gateway": "shopify_payments"}
                    ]
                }}}),
            )
        }
        "refundCreate" => {
            let n = before
                .iter()
                .filter(|s| s.graphql() == "refundCreate")
                .count();
            (
                200,
                json!({"data": {"refundCreate": {
                    "refund": {"id": format!("gid://shopify/Refund/{}", n + 1)},
                    "userErrors": []
                }}}),
            )
        }
        other => (
            200,
            json!({"errors": [{"message": format!("the fake knows no {other}")}]}),
        ),
    }
}

/// Answers as commercetools' HTTP API does: a client-credentials token, then the order (with
/// its deliveries so far) and its updates.
pub fn ct_answer(req: &Seen, before: &[Seen]) -> (u16, Value) {
    if req.path == "/oauth/token" {
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{CT_CLIENT_ID}:{CT_CLIENT_SECRET}"));
        if req.headers.get("authorization") != Some(&format!("Basic {basic}"))
            || !req.body.contains("grant_type=client_credentials")
        {
            return (401, json!({"statusCode": 401, "message": "invalid client"}));
        }
        return (
            200,
            json!({"access_token": CT_TOKEN, "token_type": "Bearer", "expires_in": 172800, "scope": "manage_orders:tea-and-cups"}),
        );
    }
    if req.headers.get("authorization") != Some(&format!("Bearer {CT_TOKEN}")) {
        return (401, json!({"statusCode": 401, "message": "invalid token"}));
    }
    if let Some(payment) = req.path.strip_prefix("/tea-and-cups/payments/") {
        return ct_payment(payment, req, before);
    }
    let path = req.path.split('?').next().unwrap_or("");
    let Some(order_id) = path.strip_prefix("/tea-and-cups/orders/") else {
        return (404, json!({"statusCode": 404, "message": "not found"}));
    };
    let updates: Vec<Value> = before
        .iter()
        .filter(|s| s.method == "POST" && s.path == path)
        .map(Seen::json)
        .collect();
    let deliveries: Vec<Value> = updates
        .iter()
        .flat_map(|u| u["actions"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["action"] == "addDelivery")
        .enumerate()
        .map(|(i, a)| json!({"id": format!("delivery-{i}"), "parcels": [{"id": format!("parcel-{i}"), "trackingData": a["parcels"][0]["trackingData"]}]}))
        .collect();
    let cancelled = updates
        .iter()
        .flat_map(|u| u["actions"].as_array().cloned().unwrap_or_default())
        .any(|a| a["orderState"] == "Cancelled");
    let mut order = json!({
        "id": order_id,
        "version": 1 + updates.len(),
        "orderState": if cancelled { "Cancelled" } else { "Open" },
        "lineItems": [
            {"id": "a1b2c3d4-0000-4000-8000-00000000000a", "quantity": 1},
            {"id": "a1b2c3d4-0000-4000-8000-00000000000c", "quantity": 2}
        ],
        "shippingInfo": {"deliveries": deliveries}
    });
    if req.path.contains("expand=paymentInfo.payments") {
        order["paymentInfo"] = json!({"payments": [{
            "typeId": "payment", "id": "pay-1", "obj": ct_payment_now(before)
        }]});
    }
    if req.method == "POST" {
        let version = req.json()["version"].clone();
        if version != json!(updates.len() + 1) {
            return (
                409,
                json!({"statusCode": 409, "message": "Object version mismatch"}),
            );
        }
        order["version"] = json!(updates.len() + 2);
    }
    (200, order)
}

/// The order's one payment as it is after the refunds `before` added.
fn ct_payment_now(before: &[Seen]) -> Value {
    let refunds: Vec<Value> = before
        .iter()
        .filter(|s| s.method == "POST" && s.path == "/tea-and-cups/payments/pay-1")
        .enumerate()
        .map(|(i, s)| {
            let mut t = s.json()["actions"][0]["transaction"].clone();
            t["id"] = json!(format!("txn-refund-{}", i + 1));
            t
        })
        .collect();
    let mut transactions = vec![
        json!({"id": "txn-charge", "type": "Charge", "state": "Success",
        "amount": {"centAmount": 7663, "currencyCode": "EUR"}}),
    ];
    transactions.extend(refunds);
    json!({"id": "pay-1", "version": transactions.len(), "transactions": transactions})
}

fn ct_payment(payment: &str, req: &Seen, before: &[Seen]) -> (u16, Value) {
    if payment != "pay-1" || req.method != "POST" {
        return (404, json!({"statusCode": 404, "message": "not found"}));
    }
    let now = ct_payment_now(before);
    if req.json()["version"] != now["version"] {
        return (
            409,
            json!({"statusCode": 409, "message": "Object version mismatch"}),
        );
    }
    let mut after = before.to_vec();
    after.push(req.clone());
    (200, ct_payment_now(&after))
}
