//! commercetools' Messages, as its EventBridge subscription destination delivers them: the
//! detail-type is the Message type (`OrderCreated`, `OrderStateChanged`, ...) and the detail
//! is the Message itself (`notificationType: "Message"`, `projectKey`, the Message `id`,
//! `resource`, `resourceVersion`, `sequenceNumber`, `type` and the type's own fields). Money is
//! `{centAmount, currencyCode, fractionDigits}`.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::shopify::check_total;
use super::Inbound;
use crate::domain::events::{
    Address, Charges, Currency, Customer, Meta, Money, OrderCancellationRequested, OrderPlaced,
    PlacedLine, PlatformOrder, ProductUpserted,
};
use crate::domain::outcome::HandlerError;
use crate::domain::platform::Platform;

/// Our id of the commercetools order `id`.
pub fn order_id(id: &str) -> String {
    format!("ct-{id}")
}

/// Translates one commercetools Message.
pub fn translate(detail_type: &str, detail: &Value) -> Result<Inbound, HandlerError> {
    let kind = detail
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or(detail_type);
    let project = detail
        .get("projectKey")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    match kind {
        "OrderCreated" | "OrderImported" => {
            let m: OrderMessage = read(kind, detail)?;
            order(m.order, project).map(|o| Inbound::Placed(Box::new(o)))
        }
        "OrderStateChanged" => {
            let m: StateChanged = read(kind, detail)?;
            if m.order_state != "Cancelled" {
                return Ok(Inbound::Skipped {
                    topic: format!("{kind}:{}", m.order_state),
                });
            }
            Ok(Inbound::CancelRequested(OrderCancellationRequested {
                meta: Meta::default(),
                order_id: order_id(&m.resource.id),
                reason: "cancelled on commercetools".into(),
            }))
        }
        "ProductPublished" => {
            let m: ProductPublished = read(kind, detail)?;
            Ok(products(m.product_projection))
        }
        "InventoryEntryQuantitySet" => {
            let m: QuantitySet = read(kind, detail)?;
            let sku = m
                .resource_user_provided_identifiers
                .and_then(|ids| ids.sku)
                .ok_or_else(|| {
                    poison(kind, "names no SKU (resourceUserProvidedIdentifiers.sku)")
                })?;
            Ok(Inbound::Received {
                sku,
                delta: m.new_quantity_on_stock - m.old_quantity_on_stock,
            })
        }
        other => Ok(Inbound::Skipped {
            topic: other.to_string(),
        }),
    }
}

fn poison(kind: &str, what: &str) -> HandlerError {
    HandlerError::poison(format!("commercetools {kind} message {what}"))
}

