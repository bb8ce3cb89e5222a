//! Email deliverability (issue 15, section 3): SES's bounces and complaints, put on the
//! account's default bus as SES's configuration set would, reach the notifications queue
//! through the rule `provision` made and feed the suppression list; the next email to a
//! suppressed address is skipped with its reason; `orderfleet email suppressions list/remove`
//! work through the real binary under the operator role; the recommendations email is
//! marketing (List-Unsubscribe, a signed token, opt-outs honoured) while transactional email
//! still goes out.
//!
//! The emulator lets a test put events with source `aws.ses` (AWS reserves `aws.*` sources for
//! its services), which stands in for SES's event destination.

use std::process::Command;
use std::time::Duration;

use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use serde_json::{json, Value};

use crate::support;
use crate::support::notifications::*;
use crate::support::saga::{assert_no_dead_letters, order, stock_sku};
use orderfleet::domain::deliverability::{token_of_link, AddressHasher, UnsubscribeSigner};
use orderfleet::domain::events::{MarketingOptOut, Meta, OptOutChannel, OptOutSubject};
use orderfleet::domain::names::HandlerName;
use orderfleet::infra::aws::Clients;
use orderfleet::infra::topology::Topology;
use orderfleet::providers::email::{EmailArgs, Secret};
use orderfleet::worker::deps::{self, Deps, DepsArgs};

const HASH_KEY: &str = "test-email-hash-key-0123456789abcdef";
const UNSUBSCRIBE_KEY: &str = "test-unsubscribe-key-0123456789abcdef";
const UNSUBSCRIBE_URL: &str = "https://shop.example/unsubscribe";

/// An SES event record as SES's EventBridge event destination publishes it (`detail`).
fn ses_detail(configuration_set: &str, event_type: &str, address: &str, extra: Value) -> Value {
    let mut detail = json!({
        "eventType": event_type,
        "mail": {
            "timestamp": chrono::Utc::now().to_rfc3339(),
            "source": "orders@example.com",
            "messageId": support::unique("ses-msg-"),
            "destination": [address],
            "tags": {"ses:configuration-set": [configuration_set]}
        }
    });
    if let (Some(d), Some(e)) = (detail.as_object_mut(), extra.as_object()) {
        d.extend(e.clone());
    }
    detail
}

fn bounce(set: &str, address: &str, bounce_type: &str) -> Value {
    ses_detail(
        set,
        "Bounce",
        address,
        json!({"bounce": {
            "bounceType": bounce_type, "bounceSubType": "General",
            "feedbackId": support::unique("fb-"),
            "bouncedRecipients": [{"emailAddress": address, "action": "failed", "status": "5.1.1"}]
        }}),
    )
}

fn complaint(set: &str, address: &str) -> Value {
    ses_detail(
        set,
        "Complaint",
        address,
        json!({"complaint": {
            "complainedRecipients": [{"emailAddress": address}],
            "complaintFeedbackType": "abuse", "feedbackId": support::unique("fb-")
        }}),
    )
}

/// Puts an SES event on the account's default bus.
async fn put_ses(clients: &Clients, detail_type: &str, detail: &Value) {
    let out = clients
        .events
        .put_events()
        .entries(
            PutEventsRequestEntry::builder()
                .event_bus_name("default")
                .source("aws.ses")
                .detail_type(detail_type)
                .detail(detail.to_string())
                .build(),
        )
        .send()
        .await
        .expect("PutEvents");
    assert_eq!(out.failed_entry_count(), 0, "{out:?}");
}

async fn rows(pool: &deadpool_postgres::Pool, sql: &str) -> Vec<Vec<Option<String>>> {
    let c = pool.get().await.unwrap();
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
        .collect()
}

/// `url` with another user in it.
fn with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (_, host_and_db) = rest.split_once('@').unwrap();
    format!("{scheme}://{user}@{host_and_db}")
}

