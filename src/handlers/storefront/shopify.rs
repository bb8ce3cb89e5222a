//! Shopify's webhooks, as its EventBridge integration delivers them: detail-type
//! `shopifyWebhook`, the webhook's headers in `detail.metadata` (`X-Shopify-Topic`,
//! `X-Shopify-Webhook-Id`, `X-Shopify-Shop-Domain`, ...) and its REST-shaped body in
//! `detail.payload`. Amounts are decimal strings; `*_set.shop_money` holds them in the shop's
//! currency, which is the currency the fleet books (`presentment_money`, the customer's, is
//! not used).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::Inbound;
use crate::domain::events::{
    Address, Charges, Currency, Customer, Meta, Money, OrderCancellationRequested, OrderPlaced,
    PlacedLine, PlatformOrder, ProductUpserted,
};
use crate::domain::outcome::HandlerError;
use crate::domain::platform::Platform;

/// The detail-type of every Shopify event on its partner event bus.
pub const DETAIL_TYPE: &str = "shopifyWebhook";

/// Our id of the Shopify order with numeric id `id`.
pub fn order_id(id: u64) -> String {
    format!("shopify-{id}")
}

/// Translates one Shopify event.
pub fn translate(detail: &Value, shop_currency: Currency) -> Result<Inbound, HandlerError> {
    let metadata = detail
        .get("metadata")
        .ok_or_else(|| poison("has no metadata (the webhook's headers)"))?;
    let header = |name: &str| metadata.get(name).and_then(Value::as_str).unwrap_or("");
    let topic = header("X-Shopify-Topic");
    if topic.is_empty() {
        return Err(poison("has no X-Shopify-Topic in its metadata"));
    }
    let shop = header("X-Shopify-Shop-Domain").to_string();
    let payload = detail
        .get("payload")
        .ok_or_else(|| poison(&format!("{topic} has no payload")))?;
    match topic {
        "orders/create" => order(payload, shop).map(|o| Inbound::Placed(Box::new(o))),
        "orders/cancelled" => {
            let c: CancelledOrder = read(topic, payload)?;
            Ok(Inbound::CancelRequested(OrderCancellationRequested {
                meta: Meta::default(),
                order_id: order_id(c.id),
                reason: format!(
                    "cancelled on Shopify ({})",
                    c.cancel_reason.as_deref().unwrap_or("no reason given")
                ),
            }))
        }
        "products/create" | "products/update" => products(topic, payload, shop_currency),
        "inventory_levels/update" => {
            let level: InventoryLevel = read(topic, payload)?;
            Ok(Inbound::Level {
                item_id: level.inventory_item_id.to_string(),
                available: level.available.unwrap_or(0),
                at: level.updated_at,
            })
        }
        other => Ok(Inbound::Skipped {
            topic: other.to_string(),
        }),
    }
}

fn poison(what: &str) -> HandlerError {
    HandlerError::poison(format!("Shopify webhook {what}"))
}

fn read<T: for<'de> Deserialize<'de>>(topic: &str, payload: &Value) -> Result<T, HandlerError> {
    T::deserialize(payload).map_err(|e| poison(&format!("{topic} payload cannot be read: {e}")))
}

#[derive(Deserialize)]
struct MoneySet {
    shop_money: ShopMoney,
}

#[derive(Deserialize)]
struct ShopMoney {
    amount: String,
    currency_code: String,
}

impl MoneySet {
    fn money(&self, what: &str) -> Result<Money, HandlerError> {
        let currency = Currency::new(&self.shop_money.currency_code)
            .map_err(|e| poison(&format!("{what}: {e}")))?;
        Money::parse_decimal(&self.shop_money.amount, currency)
            .map_err(|e| poison(&format!("{what}: {e}")))
    }
}

#[derive(Deserialize)]
struct Order {
    id: u64,
    #[serde(default)]
    admin_graphql_api_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
    created_at: DateTime<Utc>,
    #[serde(default)]
    taxes_included: bool,
    total_price_set: MoneySet,
    #[serde(default)]
    total_discounts_set: Option<MoneySet>,
    #[serde(default)]
    total_shipping_price_set: Option<MoneySet>,
    #[serde(default)]
    total_tax_set: Option<MoneySet>,
    #[serde(default)]
    customer: Option<OrderCustomer>,
    #[serde(default)]
    shipping_address: Option<ShippingAddress>,
    line_items: Vec<LineItem>,
}

#[derive(Deserialize)]
struct OrderCustomer {
    id: u64,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    first_name: Option<String>,
    #[serde(default)]
    last_name: Option<String>,
}

#[derive(Deserialize)]
struct ShippingAddress {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    address1: Option<String>,
    #[serde(default)]
    address2: Option<String>,
    #[serde(default)]
    city: Option<String>,
    #[serde(default)]
    zip: Option<String>,
    #[serde(default)]
    country_code: Option<String>,
}

#[derive(Deserialize)]
struct LineItem {
    #[serde(default)]
    sku: Option<String>,
    #[serde(default)]
    variant_id: Option<u64>,
    quantity: i64,
    price_set: MoneySet,
}

#[derive(Deserialize)]
struct CancelledOrder {
    id: u64,
    #[serde(default)]
    cancel_reason: Option<String>,
}

