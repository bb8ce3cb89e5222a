//! The write-back clients against HTTP fakes of the platforms' APIs: what each call sends, that
//! a call made again (the retry after a crash right after the platform acted) finds what the
//! first made instead of acting twice, and how the platform's refusals and throttling map onto
//! retry or give up; through the storefront handler, a lost answer is found and a refusal is
//! recorded as failed.

use std::time::Duration;

use orderfleet::domain::events::{Currency, Money, PlatformOrder};
use orderfleet::domain::platform::Platform;
use orderfleet::providers::platform::commercetools::{Commercetools, Credentials};
use orderfleet::providers::platform::http::JsonClient;
use orderfleet::providers::platform::shopify::Shopify;
use orderfleet::providers::platform::{Action, Call, PlatformApi, PlatformError};
use serde_json::json;

use crate::support::platforms::{
    ct_answer, shopify_answer, Fake, CT_CLIENT_ID, CT_CLIENT_SECRET, SHOPIFY_TOKEN,
};

fn http() -> JsonClient {
    JsonClient::new(Duration::from_secs(5))
}

fn shopify_call(key: &str) -> Call {
    Call {
        order: PlatformOrder {
            platform: Platform::Shopify,
            id: "gid://shopify/Order/820982911946154508".into(),
            shop: "tea-and-cups.myshopify.com".into(),
        },
        idempotency_key: key.into(),
    }
}

fn ct_call(key: &str) -> Call {
    Call {
        order: PlatformOrder {
            platform: Platform::Commercetools,
            id: "8c1f5d9e-2a7b-4c3d-9e0f-1a2b3c4d5e6f".into(),
            shop: "tea-and-cups".into(),
        },
        idempotency_key: key.into(),
    }
}

fn commercetools(fake: &Fake, secret: &str) -> Commercetools {
    Commercetools::new(
        http(),
        Credentials {
            auth_url: fake.url.clone(),
            api_url: fake.url.clone(),
            client_id: CT_CLIENT_ID.into(),
            client_secret: secret.into(),
        },
    )
}

fn usd(minor: i64) -> Money {
    Money::new(minor, Currency::new("USD").unwrap())
}

#[tokio::test]
async fn shopify_fulfills_and_refunds_once_however_often_it_is_asked() {
    let fake = Fake::start(shopify_answer).await;
    let shop = Shopify::new(http(), SHOPIFY_TOKEN.into(), Some(fake.url.clone()));
    let fulfill = Action::Fulfill {
        carrier: "DHL Express".into(),
        tracking_number: "1Z999AA10123456784".into(),
    };
    let first = shop
        .apply(&shopify_call("fulfill-1"), &fulfill)
        .await
        .unwrap();
    // The same call again, as after a crash between the platform's answer and our commit.
    let again = shop
        .apply(&shopify_call("fulfill-1"), &fulfill)
        .await
        .unwrap();
    assert_eq!(first, again);
    let creates: Vec<_> = fake
        .seen()
        .into_iter()
        .filter(|s| s.graphql() == "fulfillmentCreate")
        .collect();
    assert_eq!(creates.len(), 1, "one fulfillment");
    let vars = &creates[0].json()["variables"]["fulfillment"];
    assert_eq!(
        vars["trackingInfo"],
        json!({"number": "1Z999AA10123456784", "company": "DHL Express"})
    );
    assert_eq!(vars["notifyCustomer"], json!(false));

    let refund = Action::Refund { amount: usd(1234) };
    let first = shop
        .apply(&shopify_call("refund-7"), &refund)
        .await
        .unwrap();
    let again = shop
        .apply(&shopify_call("refund-7"), &refund)
        .await
        .unwrap();
    assert_eq!(first, again);
    // A second refund of the same order is a call of its own.
    shop.apply(
        &shopify_call("refund-8"),
        &Action::Refund { amount: usd(500) },
    )
    .await
    .unwrap();
    let refunds: Vec<_> = fake
        .seen()
        .into_iter()
        .filter(|s| s.graphql() == "refundCreate")
        .map(|s| s.json()["variables"]["input"].clone())
        .collect();
    assert_eq!(refunds.len(), 2, "{refunds:?}");
    assert_eq!(refunds[0]["note"], json!("orderfleet:refund-7"));
    assert_eq!(
        refunds[0]["transactions"],
        json!([{
            "orderId": "gid://shopify/Order/820982911946154508",
            "parentId": "gid://shopify/OrderTransaction/8",
            "gateway": "shopify_payments",
            "kind": "REFUND",
            "amount": "12.34"
        }])
    );
    assert_eq!(refunds[1]["transactions"][0]["amount"], json!("5.00"));
    for s in fake.seen() {
        assert_eq!(s.path, "/admin/api/2025-01/graphql.json");
        assert_eq!(s.headers["x-shopify-access-token"], SHOPIFY_TOKEN);
    }
}