/// Runs the real `orderfleet` CLI; (exit code, stdout, stderr).
fn cli(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderfleet"));
    cmd.args(args).env_remove("ORDERFLEET_EMAIL_HASH_KEY");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run orderfleet");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn ses_bounces_and_complaints_on_the_default_bus_feed_the_suppression_list() {
    let clients = support::clients().await;
    let (pool, url) = support::fresh_db().await;
    let set = support::unique("cs-");
    let mut topo = Topology::with_prefix(support::unique("t"));
    topo.lake = false;
    topo.ses_configuration_set = Some(set.clone());
    orderfleet::infra::provision::provision(&clients, &topo)
        .await
        .expect("provision");
    // A second provision changes nothing: the rule on the default bus compares equal.
    let again = orderfleet::infra::provision::provision(&clients, &topo)
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");

    let cwd = TempDir::new("of-deliv-");
    let outbox = cwd.path().join("outbox");
    let log = std::fs::File::create(cwd.path().join("worker.log")).unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"));
    worker
        .current_dir(cwd.path())
        .args(["--handler", "notifications", "--prefix", &topo.prefix])
        .args(["--database-url", &url, "--wait-time-secs", "1"])
        .args(["--email-outbox-dir", &outbox.to_string_lossy()])
        .env("ORDERFLEET_EMAIL_HASH_KEY", HASH_KEY)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    for (name, _) in std::env::vars() {
        if name.starts_with("ORDERFLEET_EMAIL_") || name.starts_with("ORDERFLEET_UNSUBSCRIBE_") {
            worker.env_remove(name);
        }
    }
    worker.env("ORDERFLEET_EMAIL_HASH_KEY", HASH_KEY);
    let worker = support::Proc(worker.spawn().expect("spawn orderfleet-worker"));

    // Another configuration set's events (another sender in the account) do not reach us.
    put_ses(
        &clients,
        "Email Bounced",
        &bounce("someone-else", "zed@example.com", "Permanent"),
    )
    .await;
    put_ses(
        &clients,
        "Email Bounced",
        &bounce(&set, "ada@example.com", "Permanent"),
    )
    .await;
    put_ses(
        &clients,
        "Email Bounced",
        &bounce(&set, "bob@example.net", "Transient"),
    )
    .await;
    put_ses(
        &clients,
        "Email Complaint Received",
        &complaint(&set, "Cy@Example.org"),
    )
    .await;

    let hasher = AddressHasher::new(HASH_KEY.as_bytes()).unwrap();
    let suppressed = support::wait_for(Duration::from_secs(60), "two suppressions", || {
        let pool = pool.clone();
        async move {
            let r = rows(
                &pool,
                "SELECT address_hash, address_masked, reason, detail FROM email_suppressions
                  ORDER BY reason",
            )
            .await;
            (r.len() >= 2).then_some(r)
        }
    })
    .await;
    assert_eq!(
        suppressed,
        vec![
            vec![
                Some(hasher.hash("ada@example.com")),
                Some("a***@example.com".into()),
                Some("bounce".into()),
                Some("General".into())
            ],
            vec![
                Some(hasher.hash("cy@example.org")),
                Some("C***@Example.org".into()),
                Some("complaint".into()),
                Some("abuse".into())
            ],
        ]
    );
    // The transient bounce was counted, not suppressed.
    let counted = support::wait_for(Duration::from_secs(30), "the transient bounce", || {
        let pool = pool.clone();
        async move {
            let r = rows(
                &pool,
                "SELECT address_masked, bounces::text FROM email_transient_bounces",
            )
            .await;
            (!r.is_empty()).then_some(r)
        }
    })
    .await;
    assert_eq!(
        counted,
        vec![vec![Some("b***@example.net".into()), Some("1".into())]]
    );
    // No table holds an address in full.
    let full = support::scalar(
        &pool,
        "SELECT count(*) FROM email_suppressions s
          WHERE s::text ILIKE '%ada@%' OR s::text ILIKE '%cy@%'",
    )
    .await;
    assert_eq!(full, 0);

    // The next emails: to the bounced address skipped (a transactional one too), to the
    // softly bounced one sent.
    let queue = orderfleet::sqs::queue::queue_url(
        &clients.sqs,
        &topo.queue_name(HandlerName::Notifications),
    )
    .await
    .unwrap();
    let skipped_order = support::unique("ord-sup-");
    let sent_order = support::unique("ord-soft-");
    for (order_id, address) in [
        (&skipped_order, "ADA@example.com"),
        (&sent_order, "bob@example.net"),
    ] {
        let detail = serde_json::to_value(accepted(order_id, address)).unwrap();
        clients
            .sqs
            .send_message()
            .queue_url(&queue)
            .message_body(support::event_body(
                "OrderAccepted",
                "orderfleet.orders",
                detail,
            ))
            .send()
            .await
            .unwrap();
    }
    let emails = support::wait_for(Duration::from_secs(60), "both emails recorded", || {
        let pool = pool.clone();
        async move {
            let r = rows(
                &pool,
                "SELECT order_id, status, skip_reason FROM emails ORDER BY order_id",
            )
            .await;
            (r.len() == 2).then_some(r)
        }
    })
    .await;
    let status_of = |id: &str| {
        emails
            .iter()
            .find(|r| r[0].as_deref() == Some(id))
            .cloned()
            .unwrap()
    };
    assert_eq!(
        status_of(&skipped_order)[1..],
        [
            Some("skipped".into()),
            Some("address suppressed: bounce (General)".into())
        ]
    );
    assert_eq!(status_of(&sent_order)[1].as_deref(), Some("sent"));
    assert!(outbox
        .join(format!("{sent_order}.confirmation.eml"))
        .exists());
    assert!(!outbox
        .join(format!("{skipped_order}.confirmation.eml"))
        .exists());

    // `orderfleet email suppressions` through the real binary, as a login of the operator
    // role only.
    let login = support::unique("operator_login_");
    pool.get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE ROLE {login} LOGIN IN ROLE orderfleet_operator"
        ))
        .await
        .unwrap();
    let operator_url = with_user(&url, &login);
    let db = [("DATABASE_URL", operator_url.as_str())];
    let (code, out, err) = cli(&["email", "suppressions", "list", "--json"], &db);
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let masked: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address_masked"].as_str().unwrap())
        .collect();
    assert_eq!(masked.len(), 2, "{out}");
    assert!(masked.contains(&"a***@example.com") && masked.contains(&"C***@Example.org"));
    assert!(!out.contains("ada@example.com"), "{out}");
    let (code, out, _) = cli(&["email", "suppressions", "list"], &db);
    assert_eq!(code, 0);
    assert!(
        out.contains("a***@example.com") && out.contains("complaint"),
        "{out}"
    );

    // By address, the key is needed; with it the suppression goes.
    let (code, _, err) = cli(&["email", "suppressions", "remove", "ada@example.com"], &db);
    assert_ne!(code, 0);
    assert!(err.contains("ORDERFLEET_EMAIL_HASH_KEY"), "{err}");
    let keyed = [
        ("DATABASE_URL", operator_url.as_str()),
        ("ORDERFLEET_EMAIL_HASH_KEY", HASH_KEY),
    ];
    let (code, out, err) = cli(
        &["email", "suppressions", "remove", "Ada@Example.com"],
        &keyed,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed a***@example.com"), "{out}");
    let (code, _, err) = cli(
        &["email", "suppressions", "remove", "ada@example.com"],
        &keyed,
    );
    assert_eq!(code, 1, "a second removal finds nothing: {err}");
    // By the hash `list` shows, no key is needed.
    let cy = hasher.hash("cy@example.org");
    let (code, out, err) = cli(&["email", "suppressions", "remove", &cy], &db);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("C***@Example.org"), "{out}");
    assert_eq!(
        support::scalar(&pool, "SELECT count(*) FROM email_suppressions").await,
        0
    );

    // The other configuration set's bounce never arrived: zed was never suppressed, and
    // nothing was dead-lettered.
    let zed = hasher.hash("zed@example.com");
    assert_eq!(
        support::scalar(
            &pool,
            &format!("SELECT count(*) FROM email_suppressions WHERE address_hash = '{zed}'")
        )
        .await,
        0
    );
    let dlq =
        orderfleet::sqs::queue::queue_url(&clients.sqs, &topo.dlq_name(HandlerName::Notifications))
            .await
            .unwrap();
    assert_eq!(support::depth(&clients, &dlq).await, (0, 0));
    drop(worker);
    let log = std::fs::read_to_string(cwd.path().join("worker.log")).unwrap();
    assert!(log.contains("address suppressed"), "{log}");
    for address in ["ada@example.com", "bob@example.net", "Cy@Example.org"] {
        assert!(
            !log.contains(address),
            "{address} in full in the log: {log}"
        );
    }
}

