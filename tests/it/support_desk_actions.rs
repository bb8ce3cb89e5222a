//! The support desk's actions (issue 15, part 2): `orderfleet order refund`, `order cancel`
//! and `order list`, through the real CLI on an operator login, applied by the real handlers
//! of the in-process fleet; and `order show` finding an order by its number and the DLQ
//! messages that mention it.

use std::process::Output;

use deadpool_postgres::Pool;
use orderfleet::domain::catalogue::{self, OPERATOR_SOURCE};
use orderfleet::domain::names::HandlerName;
use orderfleet::store::outbox::Relay;
use orderfleet_testkit::inproc::Fleet;
use serde_json::Value;

use crate::support;
use crate::support::saga::*;

/// A fresh database, its fleet, and the URL of a login that is only a member of the operator
/// role (as a support desk's would be).
async fn desk() -> (Pool, Fleet, String) {
    let (pool, url) = support::fresh_db().await;
    let login = support::unique("desk_");
    pool.get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE ROLE {login} LOGIN IN ROLE orderfleet_operator"
        ))
        .await
        .unwrap();
    let (scheme, rest) = url.split_once("://").unwrap();
    let (_, host_and_db) = rest.split_once('@').unwrap();
    let operator_url = format!("{scheme}://{login}@{host_and_db}");
    let fleet = sandbox_fleet(pool.clone(), &url);
    stock_sku(&fleet, "TEA-1", 1250, 50).await;
    (pool, fleet, operator_url)
}