#[derive(Deserialize)]
struct InventoryLevel {
    inventory_item_id: u64,
    #[serde(default)]
    available: Option<i64>,
    #[serde(default)]
    updated_at: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct Product {
    title: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    variants: Vec<Variant>,
}

#[derive(Deserialize)]
struct Variant {
    #[serde(default)]
    sku: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    price: Option<String>,
    #[serde(default)]
    inventory_item_id: Option<u64>,
}

fn order(payload: &Value, shop: String) -> Result<OrderPlaced, HandlerError> {
    let o: Order = read("orders/create", payload)?;
    let number = o.name.clone().unwrap_or_else(|| format!("#{}", o.id));
    let what = |field: &str| format!("order {number}'s {field}");
    let total = o.total_price_set.money(&what("total_price_set"))?;
    let charge = |set: &Option<MoneySet>, field: &str| -> Result<Option<Money>, HandlerError> {
        match set {
            Some(s) => Ok(Some(s.money(&what(field))?).filter(|m| m.amount_minor != 0)),
            None => Ok(None),
        }
    };
    let charges = Charges {
        discount: charge(&o.total_discounts_set, "total_discounts_set")?,
        shipping: charge(&o.total_shipping_price_set, "total_shipping_price_set")?,
        tax: charge(&o.total_tax_set, "total_tax_set")?,
        tax_included: o.taxes_included,
    };
    let mut lines = Vec::with_capacity(o.line_items.len());
    for (i, li) in o.line_items.iter().enumerate() {
        // A line without a SKU (a custom item) is named by its variant, and orders rejects
        // it as not in the catalogue: the order is answered, not lost.
        let sku = match (&li.sku, li.variant_id) {
            (Some(sku), _) if !sku.trim().is_empty() => sku.clone(),
            (_, Some(v)) => format!("shopify-variant-{v}"),
            _ => format!("shopify-line-{}", i + 1),
        };
        lines.push(PlacedLine {
            unit_price: li
                .price_set
                .money(&what(&format!("line {} price", i + 1)))?,
            sku,
            quantity: li.quantity,
        });
    }
    check_total(&number, &lines, &charges, total)?;
    let address = o.shipping_address.ok_or_else(|| {
        poison(&format!(
            "orders/create: order {number} has no shipping address (orders that ship nothing \
             are not handled by this fleet)"
        ))
    })?;
    let customer = match o.customer {
        Some(c) => Customer {
            id: format!("shopify-customer-{}", c.id),
            email: c.email.or(o.email),
            name: [c.first_name, c.last_name]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" "),
        },
        // A guest checkout: no customer record, only the order's email.
        None => Customer {
            id: format!("shopify-guest-{}", o.id),
            email: o.email,
            name: address.name.clone().unwrap_or_default(),
        },
    };
    let gid = o
        .admin_graphql_api_id
        .unwrap_or_else(|| format!("gid://shopify/Order/{}", o.id));
    Ok(OrderPlaced {
        meta: Meta {
            version: 2,
            event_id: None,
        },
        order_id: order_id(o.id),
        shipping_address: Address {
            name: address.name.unwrap_or_default(),
            line1: address.address1.unwrap_or_default(),
            line2: address.address2.filter(|l| !l.is_empty()),
            city: address.city.unwrap_or_default(),
            postal_code: address.zip.unwrap_or_default(),
            country: address.country_code.unwrap_or_default(),
        },
        customer,
        lines,
        // Paid on Shopify: the token names the order there, for the payment provider.
        payment_token: format!("shopify:{gid}"),
        placed_at: o.created_at,
        order_number: Some(number),
        platform: Some(PlatformOrder {
            platform: Platform::Shopify,
            id: gid,
            shop,
        }),
        charges,
    })
}

/// Refuses an order whose parts do not make its total: money the fleet cannot account for is
/// never booked. The reason shows the arithmetic.
pub(super) fn check_total(
    number: &str,
    lines: &[PlacedLine],
    charges: &Charges,
    total: Money,
) -> Result<(), HandlerError> {
    let subtotal: Option<i64> = lines.iter().try_fold(0i64, |sum, l| {
        sum.checked_add(l.quantity.checked_mul(l.unit_price.amount_minor)?)
    });
    let (discount, shipping, tax) = charges.minor();
    let on_top = if charges.tax_included { 0 } else { tax };
    let computed = subtotal.and_then(|s| {
        s.checked_sub(discount)?
            .checked_add(shipping)?
            .checked_add(on_top)
    });
    if computed != Some(total.amount_minor) {
        return Err(HandlerError::poison(format!(
            "order {number}: lines {} - discount {discount} + shipping {shipping} + tax {on_top} \
             (minor units) do not make its total {}",
            subtotal.map_or("overflow".to_string(), |s| s.to_string()),
            total.amount_minor
        )));
    }
    Ok(())
}

fn products(topic: &str, payload: &Value, currency: Currency) -> Result<Inbound, HandlerError> {
    let p: Product = read(topic, payload)?;
    let mut products = Vec::new();
    let mut items = Vec::new();
    for v in p.variants {
        let Some(sku) = v.sku.filter(|s| !s.trim().is_empty()) else {
            continue;
        };
        let name = match v.title.as_deref() {
            None | Some("Default Title") => p.title.clone(),
            Some(t) => format!("{} - {t}", p.title),
        };
        let price = match v.price.as_deref() {
            Some(price) => Some(
                Money::parse_decimal(price, currency)
                    .map_err(|e| poison(&format!("{topic}: variant {sku}'s price: {e}")))?,
            ),
            None => None,
        };
        if let Some(item) = v.inventory_item_id {
            items.push((item.to_string(), sku.clone()));
        }
        let mut extra = serde_json::Map::new();
        extra.insert("platform".into(), "shopify".into());
        if let Some(status) = &p.status {
            extra.insert("status".into(), status.clone().into());
        }
        products.push(ProductUpserted {
            meta: Meta::default(),
            sku,
            name,
            price,
            extra,
        });
    }
    Ok(Inbound::Products { products, items })
}