/// The handlers the recommendations need, with unsubscribe links on (or not) and an outbox.
async fn marketing_fleet(
    outbox: &std::path::Path,
    unsubscribe: bool,
) -> (
    orderfleet_testkit::inproc::Fleet,
    deadpool_postgres::Pool,
    String,
) {
    let (pool, url) = support::fresh_db().await;
    let clients = support::clients().await;
    let mut email = EmailArgs {
        outbox_dir: outbox.to_path_buf(),
        hash_key: Some(Secret(HASH_KEY.into())),
        ..EmailArgs::default()
    };
    if unsubscribe {
        email.unsubscribe_url = Some(UNSUBSCRIBE_URL.into());
        email.unsubscribe_key = Some(Secret(UNSUBSCRIBE_KEY.into()));
    }
    let args = DepsArgs {
        email,
        ..DepsArgs::default()
    };
    let deps = Deps::new(&args, &pool, &clients).await.unwrap();
    let fleet = support::saga::sandbox_fleet(pool.clone(), &url)
        .with_handler(
            HandlerName::Personalization,
            deps::build(HandlerName::Personalization, &deps).unwrap(),
        )
        .with_handler(
            HandlerName::Notifications,
            deps::build(HandlerName::Notifications, &deps).unwrap(),
        );
    for sku in ["TEA-1", "CUP-1"] {
        stock_sku(&fleet, sku, 500, 50).await;
    }
    // A teapot sold with a cup: the next teapot's buyer hears about cups.
    for id in ["ord-h1", "ord-h2"] {
        fleet
            .publish_event(&order(
                id,
                &[("TEA-1", 1, 500), ("CUP-1", 1, 500)],
                "tok_visa",
            ))
            .await
            .unwrap();
        fleet.run_until_quiet().await.unwrap();
    }
    (fleet, pool, url)
}

