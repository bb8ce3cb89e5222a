//! Least privilege in the fleet's own code: each worker publishes to the bus only what its own
//! handlers emitted, under their sources, because that is all its IAM role allows
//! (`events:source`, checked against the catalogue in `xtask/tests/deploy_cfn.rs`).

use orderfleet::domain::catalogue;
use orderfleet::domain::names::HandlerName;
use orderfleet::store::outbox::Relay;
use serde_json::json;

use crate::support;

#[tokio::test]
async fn a_worker_s_relay_publishes_only_the_events_its_own_handlers_emitted() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, _) = support::fresh_db().await;
    let c = pool.get().await.unwrap();
    for source in ["orderfleet.orders", "orderfleet.payments"] {
        c.execute(
            "INSERT INTO outbox (event_id, source, detail_type, detail)
             VALUES (gen_random_uuid(), $1, 'Probe', '{\"order_id\": \"o-1\"}')",
            &[&source],
        )
        .await
        .unwrap();
    }
    let orders = HandlerName::Orders;
    assert!(catalogue::produces(orders));
    let relay = Relay::new(
        pool.clone(),
        clients.events.clone(),
        topo.bus_name.clone(),
        vec![orders.source()],
    );
    let pass = relay.publish_once().await.unwrap();
    assert_eq!(pass.published, 1);
    assert_eq!(relay.publish_once().await.unwrap().published, 0);
    let left: Vec<String> = c
        .query("SELECT source FROM outbox WHERE published_at IS NULL", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["orderfleet.payments".to_string()]);
}

#[test]
fn only_the_saga_handlers_and_the_storefront_emit_events_so_only_their_workers_relay() {
    // Analytics, notifications and personalization only consume: their workers publish
    // nothing, and their roles have no PutEvents.
    for h in [
        HandlerName::Analytics,
        HandlerName::Notifications,
        HandlerName::Personalization,
    ] {
        assert!(!catalogue::produces(h), "{h}");
    }
    for h in [
        HandlerName::Orders,
        HandlerName::Inventory,
        HandlerName::Payments,
        HandlerName::Fulfillment,
        HandlerName::Storefront,
    ] {
        assert!(catalogue::produces(h), "{h}");
    }
}

/// `url` (`postgres://<owner>@host:port/db`) with another user (and password) in it.
fn with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (_, host_and_db) = rest.split_once('@').unwrap();
    format!("{scheme}://{user}@{host_and_db}")
}

/// Runs `statement` as `role` in a transaction that is rolled back; the error's SQLSTATE, if
/// it failed.
async fn as_role(pool: &deadpool_postgres::Pool, role: &str, statement: &str) -> Option<String> {
    let mut c = pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.batch_execute(&format!("SET LOCAL ROLE {role}"))
        .await
        .unwrap();
    let out = tx.batch_execute(statement).await;
    tx.rollback().await.ok();
    out.err()
        .map(|e| e.code().map(|c| c.code().to_string()).unwrap_or_default())
}

