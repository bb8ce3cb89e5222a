//! A shop on a commerce platform, end to end through the deployed shape: the platform's events
//! are put on its partner event bus (a moto bus named after the partner event source, as
//! EventBridge names it), the rule `orderfleet provision` made routes them to the storefront
//! queue, the real `orderfleet-worker` runs the saga and the storefront handler, and the
//! write-back reaches an HTTP fake of the platform's API that checks what it is sent.
//!
//! The fixtures under `tests/fixtures/` are ours, written from the platforms' documentation of
//! their EventBridge envelopes and webhook payloads: Shopify's `shopifyWebhook` events (headers
//! in `metadata`, the REST body in `payload`) and commercetools' Messages.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use orderfleet::infra::aws::Clients;
use orderfleet::infra::topology::Topology;
use serde_json::{json, Value};

use crate::support::platforms::{
    ct_answer, shopify_answer, Fake, Seen, CT_CLIENT_ID, CT_CLIENT_SECRET, CT_TOKEN, SHOPIFY_TOKEN,
};
use crate::support::{self, saga};

const WAIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// The fleet around it

/// A topology connected to the partner event source `source`, provisioned on moto. The source
/// is created first as the platform would create it in the shop's account.
async fn connected(clients: &Clients, source: &str) -> Topology {
    clients
        .events
        .create_partner_event_source()
        .name(source)
        .account("123456789012")
        .send()
        .await
        .expect("create the partner event source");
    let mut topo = Topology::with_prefix(support::unique("t"));
    topo.lake = false;
    topo.partner_sources = vec![source.to_string()];
    orderfleet::infra::provision::provision(clients, &topo)
        .await
        .expect("provision");
    topo
}

/// The real worker running the saga and the storefront, writing back to `platform_flags`.
fn worker(topo: &Topology, db_url: &str, platform_flags: &[&str]) -> support::Proc {
    Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
        .args([
            "--handler",
            "orders,inventory,payments,fulfillment,storefront",
        ])
        .args(["--prefix", &topo.prefix, "--database-url", db_url])
        .args(["--sandbox-payment-database-url", db_url])
        .args(["--wait-time-secs", "1", "--retry-base-secs", "1"])
        .args(["--heartbeat-secs", "1", "--metrics-sink", "none"])
        .args(["--platform-api", "live"])
        .args(platform_flags)
        .env("RUST_LOG", "warn")
        .env_remove("ORDERFLEET_HANDLERS")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(support::Proc)
        .expect("spawn orderfleet-worker")
}

/// Puts one platform event on its partner bus, as the platform does.
async fn put(clients: &Clients, source: &str, detail_type: &str, detail: &Value) {
    let out = clients
        .events
        .put_events()
        .entries(
            PutEventsRequestEntry::builder()
                .event_bus_name(source)
                .source(source)
                .detail_type(detail_type)
                .detail(detail.to_string())
                .build(),
        )
        .send()
        .await
        .expect("PutEvents on the partner bus");
    assert_eq!(out.failed_entry_count(), 0, "{out:?}");
}

fn fixture(path: &str) -> Value {
    let full = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&full).unwrap()).unwrap()
}