async fn place(fleet: &orderfleet_testkit::inproc::Fleet, id: &str) {
    fleet
        .publish_event(&order(id, &[("TEA-1", 1, 500)], "tok_visa"))
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
}

#[tokio::test]
async fn the_recommendations_email_offers_one_click_unsubscribe_and_an_opt_out_stops_only_marketing(
) {
    let outbox = TempDir::new("of-mkt-");
    let (fleet, pool, url) = marketing_fleet(outbox.path(), true).await;
    place(&fleet, "ord-r1").await;
    assert_eq!(support::saga::status(&pool, "ord-r1").await, "completed");

    let raw = std::fs::read(outbox.path().join("ord-r1.recommendations.eml"))
        .expect("a recommendations email after the completed order");
    let parsed = assert_well_formed(&raw, "ada@example.com");
    let header = parsed.header("List-Unsubscribe").expect("List-Unsubscribe");
    assert_eq!(
        parsed.header("List-Unsubscribe-Post"),
        Some("List-Unsubscribe=One-Click")
    );
    let link = header
        .strip_prefix('<')
        .and_then(|h| h.strip_suffix('>'))
        .unwrap_or_else(|| panic!("List-Unsubscribe is not <url>: {header}"));
    assert!(
        link.starts_with(&format!("{UNSUBSCRIBE_URL}?token=")),
        "{link}"
    );
    // The shop's page checks the token with the shared key and learns the customer.
    let token = token_of_link(link).unwrap();
    let signer = UnsubscribeSigner::new(UNSUBSCRIBE_KEY.as_bytes()).unwrap();
    assert_eq!(signer.verify(token).unwrap(), "cus-1");
    let other = UnsubscribeSigner::new(b"not the shop's key, but 32 bytes!").unwrap();
    assert!(other.verify(token).is_err());
    let text = parsed.part("text/plain").unwrap();
    assert!(text.contains("Product CUP-1 (CUP-1)"), "{text}");
    assert!(text.contains(link), "the link is in the body too: {text}");
    let html = parsed.part("text/html").unwrap();
    assert!(html.contains("Unsubscribe"), "{html}");
    // The confirmation is transactional: no unsubscribe header, no recommendations.
    let confirmation = assert_well_formed(
        &std::fs::read(outbox.path().join("ord-r1.confirmation.eml")).unwrap(),
        "ada@example.com",
    );
    assert!(confirmation.header("List-Unsubscribe").is_none());
    assert!(!confirmation
        .part("text/plain")
        .unwrap()
        .contains("also bought"));

    // The shop's page publishes the opt-out; the next order gets its confirmation, shipping
    // email and no recommendations.
    fleet
        .publish_event(&MarketingOptOut {
            meta: Meta::with_id("optout-1"),
            customer: OptOutSubject {
                id: Some(signer.verify(token).unwrap()),
                email: None,
            },
            channel: OptOutChannel::Link,
        })
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    place(&fleet, "ord-r2").await;
    assert_eq!(support::saga::status(&pool, "ord-r2").await, "completed");
    assert!(outbox.path().join("ord-r2.confirmation.eml").exists());
    assert!(outbox.path().join("ord-r2.shipped.eml").exists());
    assert!(!outbox.path().join("ord-r2.recommendations.eml").exists());
    let r2 = rows(
        &pool,
        "SELECT kind, status, skip_reason FROM emails WHERE order_id = 'ord-r2' ORDER BY kind",
    )
    .await;
    assert!(
        r2.contains(&vec![
            Some("recommendations".into()),
            Some("skipped".into()),
            Some("customer opted out of marketing email (link)".into())
        ]),
        "{r2:?}"
    );
    assert!(
        r2.contains(&vec![
            Some("confirmation".into()),
            Some("sent".into()),
            None
        ]),
        "{r2:?}"
    );
    assert_no_dead_letters(&fleet);

    // `order show` and the report say why.
    let operator = orderfleet::store::db::pool_as(&url, 1, "orderfleet_operator").unwrap();
    let db = operator.get().await.unwrap();
    let view = orderfleet::operator::order::show(&db, "ord-r2")
        .await
        .unwrap()
        .unwrap();
    let skipped = view
        .emails
        .iter()
        .find(|e| e.kind == "recommendations")
        .unwrap();
    assert_eq!(skipped.status, "skipped");
    assert_eq!(
        skipped.skip_reason.as_deref(),
        Some("customer opted out of marketing email (link)")
    );
}

