//! The simulator speaking a commerce platform's dialect (`orderfleet publish --platform`): each
//! planned order becomes the event the platform's EventBridge integration would put on its
//! partner event bus, a Shopify `orders/create` webhook or a commercetools `OrderCreated`
//! Message, with a shipping charge and (Shopify) tax on top of the lines, so that a local run
//! takes the storefront handler's path from the platform's payload to a completed order.
//!
//! The orders are paid on the platform: the simulator's card tokens mean nothing there, so a
//! platform run plans regular orders only.

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::StorefrontEvent;
use crate::domain::events::{Money, OrderPlaced};
use crate::domain::platform::Platform;
use crate::handlers::storefront::shopify::DETAIL_TYPE as SHOPIFY_DETAIL_TYPE;
use crate::providers::platform::shopify::format_major;

/// Shipping charged on every simulated platform order, in minor units.
pub const SHIPPING_MINOR: i64 = 495;
/// Tax added to a simulated Shopify order: 8% of the lines, in basis points.
pub const SHOPIFY_TAX_BP: i64 = 800;

/// The platform's id of the `n`th order of run `run_id`, and the prefix every order id of the
/// run has in the fleet (`shopify-<digits>` or `ct-<run>-`), for `orderfleet wait`.
pub fn order_ids(platform: Platform, run_id: &str, n: usize) -> (String, String) {
    match platform {
        Platform::Shopify => {
            // Shopify's ids are numbers: the run as a number of its own, then the order's.
            let run = run_number(run_id);
            (format!("{run}{n:06}"), format!("shopify-{run}"))
        }
        Platform::Commercetools => (format!("{run_id}-{n:05}"), format!("ct-{run_id}-")),
    }
}

/// A run id as 9 decimal digits (FNV-1a), never starting with 0.
fn run_number(run_id: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in run_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    100_000_000 + h % 900_000_000
}

/// The platform's event for a planned order, under the platform id `id`.
pub fn placed(
    platform: Platform,
    order: &OrderPlaced,
    id: &str,
    shop: &str,
) -> Result<StorefrontEvent> {
    let subtotal: i64 = order
        .lines
        .iter()
        .map(|l| l.quantity.saturating_mul(l.unit_price.amount_minor))
        .fold(0, i64::saturating_add);
    let currency = order
        .lines
        .first()
        .map(|l| l.unit_price.currency)
        .context("a planned order without lines")?;
    let money = |minor: i64| Money::new(minor, currency);
    Ok(match platform {
        Platform::Shopify => {
            let numeric: u64 = id.parse().context("a Shopify order id is a number")?;
            let tax = subtotal * SHOPIFY_TAX_BP / 10_000;
            let total = subtotal + SHIPPING_MINOR + tax;
            let set = |m: Money| {
                json!({"shop_money": {"amount": format_major(m), "currency_code": m.currency.as_str()},
                       "presentment_money": {"amount": format_major(m), "currency_code": m.currency.as_str()}})
            };
            let (first, last) = first_and_last(&order.customer.name);
            let lines: Vec<Value> = order
                .lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    json!({"id": numeric * 10 + i as u64, "sku": l.sku, "quantity": l.quantity,
                           "title": l.sku, "price": format_major(l.unit_price),
                           "price_set": set(l.unit_price)})
                })
                .collect();
            let a = &order.shipping_address;
            StorefrontEvent {
                detail_type: SHOPIFY_DETAIL_TYPE,
                detail: json!({
                    "metadata": {
                        "Content-Type": "application/json",
                        "X-Shopify-Topic": "orders/create",
                        "X-Shopify-Shop-Domain": shop,
                        "X-Shopify-API-Version": crate::providers::platform::shopify::API_VERSION,
                        "X-Shopify-Webhook-Id": format!("sim-{id}-orders-create"),
                        "X-Shopify-Order-Id": id,
                    },
                    "payload": {
                        "id": numeric,
                        "admin_graphql_api_id": format!("gid://shopify/Order/{numeric}"),
                        "name": format!("#{}", numeric % 1_000_000),
                        "email": order.customer.email,
                        "created_at": order.placed_at,
                        "currency": currency.as_str(),
                        "taxes_included": false,
                        "total_price_set": set(money(total)),
                        "total_discounts_set": set(money(0)),
                        "total_shipping_price_set": set(money(SHIPPING_MINOR)),
                        "total_tax_set": set(money(tax)),
                        "customer": {"id": run_number(&order.customer.id), "email": order.customer.email,
                                     "first_name": first, "last_name": last},
                        "shipping_address": {"name": a.name, "address1": a.line1, "address2": a.line2,
                                             "city": a.city, "zip": a.postal_code, "country_code": a.country},
                        "line_items": lines,
                    }
                }),
            }
        }
        Platform::Commercetools => {
            let typed = |minor: i64| {
                json!({"type": "centPrecision", "currencyCode": currency.as_str(),
                       "centAmount": minor, "fractionDigits": 2})
            };
            let (first, last) = first_and_last(&order.customer.name);
            let lines: Vec<Value> = order
                .lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    json!({"id": format!("{id}-li-{i}"), "variant": {"id": 1, "sku": l.sku},
                           "quantity": l.quantity,
                           "price": {"value": typed(l.unit_price.amount_minor)}})
                })
                .collect();
            let a = &order.shipping_address;
            StorefrontEvent {
                detail_type: "OrderCreated",
                detail: json!({
                    "notificationType": "Message",
                    "projectKey": shop,
                    "id": format!("sim-{id}-created"),
                    "version": 1,
                    "sequenceNumber": 1,
                    "resource": {"typeId": "order", "id": id},
                    "resourceVersion": 1,
                    "type": "OrderCreated",
                    "order": {
                        "id": id,
                        "version": 1,
                        "orderNumber": id,
                        "customerEmail": order.customer.email,
                        "createdAt": order.placed_at,
                        "totalPrice": typed(subtotal + SHIPPING_MINOR),
                        "shippingInfo": {"shippingMethodName": "Standard", "price": typed(SHIPPING_MINOR)},
                        "shippingAddress": {"firstName": first, "lastName": last, "streetName": a.line1,
                                            "postalCode": a.postal_code, "city": a.city, "country": a.country},
                        "lineItems": lines,
                    }
                }),
            }
        }
    })
}