#[tokio::test]
async fn each_role_is_refused_what_is_not_its_own() {
    let (pool, _) = support::fresh_db().await;
    const FORGE: &str = "INSERT INTO outbox (event_id, source, detail_type, detail)
        VALUES (gen_random_uuid(), 'orderfleet.payments', 'PaymentCaptured', '{}')";
    let refused: &[(&str, &str)] = &[
        ("orderfleet_analytics", "UPDATE payments SET state = state"),
        ("orderfleet_analytics", FORGE),
        (
            "orderfleet_notifications",
            "UPDATE customers SET email = email",
        ),
        ("orderfleet_notifications", FORGE),
        (
            "orderfleet_personalization",
            "UPDATE stock SET on_hand = on_hand",
        ),
        ("orderfleet_personalization", FORGE),
        ("orderfleet_orders", "UPDATE payments SET state = state"),
        ("orderfleet_orders", "DELETE FROM ledger_postings"),
        (
            "orderfleet_orders",
            "SELECT payment_token FROM payment_methods",
        ),
        ("orderfleet_inventory", "UPDATE orders SET status = status"),
        (
            "orderfleet_fulfillment",
            "UPDATE payments SET state = state",
        ),
        ("orderfleet_payments", "UPDATE orders SET status = status"),
        ("orderfleet_payments", "DELETE FROM ledger_postings"),
        (
            "orderfleet_payments",
            "TRUNCATE ledger_transactions CASCADE",
        ),
        ("orderfleet_operator", "UPDATE orders SET status = status"),
        // The operator reads no personal data and no token.
        ("orderfleet_operator", "SELECT email FROM customers"),
        ("orderfleet_operator", "SELECT payment_token FROM payments"),
        ("orderfleet_operator", "SELECT shipping_address FROM orders"),
        (
            "orderfleet_operator",
            "SELECT payment_token FROM payment_methods",
        ),
        (
            "orderfleet_operator",
            "SELECT payment_token FROM sandbox_provider_calls",
        ),
        // Rows no worker deletes.
        ("orderfleet_orders", "DELETE FROM orders"),
        ("orderfleet_payments", "DELETE FROM payments"),
        ("orderfleet_inventory", "DELETE FROM stock_movements"),
        ("orderfleet_operator", "DELETE FROM processed_messages"),
        // The suppression list: the operator reads and removes, only notifications adds.
        (
            "orderfleet_operator",
            "INSERT INTO email_suppressions (address_hash, address_masked, reason, \
             source_event_id, last_event_id, first_seen, last_seen) VALUES \
             ('hmac-sha256:00000000000000000000000000000000', 'a***@x', 'bounce', 'e', 'e', now(), now())",
        ),
        (
            "orderfleet_operator",
            "UPDATE email_suppressions SET reason = reason",
        ),
        ("orderfleet_operator", "DELETE FROM marketing_opt_outs"),
        ("orderfleet_notifications", "DELETE FROM email_suppressions"),
        ("orderfleet_analytics", "SELECT * FROM email_suppressions"),
    ];
    for (role, statement) in refused {
        assert_eq!(
            as_role(&pool, role, statement).await.as_deref(),
            Some("42501"),
            "{role} was not refused: {statement}"
        );
    }
    // No worker owns the ledger, so none can switch its append-only guard off.
    for role in HandlerName::ALL.map(|h| format!("orderfleet_{h}")) {
        let role = role.as_str();
        assert_eq!(
            as_role(
                &pool,
                role,
                "DROP TRIGGER ledger_postings_append_only ON ledger_postings"
            )
            .await
            .as_deref(),
            Some("42501"),
            "{role} could drop the ledger's trigger"
        );
    }
    // And what they need is allowed: the refusals above are grants, not a broken login.
    assert_eq!(
        as_role(
            &pool,
            "orderfleet_payments",
            "SELECT count(*) FROM payment_methods"
        )
        .await,
        None
    );
    assert_eq!(
        as_role(
            &pool,
            "orderfleet_operator",
            "SELECT count(*) FROM ledger_postings"
        )
        .await,
        None
    );
    for allowed in [
        "SELECT address_hash, address_masked, reason FROM email_suppressions",
        "DELETE FROM email_suppressions WHERE address_hash = 'x'",
        "SELECT count(*) FROM marketing_opt_outs",
    ] {
        assert_eq!(
            as_role(&pool, "orderfleet_operator", allowed).await,
            None,
            "{allowed}"
        );
    }
}