/// A guest checkout gets a new customer id with every order: an opt-out given for an address
/// before any customer had it holds for the guest order that comes with it later.
#[tokio::test]
async fn an_opt_out_by_address_holds_for_a_later_guest_order() {
    let outbox = TempDir::new("of-guest-");
    let (fleet, pool, _url) = marketing_fleet(outbox.path(), true).await;
    fleet
        .publish_event(&MarketingOptOut {
            meta: Meta::with_id("optout-guest"),
            customer: OptOutSubject {
                id: None,
                email: Some("Grace@Example.com".into()),
            },
            channel: OptOutChannel::Support,
        })
        .await
        .unwrap();
    fleet.run_until_quiet().await.unwrap();
    let mut guest = order("ord-g1", &[("TEA-1", 1, 500)], "tok_visa");
    guest.customer.id = "guest-ord-g1".into();
    guest.customer.email = Some("grace@example.com".into());
    fleet.publish_event(&guest).await.unwrap();
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(support::saga::status(&pool, "ord-g1").await, "completed");
    assert!(outbox.path().join("ord-g1.confirmation.eml").exists());
    assert!(!outbox.path().join("ord-g1.recommendations.eml").exists());
    let skipped = rows(
        &pool,
        "SELECT skip_reason FROM emails WHERE order_id = 'ord-g1' AND kind = 'recommendations'",
    )
    .await;
    assert_eq!(
        skipped,
        vec![vec![Some(
            "customer opted out of marketing email (support)".to_string()
        )]]
    );
    // Kept as a keyed hash, not the address.
    let kept = rows(
        &pool,
        "SELECT address_hash FROM marketing_opt_out_addresses",
    )
    .await;
    assert_eq!(kept.len(), 1);
    assert!(
        !kept[0][0].as_deref().unwrap().contains("grace"),
        "{kept:?}"
    );
}