async fn status_of(pool: &deadpool_postgres::Pool, order_id: &str) -> Option<String> {
    let c = pool.get().await.unwrap();
    c.query_opt("SELECT status FROM orders WHERE id = $1", &[&order_id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn wait_status(pool: &deadpool_postgres::Pool, order_id: &str, want: &str) {
    support::wait_for(WAIT, &format!("order {order_id} {want}"), || async {
        (status_of(pool, order_id).await.as_deref() == Some(want)).then_some(())
    })
    .await;
}

async fn wait_stock(pool: &deadpool_postgres::Pool, sku: &str, on_hand: i64) {
    support::wait_for(WAIT, &format!("{sku} on hand {on_hand}"), || async {
        let c = pool.get().await.unwrap();
        let row = c
            .query_opt("SELECT on_hand FROM stock WHERE sku = $1", &[&sku])
            .await
            .unwrap();
        (row.map(|r| r.get::<_, i64>(0)) == Some(on_hand)).then_some(())
    })
    .await;
}

async fn wait_seen(fake: &Fake, what: &str, check: impl Fn(&Seen) -> bool) -> Seen {
    support::wait_for(WAIT, what, || async {
        fake.seen().into_iter().find(|s| check(s))
    })
    .await
}

async fn scalar_of(pool: &deadpool_postgres::Pool, sql: &str, id: &str) -> i64 {
    let c = pool.get().await.unwrap();
    c.query_one(sql, &[&id]).await.unwrap().get(0)
}

/// How many OrderPlaced events the orders handler applied: a webhook translated twice would
/// be two, each with an event id of its own.
async fn placed_handled(pool: &deadpool_postgres::Pool) -> i64 {
    let c = pool.get().await.unwrap();
    c.query_one(
        "SELECT count(*) FROM processed_messages
          WHERE handler = 'orders' AND detail_type = 'OrderPlaced'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The duplicate delivery was applied once (one OrderPlaced reached orders), and the topic the
/// fleet does not translate was counted once, not dead-lettered.
async fn once_and_skipped(pool: &deadpool_postgres::Pool, topic: &str) {
    assert_eq!(
        placed_handled(pool).await,
        1,
        "one OrderPlaced reached orders"
    );
    let skipped = "SELECT events FROM platform_skipped_topics WHERE topic = $1";
    assert_eq!(scalar_of(pool, skipped, topic).await, 1, "{topic} counted");
}

/// The ledger's sales revenue, discounts, shipping revenue and tax payable in `currency`
/// (credits negative), and every transaction balanced.
async fn assert_books(pool: &deadpool_postgres::Pool, currency: &str, want: [i64; 4]) {
    let books = balances(pool, currency).await;
    let got = [
        "sales_revenue",
        "sales_discounts",
        "shipping_revenue",
        "tax_payable",
    ]
    .map(|account| books.get(account).copied().unwrap_or(0));
    assert_eq!(got, want, "{books:?}");
    saga::assert_ledger_balances(pool).await;
}

/// Waits until the storefront recorded that the platform cancelled `order_id` itself.
async fn wait_cancelled_on_platform(pool: &deadpool_postgres::Pool, order_id: &str) {
    support::wait_for(WAIT, "the platform's cancellation recorded", || async {
        let n = scalar_of(
            pool,
            "SELECT count(*) FROM platform_orders WHERE order_id = $1 AND cancelled_on_platform",
            order_id,
        )
        .await;
        (n == 1).then_some(())
    })
    .await;
}

/// Events the storefront handler applied so far.
async fn handled_by_storefront(pool: &deadpool_postgres::Pool) -> i64 {
    let c = pool.get().await.unwrap();
    c.query_one(
        "SELECT count(*) FROM processed_messages WHERE handler = 'storefront'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// What `orderfleet dlq peek storefront --json` shows.
fn dlq_peek(topo: &Topology) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args([
            "dlq",
            "peek",
            "storefront",
            "--prefix",
            &topo.prefix,
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["messages"].as_array().cloned().unwrap_or_default()
}

/// The ledger's balance per account in `currency`.
async fn balances(pool: &deadpool_postgres::Pool, currency: &str) -> BTreeMap<String, i64> {
    saga::ledger(pool)
        .await
        .into_iter()
        .filter_map(|(k, v)| {
            let (account, c) = k.split_once(':')?;
            (c == currency).then(|| (account.to_string(), v))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Shopify

/// A Shopify webhook with its own webhook id, of `topic`, about `payload`.
fn shopify_event(topic: &str, payload: Value) -> Value {
    let mut event = fixture("shopify/orders_create.json");
    event["metadata"]["X-Shopify-Topic"] = json!(topic);
    event["metadata"]["X-Shopify-Webhook-Id"] = json!(uuid::Uuid::new_v4().to_string());
    event["metadata"]["X-Shopify-Event-Id"] = json!(uuid::Uuid::new_v4().to_string());
    event["payload"] = payload;
    event
}

/// The fixture's product with one variant of its own.
fn shopify_product(title: &str, sku: &str, price: &str, item: u64) -> Value {
    let mut p = fixture("shopify/products_create.json")["payload"].clone();
    p["id"] = json!(item / 1000);
    p["title"] = json!(title);
    p["variants"][0]["sku"] = json!(sku);
    p["variants"][0]["price"] = json!(price);
    p["variants"][0]["inventory_item_id"] = json!(item);
    p
}

/// The fixture's order with Shopify id `id` and number `name`.
fn shopify_order(id: u64, name: &str) -> Value {
    let mut o = fixture("shopify/orders_create.json")["payload"].clone();
    o["id"] = json!(id);
    o["admin_graphql_api_id"] = json!(format!("gid://shopify/Order/{id}"));
    o["name"] = json!(name);
    o
}

#[tokio::test]
async fn a_shopify_shop_on_its_partner_bus_sells_cancels_and_hears_back() {
    let clients = support::clients().await;
    let source = format!(
        "aws.partner/shopify.com/9517/{}",
        support::unique("orderfleet")
    );
    let topo = connected(&clients, &source).await;
    let (pool, db_url) = support::fresh_db().await;
    let fake = Fake::start(shopify_answer).await;
    let _worker = worker(
        &topo,
        &db_url,
        &[
            "--shopify-access-token",
            SHOPIFY_TOKEN,
            "--shopify-admin-url",
            &fake.url,
        ],
    );

    // The catalogue and the stock come from the platform too.
    let products = [
        ("Ceramic Teapot", "TEA-POT-1", "45.00", 39072856001u64),
        ("Tea Cup - Blue", "TEA-CUP-2", "12.50", 49148385001),
        ("Copper Kettle", "KETTLE-3", "89.00", 51234567001),
    ];
    for (title, sku, price, item) in products {
        let p = shopify_product(title, sku, price, item);
        put(
            &clients,
            &source,
            "shopifyWebhook",
            &shopify_event("products/create", p),
        )
        .await;
    }
    support::wait_for(WAIT, "the three products", || async {
        let c = pool.get().await.unwrap();
        let n: i64 = c
            .query_one("SELECT count(*) FROM platform_inventory_items", &[])
            .await
            .unwrap()
            .get(0);
        (n == 3).then_some(())
    })
    .await;
    for item in [39072856001u64, 49148385001] {
        let mut level = fixture("shopify/inventory_levels_update.json")["payload"].clone();
        level["inventory_item_id"] = json!(item);
        put(
            &clients,
            &source,
            "shopifyWebhook",
            &shopify_event("inventory_levels/update", level),
        )
        .await;
    }
    wait_stock(&pool, "TEA-POT-1", 10).await;
    wait_stock(&pool, "TEA-CUP-2", 10).await;
    // Levels out of order: a measurement older than the last one applied, arriving late, is
    // stale; only rises over the newest level are received.
    for (available, at) in [
        (12, "2026-12-01T11:00:00+01:00"),
        (3, "2026-12-01T10:30:00+01:00"),
        (13, "2026-12-01T11:30:00+01:00"),
    ] {
        let mut level = fixture("shopify/inventory_levels_update.json")["payload"].clone();
        level["inventory_item_id"] = json!(49148385001u64);
        level["available"] = json!(available);
        level["updated_at"] = json!(at);
        // One at a time, so that the stale one is applied between the two others.
        let handled = handled_by_storefront(&pool).await;
        put(
            &clients,
            &source,
            "shopifyWebhook",
            &shopify_event("inventory_levels/update", level),
        )
        .await;
        support::wait_for(WAIT, "the level handled", || async {
            (handled_by_storefront(&pool).await > handled).then_some(())
        })
        .await;
    }
    wait_stock(&pool, "TEA-CUP-2", 13).await;

    // The fixture's order, delivered twice (Shopify redelivers with the same webhook id), and
    // a topic the fleet does not translate.
    let placed = fixture("shopify/orders_create.json");
    put(&clients, &source, "shopifyWebhook", &placed).await;
    put(&clients, &source, "shopifyWebhook", &placed).await;
    put(
        &clients,
        &source,
        "shopifyWebhook",
        &shopify_event(
            "customers/create",
            json!({"id": 1, "email": "x@example.com"}),
        ),
    )
    .await;

    let id = "shopify-820982911946154508";
    wait_status(&pool, id, "completed").await;
    let row = saga::order_row(&pool, id).await;
    assert_eq!(
        row.total_minor,
        Some(7399),
        "73.99 USD: 70.00 - 7.00 + 5.95 + 5.04"
    );
    let c = pool.get().await.unwrap();
    let r = c
        .query_one(
            "SELECT order_number, platform, platform_order_id, discount_minor, shipping_minor,
                    tax_minor, tax_included
               FROM orders WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<String>>(0).as_deref(), Some("#1042"));
    assert_eq!(r.get::<_, Option<String>>(1).as_deref(), Some("shopify"));
    assert_eq!(
        r.get::<_, Option<String>>(2).as_deref(),
        Some("gid://shopify/Order/820982911946154508")
    );
    assert_eq!(
        (r.get::<_, i64>(3), r.get::<_, i64>(4), r.get::<_, i64>(5)),
        (700, 595, 504)
    );
    assert!(!r.get::<_, bool>(6));

    // The write-back: the fulfillment with the tracking number the carrier gave, once.
    let tracking: String = c
        .query_one(
            "SELECT tracking_number FROM shipments WHERE order_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    let create = wait_seen(&fake, "fulfillmentCreate", |s| {
        s.graphql() == "fulfillmentCreate"
    })
    .await;
    assert_eq!(create.method, "POST");
    assert_eq!(create.path, "/admin/api/2025-01/graphql.json");
    assert_eq!(create.headers["x-shopify-access-token"], SHOPIFY_TOKEN);
    assert_eq!(create.headers["content-type"], "application/json");
    let fulfillment = &create.json()["variables"]["fulfillment"];
    assert_eq!(fulfillment["trackingInfo"]["number"], json!(tracking));
    assert!(fulfillment["trackingInfo"]["company"].as_str().is_some());
    assert_eq!(
        fulfillment["lineItemsByFulfillmentOrder"],
        json!([{"fulfillmentOrderId": "gid://shopify/FulfillmentOrder/820982911946154508-fo"}])
    );
    support::wait_for(WAIT, "the write-back recorded done", || async {
        let n = scalar_of(
            &pool,
            "SELECT count(*) FROM platform_calls WHERE order_id = $1 AND operation = 'fulfill'
                AND state = 'done'",
            id,
        )
        .await;
        (n == 1).then_some(())
    })
    .await;

    // The duplicate webhook was applied once; the unknown topic was counted, not dead-lettered.
    once_and_skipped(&pool, "customers/create").await;

    // The ledger books each part: revenue at list price, the discount against it, shipping
    // and tax apart; and it balances.
    assert_books(&pool, "USD", [-7000, 700, -595, -504]).await;

    // Cancelled on Shopify (the webhook may come before the order's): the order ends
    // cancelled and nothing is written back, the platform knows already.
    let early = 820982911946154509u64;
    let mut cancelled = fixture("shopify/orders_cancelled.json")["payload"].clone();
    cancelled["id"] = json!(early);
    put(
        &clients,
        &source,
        "shopifyWebhook",
        &shopify_event("orders/cancelled", cancelled),
    )
    .await;
    wait_cancelled_on_platform(&pool, &format!("shopify-{early}")).await;
    put(
        &clients,
        &source,
        "shopifyWebhook",
        &shopify_event("orders/create", shopify_order(early, "#1043")),
    )
    .await;
    wait_status(&pool, &format!("shopify-{early}"), "cancelled").await;

    // Cancelled by the fleet (the kettle has no stock): Shopify is told.
    let short = 820982911946154510u64;
    let mut order = shopify_order(short, "#1044");
    order["line_items"] = json!([{
        "id": 1, "variant_id": 51234567, "title": "Copper Kettle", "sku": "KETTLE-3",
        "quantity": 1, "price": "89.00",
        "price_set": {"shop_money": {"amount": "89.00", "currency_code": "USD"},
                      "presentment_money": {"amount": "81.88", "currency_code": "EUR"}}
    }]);
    for (field, amount) in [
        ("total_discounts_set", "0.00"),
        ("total_shipping_price_set", "0.00"),
        ("total_tax_set", "0.00"),
        ("total_price_set", "89.00"),
    ] {
        order[field]["shop_money"]["amount"] = json!(amount);
    }
    put(
        &clients,
        &source,
        "shopifyWebhook",
        &shopify_event("orders/create", order),
    )
    .await;
    wait_status(&pool, &format!("shopify-{short}"), "cancelled").await;
    let cancel = wait_seen(&fake, "orderCancel", |s| s.graphql() == "orderCancel").await;
    assert_eq!(
        cancel.json()["variables"]["orderId"],
        json!(format!("gid://shopify/Order/{short}"))
    );
    assert!(cancel.json()["variables"]["staffNote"]
        .as_str()
        .unwrap()
        .starts_with("orderfleet: "));
    let cancels: Vec<Seen> = fake
        .seen()
        .into_iter()
        .filter(|s| s.graphql() == "orderCancel")
        .collect();
    assert_eq!(
        cancels.len(),
        1,
        "only the fleet's cancellation is written back"
    );

    // Money that does not add up is poison, with the arithmetic in the reason.
    let mut wrong = shopify_order(820982911946154511, "#1045");
    wrong["total_price_set"]["shop_money"]["amount"] = json!("80.00");
    put(
        &clients,
        &source,
        "shopifyWebhook",
        &shopify_event("orders/create", wrong),
    )
    .await;
    let dead = support::wait_for(WAIT, "the wrong order in the DLQ", || async {
        let dead = dlq_peek(&topo);
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["kind"], "poison");
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("#1045") && reason.contains("do not make its total 8000"),
        "{reason}"
    );
    assert_eq!(status_of(&pool, "shopify-820982911946154511").await, None);
}

// ---------------------------------------------------------------------------------------------
// commercetools

fn ct_message(path: &str) -> Value {
    let mut m = fixture(path);
    m["id"] = json!(uuid::Uuid::new_v4().to_string());
    m
}

fn ct_product(sku: &str, name: &str, cents: i64) -> Value {
    let mut m = ct_message("commercetools/product_published.json");
    m["productProjection"]["name"] = json!({"en": name});
    m["productProjection"]["masterVariant"]["sku"] = json!(sku);
    m["productProjection"]["masterVariant"]["prices"][0]["value"]["centAmount"] = json!(cents);
    m
}

fn ct_stock(sku: &str, on_stock: i64) -> Value {
    let mut m = ct_message("commercetools/inventory_entry_quantity_set.json");
    m["resourceUserProvidedIdentifiers"]["sku"] = json!(sku);
    m["newQuantityOnStock"] = json!(on_stock);
    m["newAvailableQuantity"] = json!(on_stock);
    m
}

#[tokio::test]
async fn a_commercetools_project_on_its_partner_bus_sells_cancels_and_hears_back() {
    let clients = support::clients().await;
    let source = format!(
        "aws.partner/commercetools.com/tea-and-cups/{}",
        support::unique("orderfleet")
    );
    let topo = connected(&clients, &source).await;
    let (pool, db_url) = support::fresh_db().await;
    let fake = Fake::start(ct_answer).await;
    let _worker = worker(
        &topo,
        &db_url,
        &[
            "--commercetools-client-id",
            CT_CLIENT_ID,
            "--commercetools-client-secret",
            CT_CLIENT_SECRET,
            "--commercetools-auth-url",
            &fake.url,
            "--commercetools-api-url",
            &fake.url,
        ],
    );

    for (sku, name, cents) in [
        ("CT-POT-1", "Cast Iron Teapot", 4990),
        ("CT-CUP-2", "Porcelain Cup", 1490),
    ] {
        put(
            &clients,
            &source,
            "ProductPublished",
            &ct_product(sku, name, cents),
        )
        .await;
        put(
            &clients,
            &source,
            "InventoryEntryQuantitySet",
            &ct_stock(sku, 10),
        )
        .await;
    }
    wait_stock(&pool, "CT-POT-1", 10).await;
    wait_stock(&pool, "CT-CUP-2", 10).await;

    let created = fixture("commercetools/order_created.json");
    put(&clients, &source, "OrderCreated", &created).await;
    put(&clients, &source, "OrderCreated", &created).await;
    put(
        &clients,
        &source,
        "CustomerCreated",
        &json!({"notificationType": "Message", "projectKey": "tea-and-cups",
                "id": uuid::Uuid::new_v4().to_string(), "type": "CustomerCreated",
                "resource": {"typeId": "customer", "id": "c-1"}}),
    )
    .await;

    let id = "ct-8c1f5d9e-2a7b-4c3d-9e0f-1a2b3c4d5e6f";
    wait_status(&pool, id, "completed").await;
    assert_eq!(saga::order_row(&pool, id).await.total_minor, Some(7663));
    let update = wait_seen(&fake, "addDelivery", |s| {
        s.method == "POST" && s.body.contains("addDelivery")
    })
    .await;
    assert_eq!(
        update.path,
        "/tea-and-cups/orders/8c1f5d9e-2a7b-4c3d-9e0f-1a2b3c4d5e6f"
    );
    assert_eq!(
        update.headers["authorization"],
        format!("Bearer {CT_TOKEN}")
    );
    let c = pool.get().await.unwrap();
    let tracking: String = c
        .query_one(
            "SELECT tracking_number FROM shipments WHERE order_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    let body = update.json();
    assert_eq!(body["version"], json!(1));
    assert_eq!(
        body["actions"][0]["parcels"][0]["trackingData"]["trackingId"],
        json!(tracking)
    );
    assert_eq!(
        body["actions"][1],
        json!({"action": "changeShipmentState", "shipmentState": "Shipped"})
    );
    assert_eq!(
        body["actions"][0]["items"],
        json!([
            {"id": "a1b2c3d4-0000-4000-8000-00000000000a", "quantity": 1},
            {"id": "a1b2c3d4-0000-4000-8000-00000000000c", "quantity": 2}
        ])
    );
    once_and_skipped(&pool, "CustomerCreated").await;
    // Tax included in the prices: revenue is what is left of the total after shipping and tax.
    assert_books(&pool, "EUR", [-6746, 797, -490, -1224]).await;

    // Cancelled on commercetools before its order arrived: it ends cancelled, and nothing
    // is written back.
    let early = "0e0e0e0e-0000-4000-8000-000000000002";
    let mut state = ct_message("commercetools/order_state_changed.json");
    state["resource"]["id"] = json!(early);
    put(&clients, &source, "OrderStateChanged", &state).await;
    wait_cancelled_on_platform(&pool, &format!("ct-{early}")).await;
    let mut order = ct_message("commercetools/order_created.json");
    order["order"]["id"] = json!(early);
    order["order"]["orderNumber"] = json!("CT-10043");
    put(&clients, &source, "OrderCreated", &order).await;
    wait_status(&pool, &format!("ct-{early}"), "cancelled").await;
    assert!(
        !fake.seen().iter().any(|s| s.path.ends_with(early)),
        "an order the platform cancelled is not written back"
    );
    // One token for all of it.
    assert_eq!(
        fake.seen()
            .iter()
            .filter(|s| s.path == "/oauth/token")
            .count(),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// The simulator speaking Shopify: `orderfleet publish --platform shopify`, as `make demo
// PLATFORM=shopify` runs it, with the write-back sandbox

fn orderfleet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("ORDERFLEET_PARTNER_SOURCES")
        .stdin(Stdio::null())
        .output()
        .expect("run orderfleet")
}

#[tokio::test]
async fn the_simulator_publishes_shopify_orders_that_complete_and_are_written_back() {
    let clients = support::clients().await;
    let source = format!("aws.partner/shopify.com/1/{}", support::unique("sim"));
    let topo = connected(&clients, &source).await;
    let (pool, db_url) = support::fresh_db().await;
    let _worker = Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
        .args(["--all", "--prefix", &topo.prefix, "--database-url", &db_url])
        .args(["--sandbox-payment-database-url", &db_url])
        .args(["--wait-time-secs", "1", "--retry-base-secs", "1"])
        .args(["--heartbeat-secs", "1", "--metrics-sink", "none"])
        .args([
            "--lake-hash-key",
            "a-test-key-of-at-least-thirty-two-bytes!!",
        ])
        .args(["--email-transport", "file", "--email-outbox-dir"])
        .arg(std::env::temp_dir().join(format!("{}-mail", topo.prefix)))
        .env("RUST_LOG", "warn")
        .env_remove("ORDERFLEET_HANDLERS")
        .env_remove("ORDERFLEET_PLATFORM_API")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(support::Proc)
        .expect("spawn orderfleet-worker");

    let out = orderfleet(&[
        "publish",
        "--orders",
        "6",
        "--platform",
        "shopify",
        "--partner-source",
        &source,
        "--prefix",
        &topo.prefix,
        "--database-url",
        &db_url,
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["orders"], 6);
    assert_eq!(summary["bus"], json!(source));
    let waited = orderfleet(&[
        "wait",
        "--timeout-secs",
        "60",
        "--interval-ms",
        "250",
        "--database-url",
        &db_url,
    ]);
    assert!(waited.status.success(), "{waited:?}");

    let c = pool.get().await.unwrap();
    let rows = c
        .query(
            "SELECT o.status, o.platform, o.shipping_minor, o.tax_minor, count(p.*)
               FROM orders o
               LEFT JOIN sandbox_platform_calls p ON p.order_ref = o.platform_order_id AND p.operation = 'fulfill'
              GROUP BY 1, 2, 3, 4, o.id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 6);
    for r in rows {
        assert_eq!(r.get::<_, String>(0), "completed");
        assert_eq!(r.get::<_, Option<String>>(1).as_deref(), Some("shopify"));
        assert_eq!(r.get::<_, i64>(2), 495);
        assert!(r.get::<_, i64>(3) > 0);
        assert_eq!(r.get::<_, i64>(4), 1, "one fulfillment written back");
    }
    saga::assert_ledger_balances(&pool).await;
}