#[tokio::test]
async fn shopify_refusals_give_up_and_throttling_retries() {
    // A wrong token: Shopify answers 401, which no retry mends.
    let fake = Fake::start(shopify_answer).await;
    let shop = Shopify::new(http(), "shpat_wrong".into(), Some(fake.url.clone()));
    let cancel = Action::Cancel {
        reason: "out of stock".into(),
    };
    match shop.apply(&shopify_call("c-1"), &cancel).await {
        Err(PlatformError::Refused(why)) => assert!(why.contains("401"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // The GraphQL cost limit (200 with a THROTTLED error) and HTTP 429 are retried later.
    let throttled = Fake::start(|_, _| {
        (
            200,
            json!({"errors": [{"message": "Throttled", "extensions": {"code": "THROTTLED"}}]}),
        )
    })
    .await;
    let shop = Shopify::new(http(), SHOPIFY_TOKEN.into(), Some(throttled.url.clone()));
    assert!(matches!(
        shop.apply(&shopify_call("c-2"), &cancel).await,
        Err(PlatformError::Retry(_))
    ));
    let limited = Fake::start(|_, _| (429, json!({"errors": "Exceeded 2 calls per second"}))).await;
    let shop = Shopify::new(http(), SHOPIFY_TOKEN.into(), Some(limited.url.clone()));
    match shop.apply(&shopify_call("c-3"), &cancel).await {
        Err(PlatformError::Retry(why)) => assert!(why.contains("429"), "{why}"),
        other => panic!("expected a retry, got {other:?}"),
    }

    // A mutation's user errors are the platform refusing: given up, with its words.
    let refusing = Fake::start(|req, _| match req.graphql().as_str() {
        "OrderState" => (200, json!({"data": {"order": {"id": "x", "cancelledAt": null}}})),
        _ => (
            200,
            json!({"data": {"orderCancel": {"job": null, "orderCancelUserErrors": [
                {"field": ["orderId"], "message": "Cannot cancel a fulfilled order", "code": "INVALID"}
            ]}}}),
        ),
    })
    .await;
    let shop = Shopify::new(http(), SHOPIFY_TOKEN.into(), Some(refusing.url.clone()));
    match shop.apply(&shopify_call("c-4"), &cancel).await {
        Err(PlatformError::Refused(why)) => {
            assert!(why.contains("Cannot cancel a fulfilled order"), "{why}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn commercetools_ships_cancels_and_refunds_once_with_one_token() {
    let fake = Fake::start(ct_answer).await;
    let ct = commercetools(&fake, CT_CLIENT_SECRET);
    let fulfill = Action::Fulfill {
        carrier: "DHL".into(),
        tracking_number: "00340434161094042557".into(),
    };
    ct.apply(&ct_call("ship-1"), &fulfill).await.unwrap();
    ct.apply(&ct_call("ship-1"), &fulfill).await.unwrap();
    let refund = Action::Refund {
        amount: Money::new(1990, Currency::new("EUR").unwrap()),
    };
    let first = ct.apply(&ct_call("refund-3"), &refund).await.unwrap();
    let again = ct.apply(&ct_call("refund-3"), &refund).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(first, "txn-refund-1");
    let cancel = Action::Cancel {
        reason: "requested".into(),
    };
    ct.apply(&ct_call("cancel-1"), &cancel).await.unwrap();
    ct.apply(&ct_call("cancel-1"), &cancel).await.unwrap();

    let seen = fake.seen();
    let posts: Vec<_> = seen.iter().filter(|s| s.method == "POST").collect();
    let deliveries = posts
        .iter()
        .filter(|s| s.body.contains("addDelivery"))
        .count();
    let refunds: Vec<_> = posts
        .iter()
        .filter(|s| s.path == "/tea-and-cups/payments/pay-1")
        .collect();
    let cancels = posts
        .iter()
        .filter(|s| s.body.contains("changeOrderState"))
        .count();
    assert_eq!((deliveries, refunds.len(), cancels), (1, 1, 1), "{posts:?}");
    assert_eq!(
        refunds[0].json()["actions"][0],
        json!({"action": "addTransaction", "transaction": {
            "type": "Refund",
            "amount": {"centAmount": 1990, "currencyCode": "EUR"},
            "interactionId": "refund-3",
            "state": "Success"
        }})
    );
    assert_eq!(
        seen.iter().filter(|s| s.path == "/oauth/token").count(),
        1,
        "the token is kept until it is about to expire"
    );
}

#[tokio::test]
async fn commercetools_bad_credentials_are_refused_and_a_version_conflict_is_retried() {
    let fake = Fake::start(ct_answer).await;
    let ct = commercetools(&fake, "not-the-secret");
    let cancel = Action::Cancel {
        reason: "requested".into(),
    };
    match ct.apply(&ct_call("c-1"), &cancel).await {
        Err(PlatformError::Refused(why)) => assert!(why.contains("401"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Someone else changed the order between our read and our update: 409, retried later
    // against the new version.
    let conflict = Fake::start(|req, before| {
        if req.method == "POST" && req.path.contains("/orders/") {
            return (
                409,
                json!({"statusCode": 409, "message": "Object version mismatch"}),
            );
        }
        ct_answer(req, before)
    })
    .await;
    let ct = commercetools(&conflict, CT_CLIENT_SECRET);
    assert!(matches!(
        ct.apply(&ct_call("c-2"), &cancel).await,
        Err(PlatformError::Retry(_))
    ));
}

/// The platform acts, then its answer is lost (here a 502 after the fulfillment was made; in
/// life a crash of the worker right after the call). The handler's first delivery fails and
/// rolls back, but the call's record, committed before the call, says it was started; the
/// next delivery asks Shopify, finds the fulfillment and marks it done: one fulfillment.
#[tokio::test]
async fn a_fulfillment_whose_answer_was_lost_is_found_not_made_again() {
    use orderfleet::domain::events::{Meta, OrderShipped, SkuQuantity};
    use orderfleet::domain::names::HandlerName;
    use orderfleet::handlers::storefront::Storefront;
    use orderfleet_testkit::examples::envelope;
    use std::sync::Arc;

    let fake = Fake::start(|req, before| {
        let first_create = req.graphql() == "fulfillmentCreate"
            && !before.iter().any(|s| s.graphql() == "fulfillmentCreate");
        let answer = shopify_answer(req, before);
        if first_create {
            (502, json!({"errors": "Bad Gateway"}))
        } else {
            answer
        }
    })
    .await;
    let (pool, _) = crate::support::fresh_db().await;
    let shopify = Arc::new(Shopify::new(
        http(),
        SHOPIFY_TOKEN.into(),
        Some(fake.url.clone()),
    ));
    let storefront = Storefront::new(
        vec![shopify],
        Currency::new("USD").unwrap(),
        pool.clone(),
        Duration::from_secs(5),
    );
    let fleet = orderfleet_testkit::inproc::Fleet::new(pool.clone())
        .with_handler(HandlerName::Storefront, Arc::new(storefront));
    pool.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO platform_orders (order_id, platform, platform_order_id, shop, order_number)
             VALUES ('shopify-820982911946154508', 'shopify',
                     'gid://shopify/Order/820982911946154508', 'tea-and-cups.myshopify.com', '#1042')",
            &[],
        )
        .await
        .unwrap();
    let shipped = envelope(
        "OrderShipped",
        &OrderShipped {
            meta: Meta::with_id("shipped-1"),
            order_id: "shopify-820982911946154508".into(),
            carrier: "DHL Express".into(),
            tracking_number: "1Z999AA10123456784".into(),
            lines: vec![SkuQuantity {
                sku: "TEA-POT-1".into(),
                quantity: 1,
            }],
            shipped_at: chrono::Utc::now(),
        },
    );
    let first = fleet.deliver_to(HandlerName::Storefront, &shipped, 1).await;
    assert!(
        matches!(
            first,
            Err(orderfleet::domain::outcome::HandlerError::Retry { .. })
        ),
        "{first:?}"
    );
    let state = |pool: deadpool_postgres::Pool| async move {
        let row = pool
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT state, attempts, result FROM platform_calls
                  WHERE idempotency_key = 'fulfill:shopify-820982911946154508'",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, Option<String>>(2),
        )
    };
    assert_eq!(state(pool.clone()).await, ("started".into(), 1, None));

    let again = fleet.deliver_to(HandlerName::Storefront, &shipped, 2).await;
    assert!(again.is_ok(), "{again:?}");
    assert_eq!(
        state(pool.clone()).await,
        (
            "done".into(),
            2,
            Some("gid://shopify/Fulfillment/255858046".into())
        )
    );
    let creates = fake
        .seen()
        .iter()
        .filter(|s| s.graphql() == "fulfillmentCreate")
        .count();
    assert_eq!(creates, 1, "one fulfillment on the platform");

    // A refusal (a revoked token: 401) is recorded as failed, with the platform's words, and
    // the event is permanent.
    let revoked = Storefront::new(
        vec![Arc::new(Shopify::new(
            http(),
            "shpat_revoked".into(),
            Some(fake.url.clone()),
        ))],
        Currency::new("USD").unwrap(),
        pool.clone(),
        Duration::from_secs(5),
    );
    let cancelled = envelope(
        "OrderCancelled",
        &orderfleet::domain::events::OrderCancelled {
            meta: Meta::with_id("cancelled-1"),
            order_id: "shopify-820982911946154508".into(),
            reason: orderfleet::domain::events::CancelReason::Requested,
            lines: vec![],
            total: Money {
                amount_minor: 1000,
                currency: Currency::new("USD").unwrap(),
            },
        },
    );
    let refused = orderfleet::runtime::execute(&revoked, &pool, &cancelled, 1).await;
    assert!(
        matches!(
            &refused,
            Err(orderfleet::domain::outcome::HandlerError::Permanent { .. })
        ),
        "{refused:?}"
    );
    let row = pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT state, result, done_at IS NULL FROM platform_calls
              WHERE idempotency_key = 'cancel:shopify-820982911946154508'",
            &[],
        )
        .await
        .unwrap();
    let (state, result, not_done): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(state, "failed");
    assert!(result.contains("401"), "{result}");
    assert!(not_done);
}