/// A full name as the platforms keep it: first name, then the rest.
fn first_and_last(name: &str) -> (&str, &str) {
    name.split_once(' ').unwrap_or((name, ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::envelope::Envelope;
    use crate::handlers::storefront::{translate, Inbound};

    #[test]
    fn simulated_platform_orders_translate_to_what_was_planned() {
        let products = super::super::catalogue(8);
        let plan = super::super::plan_orders(
            &super::super::PlanConfig {
                orders: 5,
                seed: 3,
                run_id: "p1".into(),
                regular_only: true,
            },
            &products,
        )
        .unwrap();
        let orders: Vec<OrderPlaced> = plan
            .events
            .iter()
            .filter(|e| e.detail_type == "OrderPlaced")
            .map(|e| serde_json::from_value(e.detail.clone()).unwrap())
            .collect();
        for platform in Platform::ALL {
            for (n, order) in orders.iter().enumerate() {
                let (id, prefix) = order_ids(platform, "p1", n + 1);
                let event = placed(platform, order, &id, "shop").unwrap();
                let source = format!("{}1/sim", platform.source_prefix());
                let envelope = Envelope {
                    version: "0".into(),
                    id: "eb-1".into(),
                    source,
                    detail_type: event.detail_type.to_string(),
                    time: chrono::Utc::now(),
                    account: String::new(),
                    region: String::new(),
                    resources: Vec::new(),
                    detail: event.detail.clone(),
                };
                let Inbound::Placed(got) = translate(
                    platform,
                    &envelope,
                    crate::domain::events::Currency::new("USD").unwrap(),
                )
                .unwrap() else {
                    panic!("{platform}: not an order");
                };
                assert!(
                    got.order_id.starts_with(&prefix),
                    "{} {prefix}",
                    got.order_id
                );
                assert_eq!(got.lines, order.lines);
                assert_eq!(
                    got.charges.shipping.map(|m| m.amount_minor),
                    Some(SHIPPING_MINOR)
                );
            }
        }
    }
}