#[tokio::test]
async fn the_whole_saga_runs_with_each_worker_under_its_own_role() {
    use orderfleet::domain::redaction::Redactor;
    use orderfleet::handlers::{analytics, fulfillment, inventory, orders, payments};
    use orderfleet::providers::carrier::SandboxCarrier;
    use orderfleet::providers::payment::SandboxProvider;
    use orderfleet::store::db::pool_as;
    use std::sync::Arc;

    use crate::support::saga::*;

    let (owner, url) = support::fresh_db().await;
    let role = |h: HandlerName| pool_as(&url, 8, &format!("orderfleet_{h}")).unwrap();
    let payments_pool = role(HandlerName::Payments);
    let fulfillment_pool = role(HandlerName::Fulfillment);
    let outbox = crate::support::notifications::TempDir::new("roles-mail-");
    let mut fleet = orderfleet_testkit::inproc::Fleet::new(owner.clone());
    for h in HandlerName::ALL {
        fleet = fleet.with_handler_pool(h, role(h));
    }
    let provider = Arc::new(SandboxProvider::new(
        payments_pool.clone(),
        std::time::Duration::ZERO,
    ));
    let fleet = fleet
        .with_handler(HandlerName::Orders, Arc::new(orders::Orders))
        .with_handler(HandlerName::Inventory, Arc::new(inventory::Inventory))
        .with_handler(
            HandlerName::Payments,
            Arc::new(payments::Payments::with_attempt_log(
                provider,
                payments_pool,
            )),
        )
        .with_handler(
            HandlerName::Fulfillment,
            Arc::new(fulfillment::Fulfillment::new(
                Arc::new(SandboxCarrier::new(fulfillment_pool.clone())),
                fulfillment_pool,
            )),
        )
        .with_handler(
            HandlerName::Notifications,
            Arc::new(orderfleet::handlers::notifications::Notifications::new(
                crate::support::notifications::file_mailer(outbox.path()),
            )),
        )
        .with_handler(
            HandlerName::Analytics,
            Arc::new(analytics::Analytics::new(
                Redactor::new(&[9u8; 32]).unwrap(),
            )),
        )
        .with_handler(
            HandlerName::Personalization,
            Arc::new(orderfleet::handlers::personalization::Personalization::new(
                None,
            )),
        )
        .with_handler(HandlerName::Storefront, {
            let pool = role(HandlerName::Storefront);
            let sandbox = orderfleet::providers::platform::Sandbox::new(
                orderfleet::domain::platform::Platform::Shopify,
                pool.clone(),
            );
            Arc::new(orderfleet::handlers::storefront::Storefront::new(
                vec![Arc::new(sandbox)],
                orderfleet::domain::events::Currency::new("EUR").unwrap(),
                pool,
                std::time::Duration::from_secs(5),
            ))
        });

    stock_sku(&fleet, "TEA-1", 1250, 10).await;
    fleet
        .publish_event(&order("ord-r1", &[("TEA-1", 2, 1250)], "tok_visa"))
        .await
        .unwrap();
    let mut returned = order("ord-r2", &[("TEA-1", 1, 1250)], "tok_visa");
    returned.shipping_address.postal_code =
        orderfleet::providers::carrier::UNDELIVERABLE_POSTAL_CODE.into();
    fleet.publish_event(&returned).await.unwrap();
    fleet
        .publish_event(&order("ord-r3", &[("TEA-1", 1, 1250)], "tok_visa"))
        .await
        .unwrap();
    fleet.publish_event(&cancellation("ord-r3")).await.unwrap();
    // An order from Shopify, translated by the storefront and written back when it ships.
    let money = json!({"shop_money": {"amount": "12.50", "currency_code": "EUR"}});
    let shopify = orderfleet::domain::envelope::Envelope {
        detail: json!({
            "metadata": {"X-Shopify-Topic": "orders/create", "X-Shopify-Webhook-Id": "w-1",
                         "X-Shopify-Shop-Domain": "roles.myshopify.com"},
            "payload": {
                "id": 4242, "name": "#4242", "email": "ada@example.com",
                "created_at": "2026-12-01T10:00:00Z", "total_price_set": money,
                "customer": {"id": 7, "first_name": "Ada", "last_name": "Lovelace"},
                "shipping_address": {"name": "Ada Lovelace", "address1": "1 Lane",
                                     "city": "London", "zip": "N1", "country_code": "GB"},
                "line_items": [{"sku": "TEA-1", "quantity": 1, "price_set": money}]
            }
        }),
        source: "aws.partner/shopify.com/1/roles".into(),
        detail_type: "shopifyWebhook".into(),
        ..orderfleet_testkit::examples::envelope("OrderPlaced", &json!({}))
    };
    fleet
        .deliver_to(HandlerName::Storefront, &shopify, 1)
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(status(&owner, "shopify-4242").await, "completed");
    assert_eq!(
        support::scalar(
            &owner,
            "SELECT count(*) FROM platform_calls WHERE order_id = 'shopify-4242' AND state = 'done'"
        )
        .await,
        1
    );

    assert_no_dead_letters(&fleet);
    assert_eq!(status(&owner, "ord-r1").await, "completed");
    assert_eq!(status(&owner, "ord-r2").await, "returned");
    assert_eq!(status(&owner, "ord-r3").await, "cancelled");
    assert_ledger_balances(&owner).await;
    let archived = support::scalar(&owner, "SELECT count(*) FROM lake_outbox").await;
    assert!(archived > 0, "analytics archived nothing");
    let emails = support::scalar(&owner, "SELECT count(*) FROM emails").await;
    assert!(emails > 0, "notifications sent nothing");

    // `orderfleet report` needs nothing the read-only operator role lacks.
    let operator = pool_as(&url, 1, "orderfleet_operator").unwrap();
    let mut db = operator.get().await.unwrap();
    let report = orderfleet::operator::report::build(&mut db).await.unwrap();
    assert!(report.holds(), "{report:?}");
}