/// Runs `orderfleet ARGS` as operator `alice` on `url`.
fn cli(url: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("ORDERFLEET_OPERATOR", "alice")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A completed order of two TEA-1 (25.00 EUR captured).
async fn completed(fleet: &Fleet, pool: &Pool, id: &str) {
    fleet
        .publish_event(&order(id, &[("TEA-1", 2, 1250)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(status(pool, id).await, "completed");
}

/// The audited actions of `order_id`: (action, amount, operator, reason, outcome, detail).
async fn actions(
    pool: &Pool,
    order_id: &str,
) -> Vec<(String, Option<i64>, String, String, String, Option<String>)> {
    pool.get()
        .await
        .unwrap()
        .query(
            "SELECT action, amount_minor, operator, reason, outcome, outcome_detail
               FROM operator_actions WHERE order_id = $1 ORDER BY id",
            &[&order_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

async fn operator_events(pool: &Pool) -> i64 {
    support::scalar(
        pool,
        "SELECT count(*) FROM outbox WHERE source = 'orderfleet.operator'",
    )
    .await
}

#[tokio::test]
async fn a_partial_then_a_full_refund_give_the_capture_back_and_keep_the_ledger_balanced() {
    let (pool, fleet, url) = desk().await;
    // With the storefront handler and a sandbox Shopify: the order came from a platform, and
    // each refund is written back to it.
    let shopify = orderfleet::providers::platform::Sandbox::new(
        orderfleet::domain::platform::Platform::Shopify,
        pool.clone(),
    );
    let fleet = fleet.with_handler(
        HandlerName::Storefront,
        std::sync::Arc::new(orderfleet::handlers::storefront::Storefront::new(
            vec![std::sync::Arc::new(shopify)],
            eur(0).currency,
            pool.clone(),
            std::time::Duration::from_secs(5),
        )),
    );
    pool.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO platform_orders (order_id, platform, platform_order_id, shop, order_number)
             VALUES ('ord-r1', 'shopify', 'gid://shopify/Order/1', 'desk.myshopify.com', '#1001')",
            &[],
        )
        .await
        .unwrap();
    completed(&fleet, &pool, "ord-r1").await;

    let first = cli(
        &url,
        &[
            "order",
            "refund",
            "ord-r1",
            "--amount",
            "10.00",
            "--reason",
            "damaged lid",
        ],
    );
    assert!(first.status.success(), "{}", out(&first));
    assert!(out(&first).contains("requested (action"), "{}", out(&first));
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(
        payment(&pool, "ord-r1").await,
        ("captured".into(), 2500, 1000)
    );
    // The order goes on: a goodwill refund does not reopen or cancel it.
    assert_eq!(status(&pool, "ord-r1").await, "completed");
    let refunded = emitted(&pool, "PaymentRefunded", Some("ord-r1")).await;
    assert_eq!(refunded.len(), 1);
    assert_eq!(refunded[0]["version"], 2);
    assert_eq!(refunded[0]["amount"]["amount_minor"], 1000);
    assert_eq!(refunded[0]["remaining"]["amount_minor"], 1500);
    assert!(refunded[0]["action_id"].is_i64());

    // Without --amount: everything that is left.
    let rest = cli(
        &url,
        &["order", "refund", "ord-r1", "--reason", "customer unhappy"],
    );
    assert!(rest.status.success(), "{}", out(&rest));
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(
        payment(&pool, "ord-r1").await,
        ("refunded".into(), 2500, 2500)
    );
    assert_eq!(net_money(&pool, "ord-r1").await, 0);
    assert_ledger_balances(&pool).await;
    let l = ledger(&pool).await;
    assert_eq!(l.get("refunds:EUR"), Some(&2500), "{l:?}");
    // Both refunds reached the platform, each once.
    let written_back = support::scalar(
        &pool,
        "SELECT count(*) FROM sandbox_platform_calls WHERE operation = 'refund' AND calls = 1",
    )
    .await;
    assert_eq!(written_back, 2);

    // Nothing left: refused at the CLI, nothing published.
    let again = cli(&url, &["order", "refund", "ord-r1", "--reason", "again"]);
    assert_eq!(again.status.code(), Some(1), "{}", out(&again));
    assert!(
        out(&again).contains("nothing left to refund"),
        "{}",
        out(&again)
    );

    // Both actions are audited with who, why and what came of it.
    let audit = actions(&pool, "ord-r1").await;
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(
        (
            audit[0].0.as_str(),
            audit[0].1,
            audit[0].2.as_str(),
            audit[0].3.as_str()
        ),
        ("refund", Some(1000), "alice", "damaged lid")
    );
    assert_eq!(audit[0].4, "applied");
    assert_eq!((audit[1].1, audit[1].4.as_str()), (Some(1500), "applied"));

    // order show lists them, with the refunds in the ledger and the timeline.
    let shown = cli(&url, &["order", "show", "ord-r1", "--no-dlq"]);
    let text = out(&shown);
    assert!(shown.status.success(), "{text}");
    for part in [
        "SUPPORT DESK",
        "refund EUR 10.00 by alice",
        "damaged lid",
        "-> applied",
    ] {
        assert!(text.contains(part), "{part} missing from {text}");
    }
    assert!(
        text.contains("RefundRequested (from operator) applied by payments"),
        "{text}"
    );
    assert_eq!(text.matches("ledger: refund").count(), 2, "{text}");
}

#[tokio::test]
async fn a_refund_over_what_is_left_is_refused_at_the_cli_and_nothing_is_published() {
    let (pool, fleet, url) = desk().await;
    completed(&fleet, &pool, "ord-r2").await;
    let over = cli(
        &url,
        &[
            "order", "refund", "ord-r2", "--amount", "25.01", "--reason", "too much",
        ],
    );
    assert_eq!(over.status.code(), Some(1), "{}", out(&over));
    let text = out(&over);
    assert!(text.contains("at most EUR 25.00 can be refunded"), "{text}");
    assert_eq!(operator_events(&pool).await, 0);
    assert!(actions(&pool, "ord-r2").await.is_empty());

    let bad = cli(
        &url,
        &[
            "order", "refund", "ord-r2", "--amount", "ten", "--reason", "x",
        ],
    );
    assert_eq!(bad.status.code(), Some(1), "{}", out(&bad));
    assert!(out(&bad).contains("--amount ten"), "{}", out(&bad));
    let unknown = cli(&url, &["order", "refund", "ord-nope", "--reason", "x"]);
    assert_eq!(unknown.status.code(), Some(1), "{}", out(&unknown));
    assert_eq!(operator_events(&pool).await, 0);
}

#[tokio::test]
async fn two_refunds_that_together_exceed_the_capture_only_one_applies() {
    let (pool, fleet, url) = desk().await;
    completed(&fleet, &pool, "ord-r3").await;
    // Two operators who checked at the same moment: both requests pass the CLI's check, and
    // both reach payments. They are written as the CLI writes them, on the operator's login.
    let desk = orderfleet::store::db::pool(&url, 2).unwrap();
    for who in ["alice", "bob"] {
        let c = desk.get().await.unwrap();
        orderfleet::store::operator_actions::request(
            &c,
            "ord-r3",
            orderfleet::store::operator_actions::Action::Refund { amount_minor: 1500 },
            "refund most of it",
            who,
        )
        .await
        .unwrap();
    }
    fleet.run_until_quiet_concurrently(4, 4).await.unwrap();

    assert_eq!(
        payment(&pool, "ord-r3").await,
        ("captured".into(), 2500, 1500)
    );
    let audit = actions(&pool, "ord-r3").await;
    let outcomes: Vec<&str> = audit.iter().map(|a| a.4.as_str()).collect();
    assert!(
        outcomes == ["applied", "refused"] || outcomes == ["refused", "applied"],
        "{audit:?}"
    );
    let refused = audit.iter().find(|a| a.4 == "refused").unwrap();
    let why = refused.5.as_deref().unwrap();
    assert!(why.contains("at most EUR 10.00 can be refunded"), "{why}");
    assert_eq!(
        emitted(&pool, "PaymentRefunded", Some("ord-r3"))
            .await
            .len(),
        1
    );
    assert_eq!(net_money(&pool, "ord-r3").await, 1000);
    assert_ledger_balances(&pool).await;
}

#[tokio::test]
async fn an_order_not_shipped_yet_is_cancelled_and_one_that_shipped_is_refused() {
    let (pool, fleet, url) = desk().await;
    fleet
        .publish_event(&order("ord-c1", &[("TEA-1", 1, 1250)], "tok_visa"))
        .await
        .unwrap();
    fleet.step().await.unwrap(); // OrderPlaced: accepted, nothing reserved or authorized yet
    assert_eq!(status(&pool, "ord-c1").await, "accepted");

    let dry = cli(
        &url,
        &[
            "order",
            "cancel",
            "ord-c1",
            "--reason",
            "duplicate",
            "--dry-run",
        ],
    );
    assert!(dry.status.success(), "{}", out(&dry));
    assert!(
        out(&dry).contains("dry run: order ord-c1 is accepted"),
        "{}",
        out(&dry)
    );
    assert_eq!(operator_events(&pool).await, 0);

    let c = cli(
        &url,
        &["order", "cancel", "ord-c1", "--reason", "duplicate order"],
    );
    assert!(c.status.success(), "{}", out(&c));
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(status(&pool, "ord-c1").await, "cancelled");
    assert_eq!(payment(&pool, "ord-c1").await.0, "voided");
    let audit = actions(&pool, "ord-c1").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (
            audit[0].0.as_str(),
            audit[0].2.as_str(),
            audit[0].3.as_str(),
            audit[0].4.as_str()
        ),
        ("cancel", "alice", "duplicate order", "applied")
    );

    // Shipped (here: delivered): the CLI refuses, and so does orders if asked anyway.
    completed(&fleet, &pool, "ord-c2").await;
    let late = cli(&url, &["order", "cancel", "ord-c2", "--reason", "too late"]);
    assert_eq!(late.status.code(), Some(1), "{}", out(&late));
    assert!(out(&late).contains("refund it instead"), "{}", out(&late));
    let desk = orderfleet::store::db::pool(&url, 1).unwrap();
    orderfleet::store::operator_actions::request(
        &desk.get().await.unwrap(),
        "ord-c2",
        orderfleet::store::operator_actions::Action::Cancel,
        "asked anyway",
        "bob",
    )
    .await
    .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(status(&pool, "ord-c2").await, "completed");
    let audit = actions(&pool, "ord-c2").await;
    assert_eq!(audit[0].4, "refused", "{audit:?}");
    assert!(audit[0].5.as_deref().unwrap().contains("has shipped"));
    assert_ledger_balances(&pool).await;
}

#[tokio::test]
async fn a_dry_run_shows_the_refund_and_publishes_and_records_nothing() {
    let (pool, fleet, url) = desk().await;
    completed(&fleet, &pool, "ord-d1").await;
    let dry = cli(
        &url,
        &[
            "order",
            "refund",
            "ord-d1",
            "--amount",
            "5",
            "--reason",
            "late",
            "--dry-run",
            "--json",
        ],
    );
    assert!(dry.status.success(), "{}", out(&dry));
    let v: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["plan"]["amount"]["amount_minor"], 500);
    assert_eq!(v["operator"], "alice");
    assert_eq!(operator_events(&pool).await, 0);
    assert!(actions(&pool, "ord-d1").await.is_empty());
    assert_eq!(payment(&pool, "ord-d1").await.2, 0);
}

#[tokio::test]
async fn order_show_finds_an_order_by_its_platform_number_with_its_charges() {
    let (pool, fleet, url) = desk().await;
    let mut o = order("ord-n1", &[("TEA-1", 1, 1250)], "tok_visa");
    o.order_number = Some("#1042".into());
    fleet.publish_event(&o).await.unwrap();
    fleet.run_until_quiet().await.unwrap();
    for key in ["#1042", "1042"] {
        let shown = cli(&url, &["order", "show", key, "--no-dlq", "--json"]);
        assert!(shown.status.success(), "{}", out(&shown));
        let v: Value = serde_json::from_slice(&shown.stdout).unwrap();
        assert_eq!(v["id"], "ord-n1");
        assert_eq!(v["order_number"], "#1042");
        assert_eq!(v["discount_minor"], 0);
        // What arrived where, from the inbox: orders applied the placement.
        let events = v["events"].as_array().unwrap();
        assert!(
            events.iter().any(|e| e["detail_type"] == "OrderPlaced"
                && e["applied_by"]
                    .as_array()
                    .unwrap()
                    .contains(&"orders".into())),
            "{events:?}"
        );
    }
    let _ = pool;
    assert_eq!(
        cli(&url, &["order", "show", "#9999", "--no-dlq"])
            .status
            .code(),
        Some(1)
    );
}

#[tokio::test]
async fn order_show_lists_a_dlq_message_that_mentions_the_order_and_leaves_it_there() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, fleet, url) = desk().await;
    completed(&fleet, &pool, "ord-q1").await;
    let dlq = clients
        .sqs
        .get_queue_url()
        .queue_name(topo.dlq_name(HandlerName::Payments))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let body = support::event_body(
        "OrderShipped",
        "orderfleet.fulfillment",
        serde_json::json!({"order_id": "ord-q1", "carrier": "x"}),
    );
    let other = support::event_body(
        "OrderShipped",
        "orderfleet.fulfillment",
        serde_json::json!({"order_id": "ord-q10"}),
    );
    support::send_bodies(&clients, &dlq, &[body, other]).await;

    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_orderfleet"))
        .args([
            "order",
            "show",
            "ord-q1",
            "--prefix",
            &topo.prefix,
            "--json",
        ])
        .args(["--visibility-timeout-secs", "5"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(shown.status.success(), "{}", out(&shown));
    let v: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let found = v["dead_letters"].as_array().expect("the DLQs were read");
    assert_eq!(found.len(), 1, "only the message about ord-q1: {found:?}");
    assert_eq!(found[0]["handler"], "payments");
    assert_eq!(found[0]["detail_type"], "OrderShipped");
    // Both messages are still in the DLQ, visible again.
    support::wait_for(
        std::time::Duration::from_secs(10),
        "the peeked messages to be visible again",
        || async {
            let (visible, in_flight) = support::depth(&clients, &dlq).await;
            (visible == 2 && in_flight == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn order_list_finds_a_stuck_order_and_a_declined_capture() {
    let (pool, fleet, url) = desk().await;
    completed(&fleet, &pool, "ord-l1").await;
    fleet
        .publish_event(&order(
            "ord-l2",
            &[("TEA-1", 1, 1250)],
            "tok_capture_decline",
        ))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(order_row(&pool, "ord-l2").await.payment, "capture_failed");
    fleet
        .publish_event(&order("ord-l3", &[("TEA-1", 1, 1250)], "tok_visa"))
        .await
        .unwrap();
    fleet.step().await.unwrap(); // accepted, and then nothing more happens to it
    pool.get()
        .await
        .unwrap()
        .execute(
            "UPDATE orders SET updated_at = now() - interval '2 hours' WHERE id = 'ord-l3'",
            &[],
        )
        .await
        .unwrap();

    let ids = |o: &Output| -> Vec<String> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let stuck = cli(&url, &["order", "list", "--stuck-minutes", "60", "--json"]);
    assert!(stuck.status.success(), "{}", out(&stuck));
    assert_eq!(ids(&stuck), ["ord-l3"]);
    let declined = cli(
        &url,
        &[
            "order",
            "list",
            "--payment-state",
            "capture_failed",
            "--json",
        ],
    );
    assert_eq!(ids(&declined), ["ord-l2"]);
    let all = cli(
        &url,
        &[
            "order",
            "list",
            "--since",
            "1h",
            "--status",
            "completed,accepted",
        ],
    );
    let text = out(&all);
    assert!(
        text.contains("ord-l1") && text.contains("ord-l3") && !text.contains("ord-l2"),
        "{text}"
    );

    // The report points at the same lists.
    let report = cli(&url, &["report"]);
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(
        text.contains("orderfleet order list --payment-state capture_failed"),
        "{text}"
    );
    assert!(
        text.contains("orderfleet order list --stuck-minutes 60"),
        "{text}"
    );
}

#[tokio::test]
async fn the_orders_worker_relay_publishes_the_desk_s_events_to_payments() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    let (pool, fleet, url) = desk().await;
    completed(&fleet, &pool, "ord-p1").await;
    let c = cli(
        &url,
        &[
            "order", "refund", "ord-p1", "--amount", "1.00", "--reason", "x",
        ],
    );
    assert!(c.status.success(), "{}", out(&c));

    // Only the orders worker takes them; another worker's relay leaves them alone.
    let relay = |h: HandlerName| {
        Relay::new(
            pool.clone(),
            clients.events.clone(),
            topo.bus_name.clone(),
            catalogue::relayed_sources(h),
        )
    };
    assert_eq!(
        relay(HandlerName::Payments)
            .publish_once()
            .await
            .unwrap()
            .published,
        0
    );
    assert!(catalogue::relayed_sources(HandlerName::Orders).contains(&OPERATOR_SOURCE.to_string()));
    assert_eq!(
        relay(HandlerName::Orders)
            .publish_once()
            .await
            .unwrap()
            .published,
        1
    );
    assert_eq!(operator_events(&pool).await, 0);

    // The rule routes it to the payments queue.
    let queue = clients
        .sqs
        .get_queue_url()
        .queue_name(topo.queue_name(HandlerName::Payments))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let body = support::wait_for(
        std::time::Duration::from_secs(10),
        "RefundRequested",
        || {
            let (sqs, queue) = (clients.sqs.clone(), queue.clone());
            async move {
                let got = sqs
                    .receive_message()
                    .queue_url(&queue)
                    .wait_time_seconds(1)
                    .send()
                    .await
                    .ok()?;
                got.messages()
                    .iter()
                    .filter_map(|m| m.body())
                    .find(|b| b.contains("RefundRequested"))
                    .map(str::to_string)
            }
        },
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["source"], OPERATOR_SOURCE);
    assert_eq!(v["detail"]["order_id"], "ord-p1");
    assert_eq!(v["detail"]["operator"], "alice");
    assert_eq!(v["detail"]["amount"]["amount_minor"], 100);
}

#[tokio::test]
async fn a_cancellation_of_an_order_ready_to_ship_waits_for_the_parcel_to_be_stopped() {
    let (pool, fleet, url) = desk().await;
    fleet
        .publish_event(&order("ord-c3", &[("TEA-1", 1, 1250)], "tok_visa"))
        .await
        .unwrap();
    // Fulfillment has not seen OrderReadyToShip yet: the parcel can still be stopped.
    let held = fleet.deliver_until("OrderReadyToShip").await.unwrap();
    assert_eq!(status(&pool, "ord-c3").await, "ready_to_ship");
    let c = cli(
        &url,
        &["order", "cancel", "ord-c3", "--reason", "wrong size"],
    );
    assert!(c.status.success(), "{}", out(&c));
    assert!(out(&c).contains("stop the parcel"), "{}", out(&c));
    // Orders asks fulfillment to stop it: pending until fulfillment answers.
    let stop = fleet
        .deliver_until("ShipmentCancelRequested")
        .await
        .unwrap();
    assert_eq!(actions(&pool, "ord-c3").await[0].4, "pending");
    fleet.deliver(&stop).await;
    fleet.run_until_quiet().await.unwrap();
    fleet.deliver(&held).await;
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(status(&pool, "ord-c3").await, "cancelled");
    let audit = actions(&pool, "ord-c3").await;
    assert_eq!(audit[0].4, "applied", "{audit:?}");
    assert!(audit[0]
        .5
        .as_deref()
        .unwrap()
        .contains("parcel was stopped"));
}

#[tokio::test]
async fn a_returned_parcel_refunds_only_what_operators_left_and_the_order_still_settles() {
    let (pool, fleet, url) = desk().await;
    // ord-t1: 5.00 refunded by an operator, then the parcel comes back; ord-t2: everything
    // refunded by an operator first.
    for (id, amount) in [("ord-t1", Some("5.00")), ("ord-t2", None)] {
        let mut o = order(id, &[("TEA-1", 2, 1250)], "tok_visa");
        o.shipping_address.postal_code =
            orderfleet::providers::carrier::UNDELIVERABLE_POSTAL_CODE.into();
        fleet.publish_event(&o).await.unwrap();
        let returned = fleet.deliver_until("DeliveryFailed").await.unwrap();
        fleet.run_until_quiet().await.unwrap();
        assert_eq!(payment(&pool, id).await.0, "captured");
        let mut args = vec!["order", "refund", id, "--reason", "goodwill"];
        if let Some(a) = amount {
            args.extend(["--amount", a]);
        }
        let r = cli(&url, &args);
        assert!(r.status.success(), "{}", out(&r));
        fleet.run_until_quiet().await.unwrap();
        fleet.deliver(&returned).await;
        fleet.run_until_quiet().await.unwrap();
        assert_eq!(status(&pool, id).await, "returned", "{id}");
        assert_eq!(
            payment(&pool, id).await,
            ("refunded".into(), 2500, 2500),
            "{id}"
        );
        assert_eq!(net_money(&pool, id).await, 0, "{id}");
    }
    let amounts = |id: &'static str| {
        let pool = pool.clone();
        async move {
            emitted(&pool, "PaymentRefunded", Some(id))
                .await
                .iter()
                .map(|d| d["amount"]["amount_minor"].as_i64().unwrap())
                .collect::<Vec<_>>()
        }
    };
    // The return refunds the 20.00 left; after a full operator refund, a refund of nothing
    // settles the order.
    assert_eq!(amounts("ord-t1").await, [500, 2000]);
    assert_eq!(amounts("ord-t2").await, [2500, 0]);
    assert_ledger_balances(&pool).await;
}

#[tokio::test]
async fn the_desk_writes_its_actions_only_through_operator_request_and_the_handlers_only_their_outcome(
) {
    let (pool, fleet, url) = desk().await;
    completed(&fleet, &pool, "ord-g1").await;
    let desk = orderfleet::store::db::pool(&url, 1).unwrap();
    let c = desk.get().await.unwrap();
    let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_string());
    for statement in [
        "INSERT INTO outbox (event_id, source, detail_type, detail)
         VALUES (gen_random_uuid(), 'orderfleet.operator', 'RefundRequested', '{}')",
        "INSERT INTO operator_actions (order_id, action, reason, operator, event_id)
         VALUES ('ord-g1', 'cancel', 'x', 'y', gen_random_uuid())",
        "UPDATE operator_actions SET outcome = 'applied'",
    ] {
        let refused = c.batch_execute(statement).await.unwrap_err();
        assert_eq!(code(refused).as_deref(), Some("42501"), "{statement}");
    }
    // What the function refuses, it refuses with a reason and writes nothing.
    for (order, action, amount, reason) in [
        ("ord-nope", "cancel", None, "x"),
        ("ord-g1", "cancel", Some(100i64), "x"),
        ("ord-g1", "refund", None, "x"),
        ("ord-g1", "refund", Some(-5), "x"),
        ("ord-g1", "publish", None, "x"),
        ("ord-g1", "cancel", None, "  "),
    ] {
        let err = c
            .query_one(
                "SELECT operator_request($1, $2, $3, $4, 'alice')",
                &[&order, &action, &amount, &reason],
            )
            .await
            .unwrap_err();
        // no_data_found for a missing order; check_violation for the rest.
        let want = if order == "ord-nope" {
            "P0002"
        } else {
            "23514"
        };
        assert_eq!(
            code(err).as_deref(),
            Some(want),
            "{order} {action} {amount:?} {reason:?}"
        );
    }
    assert!(actions(&pool, "ord-g1").await.is_empty());
    assert_eq!(operator_events(&pool).await, 0);

    // The login is recorded beside the name the operator gave.
    let id = orderfleet::store::operator_actions::request(
        &c,
        "ord-g1",
        orderfleet::store::operator_actions::Action::Cancel,
        "audit",
        "alice",
    )
    .await
    .unwrap();
    let login: String = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT db_user FROM operator_actions WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(login.starts_with("desk_"), "{login}");

    // Payments may record an outcome, not rewrite what was asked.
    let mut admin = pool.get().await.unwrap();
    let tx = admin.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL ROLE orderfleet_payments")
        .await
        .unwrap();
    let rewrite = tx
        .batch_execute("UPDATE operator_actions SET reason = 'rewritten'")
        .await
        .unwrap_err();
    assert_eq!(code(rewrite).as_deref(), Some("42501"));
    tx.rollback().await.unwrap();
}

/// Asks, as the CLI does on the operator's login, for a refund of `amount_minor` of `order_id`,
/// and returns the event that carries it (taken from the outbox, not yet delivered).
async fn refund_event(
    fleet: &Fleet,
    url: &str,
    order_id: &str,
    amount_minor: i64,
) -> orderfleet::domain::envelope::Envelope {
    let desk = orderfleet::store::db::pool(url, 1).unwrap();
    let c = desk.get().await.unwrap();
    orderfleet::store::operator_actions::request(
        &c,
        order_id,
        orderfleet::store::operator_actions::Action::Refund { amount_minor },
        "goodwill",
        "alice",
    )
    .await
    .unwrap();
    let event = fleet.take(1).await.unwrap().remove(0);
    assert_eq!(event.detail_type, "RefundRequested");
    event
}

/// Payments that records its provider attempts and rolls back after handling: the provider
/// approved, our side forgot (a crash right after the call).
fn crashing_payments(pool: &Pool, url: &str) -> crate::saga_payments::CrashBeforeCommit {
    use orderfleet::providers::payment::{PaymentProvider, SandboxProvider};
    let provider: std::sync::Arc<dyn PaymentProvider> = std::sync::Arc::new(SandboxProvider::new(
        orderfleet::store::db::pool(url, 2).unwrap(),
        std::time::Duration::ZERO,
    ));
    crate::saga_payments::CrashBeforeCommit(
        orderfleet::handlers::payments::Payments::with_attempt_log(provider, pool.clone()),
    )
}

/// An operator refund the provider approved but whose transaction rolled back: the money may
/// have gone, so it is neither refunded again by a later refund nor judged again when it is
/// delivered again, but replayed with its key and booked once.
#[tokio::test]
async fn an_operator_refund_whose_transaction_rolled_back_is_booked_once_not_paid_twice() {
    let (pool, url) = support::fresh_db().await;
    let fleet = sandbox_fleet(pool.clone(), &url);
    stock_sku(&fleet, "TEA-1", 1250, 50).await;
    let crashing = crashing_payments(&pool, &url);

    // Another operator's refund of everything comes while 10.00 is under way: refused.
    completed(&fleet, &pool, "ord-rb1").await;
    let first = refund_event(&fleet, &url, "ord-rb1", 1000).await;
    let err = orderfleet::runtime::execute(&crashing, &pool, &first, 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "retry");
    assert_eq!(
        payment(&pool, "ord-rb1").await,
        ("captured".into(), 2500, 0)
    );
    let all = refund_event(&fleet, &url, "ord-rb1", 2500).await;
    fleet.deliver(&all).await;
    let audit = actions(&pool, "ord-rb1").await;
    assert_eq!(audit[1].4, "refused", "{audit:?}");
    assert!(
        audit[1]
            .5
            .as_deref()
            .unwrap()
            .contains("EUR 10.00 under way"),
        "{audit:?}"
    );
    // The first, delivered again, is replayed and booked.
    fleet.deliver(&first).await;
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(
        payment(&pool, "ord-rb1").await,
        ("captured".into(), 2500, 1000)
    );
    assert_eq!(actions(&pool, "ord-rb1").await[0].4, "applied");
    let key = format!("refund:ord-rb1:{}", first.detail["action_id"]);
    let (attempts, _) = provider_call(&pool, &key).await.unwrap();
    assert_eq!(attempts, 2, "asked twice under one key, decided once");
    assert_eq!(net_money(&pool, "ord-rb1").await, 1500);

    // A returned parcel's compensation comes first: it replays the lost 5.00, then gives
    // back only the 20.00 left; the operator's event, delivered again, changes nothing.
    let mut o = order("ord-rb2", &[("TEA-1", 2, 1250)], "tok_visa");
    o.shipping_address.postal_code =
        orderfleet::providers::carrier::UNDELIVERABLE_POSTAL_CODE.into();
    fleet.publish_event(&o).await.unwrap();
    let returned = fleet.deliver_until("DeliveryFailed").await.unwrap();
    fleet.run_until_quiet().await.unwrap();
    let lost = refund_event(&fleet, &url, "ord-rb2", 500).await;
    let err = orderfleet::runtime::execute(&crashing, &pool, &lost, 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "retry");
    fleet.deliver(&returned).await;
    fleet.run_until_quiet().await.unwrap();
    fleet.deliver(&lost).await;
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(status(&pool, "ord-rb2").await, "returned");
    assert_eq!(
        payment(&pool, "ord-rb2").await,
        ("refunded".into(), 2500, 2500)
    );
    let amounts: Vec<i64> = emitted(&pool, "PaymentRefunded", Some("ord-rb2"))
        .await
        .iter()
        .map(|d| d["amount"]["amount_minor"].as_i64().unwrap())
        .collect();
    assert_eq!(amounts, [500, 2000]);
    assert_eq!(net_money(&pool, "ord-rb2").await, 0);
    assert_ledger_balances(&pool).await;
}