fn read<T: for<'de> Deserialize<'de>>(kind: &str, detail: &Value) -> Result<T, HandlerError> {
    T::deserialize(detail).map_err(|e| poison(kind, &format!("cannot be read: {e}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypedMoney {
    cent_amount: i64,
    currency_code: String,
}

impl TypedMoney {
    fn money(&self, what: &str) -> Result<Money, HandlerError> {
        let currency = Currency::new(&self.currency_code)
            .map_err(|e| poison("OrderCreated", &format!("{what}: {e}")))?;
        Ok(Money::new(self.cent_amount, currency))
    }
}

#[derive(Deserialize)]
struct OrderMessage {
    order: Order,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Order {
    id: String,
    #[serde(default)]
    order_number: Option<String>,
    #[serde(default)]
    customer_id: Option<String>,
    #[serde(default)]
    customer_email: Option<String>,
    created_at: DateTime<Utc>,
    total_price: TypedMoney,
    #[serde(default)]
    taxed_price: Option<TaxedPrice>,
    #[serde(default)]
    shipping_info: Option<ShippingInfo>,
    #[serde(default)]
    shipping_address: Option<CtAddress>,
    line_items: Vec<LineItem>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaxedPrice {
    total_gross: TypedMoney,
    #[serde(default)]
    total_tax: Option<TypedMoney>,
}

#[derive(Deserialize)]
struct ShippingInfo {
    price: TypedMoney,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CtAddress {
    #[serde(default)]
    first_name: Option<String>,
    #[serde(default)]
    last_name: Option<String>,
    #[serde(default)]
    street_name: Option<String>,
    #[serde(default)]
    street_number: Option<String>,
    #[serde(default)]
    additional_address_info: Option<String>,
    #[serde(default)]
    postal_code: Option<String>,
    #[serde(default)]
    city: Option<String>,
    #[serde(default)]
    country: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LineItem {
    variant: CtVariant,
    quantity: i64,
    price: CtPrice,
    #[serde(default)]
    tax_rate: Option<TaxRate>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaxRate {
    #[serde(default)]
    included_in_price: bool,
}

#[derive(Deserialize)]
struct CtPrice {
    value: TypedMoney,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CtVariant {
    #[serde(default)]
    id: Option<i64>,
    #[serde(default)]
    sku: Option<String>,
    #[serde(default)]
    prices: Vec<CtPrice>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateChanged {
    resource: Reference,
    order_state: String,
}

#[derive(Deserialize)]
struct Reference {
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProductPublished {
    product_projection: Projection,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Projection {
    #[serde(default)]
    name: serde_json::Map<String, Value>,
    master_variant: CtVariant,
    #[serde(default)]
    variants: Vec<CtVariant>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QuantitySet {
    old_quantity_on_stock: i64,
    new_quantity_on_stock: i64,
    #[serde(default)]
    resource_user_provided_identifiers: Option<UserIds>,
}

#[derive(Deserialize)]
struct UserIds {
    #[serde(default)]
    sku: Option<String>,
}

fn order(o: Order, project: String) -> Result<OrderPlaced, HandlerError> {
    let number = o.order_number.clone().unwrap_or_else(|| o.id.clone());
    let what = |field: &str| format!("order {number}'s {field}");
    let mut lines = Vec::with_capacity(o.line_items.len());
    let mut tax_included = false;
    for (i, li) in o.line_items.iter().enumerate() {
        let sku = match (&li.variant.sku, li.variant.id) {
            (Some(sku), _) if !sku.trim().is_empty() => sku.clone(),
            (_, id) => format!("ct-line-{}-{}", i + 1, id.unwrap_or(0)),
        };
        tax_included |= li.tax_rate.as_ref().is_some_and(|t| t.included_in_price);
        lines.push(PlacedLine {
            unit_price: li
                .price
                .value
                .money(&what(&format!("line {} price", i + 1)))?,
            sku,
            quantity: li.quantity,
        });
    }
    // What the customer pays: the taxed gross when the cart was taxed, else the total.
    let total = match &o.taxed_price {
        Some(t) => t.total_gross.money(&what("taxedPrice.totalGross"))?,
        None => o.total_price.money(&what("totalPrice"))?,
    };
    let tax = match o.taxed_price.as_ref().and_then(|t| t.total_tax.as_ref()) {
        Some(t) => t.money(&what("taxedPrice.totalTax"))?.amount_minor,
        None => 0,
    };
    let shipping = match &o.shipping_info {
        Some(s) => s.price.money(&what("shippingInfo.price"))?.amount_minor,
        None => 0,
    };
    // commercetools gives discounted line totals rather than one discount: the discount is
    // what the lines, shipping and tax make beyond the total.
    let subtotal: i64 = lines
        .iter()
        .map(|l| l.quantity.saturating_mul(l.unit_price.amount_minor))
        .fold(0i64, i64::saturating_add);
    let on_top = if tax_included { 0 } else { tax };
    let discount = subtotal
        .saturating_add(shipping)
        .saturating_add(on_top)
        .saturating_sub(total.amount_minor);
    let in_currency = |minor: i64| (minor != 0).then(|| Money::new(minor, total.currency));
    let charges = Charges {
        discount: in_currency(discount),
        shipping: in_currency(shipping),
        tax: in_currency(tax),
        tax_included,
    };
    if discount < 0 {
        return Err(poison(
            "OrderCreated",
            &format!(
                "order {number}: its total {} exceeds its lines {subtotal}, shipping {shipping} \
                 and tax {on_top} (minor units)",
                total.amount_minor
            ),
        ));
    }
    check_total(&number, &lines, &charges, total)?;
    let address = o.shipping_address.ok_or_else(|| {
        poison(
            "OrderCreated",
            &format!("order {number} has no shipping address"),
        )
    })?;
    let name = [address.first_name.clone(), address.last_name.clone()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let street = [address.street_name.clone(), address.street_number.clone()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    Ok(OrderPlaced {
        meta: Meta {
            version: 2,
            event_id: None,
        },
        order_id: order_id(&o.id),
        customer: Customer {
            id: match &o.customer_id {
                Some(id) => format!("ct-customer-{id}"),
                None => format!("ct-guest-{}", o.id),
            },
            email: o.customer_email,
            name: name.clone(),
        },
        lines,
        shipping_address: Address {
            name,
            line1: street,
            line2: address.additional_address_info.filter(|l| !l.is_empty()),
            city: address.city.unwrap_or_default(),
            postal_code: address.postal_code.unwrap_or_default(),
            country: address.country.unwrap_or_default(),
        },
        payment_token: format!("commercetools:{}", o.id),
        placed_at: o.created_at,
        order_number: Some(number),
        platform: Some(PlatformOrder {
            platform: Platform::Commercetools,
            id: o.id,
            shop: project,
        }),
        charges,
    })
}

fn products(p: Projection) -> Inbound {
    let name = p
        .name
        .get("en")
        .or_else(|| p.name.values().next())
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let products = std::iter::once(p.master_variant)
        .chain(p.variants)
        .filter_map(|v| {
            let sku = v.sku.filter(|s| !s.trim().is_empty())?;
            let price = v
                .prices
                .first()
                .and_then(|price| price.value.money("price").ok());
            let mut extra = serde_json::Map::new();
            extra.insert("platform".into(), "commercetools".into());
            Some(ProductUpserted {
                meta: Meta::default(),
                sku,
                name: name.clone(),
                price,
                extra,
            })
        })
        .collect();
    Inbound::Products {
        products,
        items: Vec::new(),
    }
}