#[tokio::test]
async fn a_worker_process_runs_on_a_login_that_is_only_a_member_of_its_role() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, url) = support::fresh_db().await;
    let login = support::unique("inventory_login_");
    let c = pool.get().await.unwrap();
    c.batch_execute(&format!(
        "CREATE ROLE {login} LOGIN IN ROLE orderfleet_inventory"
    ))
    .await
    .unwrap();
    // postgres://<owner>@host:port/db -> postgres://<login>@host:port/db
    let login_url = with_user(&url, &login);

    let mut worker = support::Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
            .args(["--handler", "inventory", "--prefix", &topo.prefix])
            .args(["--database-url", &login_url, "--wait-time-secs", "1"])
            .args(["--heartbeat-secs", "1", "--inbox-prune-interval-secs", "1"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn orderfleet-worker"),
    );
    let queue =
        orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.queue_name(HandlerName::Inventory))
            .await
            .unwrap();
    support::send_bodies(&clients, &queue, &[support::stock_received("ROLE-1", 5)]).await;
    support::wait_for(
        std::time::Duration::from_secs(30),
        "the stock received by the worker",
        || async {
            let n = support::scalar(
                &pool,
                "SELECT coalesce(sum(on_hand), 0)::bigint FROM stock WHERE sku = 'ROLE-1'",
            )
            .await;
            (n == 5).then_some(())
        },
    )
    .await;
    let beats = support::scalar(&pool, "SELECT count(*) FROM worker_heartbeats").await;
    assert!(beats >= 1, "the worker's heartbeat was refused");
    support::signal(&worker, "-TERM");
    let status = support::wait_exit(&mut worker, std::time::Duration::from_secs(30)).await;
    let mut stderr = String::new();
    use std::io::Read;
    if let Some(mut e) = worker.0.stderr.take() {
        e.read_to_string(&mut stderr).ok();
    }
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        !stderr.contains("permission denied"),
        "the worker was refused something it needs: {stderr}"
    );
    c.batch_execute(&format!("DROP ROLE {login}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn migrate_lets_a_worker_s_role_log_in_and_that_login_has_only_the_role_s_grants() {
    let (pool, url) = support::fresh_db().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(["migrate", "--login-for", "analytics"])
        .env("DATABASE_URL", &url)
        .env("ORDERFLEET_DB_LOGIN_PASSWORD", "it's-a-generated-secret")
        .output()
        .expect("run orderfleet migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("orderfleet_analytics may log in"));
    let login = orderfleet::store::db::pool(
        &with_user(&url, "orderfleet_analytics:it%27s-a-generated-secret"),
        1,
    )
    .unwrap();
    let c = login.get().await.expect("the role logs in");
    let me: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(me, "orderfleet_analytics");
    let refused = c
        .batch_execute("UPDATE payments SET state = state")
        .await
        .unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("42501"));
    drop(pool);
}