#[tokio::test]
async fn without_an_unsubscribe_url_no_marketing_email_is_sent_but_transactional_ones_are() {
    let outbox = TempDir::new("of-nomkt-");
    let (fleet, pool, _) = marketing_fleet(outbox.path(), false).await;
    place(&fleet, "ord-n1").await;
    assert_eq!(support::saga::status(&pool, "ord-n1").await, "completed");
    assert!(outbox.path().join("ord-n1.confirmation.eml").exists());
    assert!(outbox.path().join("ord-n1.shipped.eml").exists());
    assert!(!outbox.path().join("ord-n1.recommendations.eml").exists());
    assert_eq!(
        support::scalar(
            &pool,
            "SELECT count(*) FROM emails WHERE kind = 'recommendations'"
        )
        .await,
        0
    );
    assert_no_dead_letters(&fleet);
}

#[tokio::test]
async fn support_can_unsubscribe_a_customer_by_address() {
    let clients = support::clients().await;
    let topo = support::topology(&clients).await;
    // The CLI publishes MarketingOptOut on the fleet's bus; the rule routes it to notifications.
    let (code, out, err) = cli(
        &[
            "email",
            "unsubscribe",
            "Ada@Example.com",
            "--prefix",
            &topo.prefix,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("A***@Example.com"), "{out}");
    assert!(!out.contains("Ada@Example.com"), "{out}");
    let queue = orderfleet::sqs::queue::queue_url(
        &clients.sqs,
        &topo.queue_name(HandlerName::Notifications),
    )
    .await
    .unwrap();
    let body = support::wait_for(Duration::from_secs(20), "the opt-out in the queue", || {
        let clients = clients.clone();
        let queue = queue.clone();
        async move {
            let out = clients
                .sqs
                .receive_message()
                .queue_url(&queue)
                .wait_time_seconds(1)
                .send()
                .await
                .ok()?;
            out.messages()
                .first()
                .and_then(|m| m.body().map(String::from))
        }
    })
    .await;
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["detail-type"], "MarketingOptOut");
    assert_eq!(event["source"], "orderfleet.storefront");
    assert_eq!(event["detail"]["channel"], "support");

    // Notifications resolves the address to the customers that have it.
    let outbox = TempDir::new("of-sup-");
    let (fleet, pool, _) = marketing_fleet(outbox.path(), true).await;
    let envelope: orderfleet::domain::envelope::Envelope = serde_json::from_value(event).unwrap();
    fleet.deliver(&envelope).await;
    fleet.run_until_quiet().await.unwrap();
    assert_eq!(
        rows(&pool, "SELECT customer_id, channel FROM marketing_opt_outs").await,
        vec![vec![Some("cus-1".into()), Some("support".into())]]
    );
    place(&fleet, "ord-s1").await;
    assert!(outbox.path().join("ord-s1.confirmation.eml").exists());
    assert!(!outbox.path().join("ord-s1.recommendations.eml").exists());
}
