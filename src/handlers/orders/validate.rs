//! Validating an `OrderPlaced` at the edge: every reason an order is invalid, not just the
//! first, so a rejection tells the storefront all it must fix.

use std::collections::{BTreeMap, HashSet};

use crate::domain::events::{
    Contact, Currency, Money, OrderLine, OrderPlaced, RejectionCode, RejectionReason,
};

// A valid order's total is its lines' subtotal less the discount, plus shipping, plus tax
// unless the prices include it ([`crate::domain::events::Charges`]).

/// The most units of one SKU an order may take, summed over its lines. Far past any real
/// basket; its point is that quantities stay where stock arithmetic cannot overflow, so a
/// broken or hostile order is an `OrderRejected` (`invalid_quantity`) at the edge and never a
/// failure deep in inventory after payments took an authorization hold.
pub const MAX_UNITS_PER_SKU: i64 = 1_000_000;

/// A valid order, ready to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidOrder {
    pub customer: Contact,
    pub lines: Vec<OrderLine>,
    pub total: Money,
}

/// Validates an `OrderPlaced` at the edge. `known_skus` are the SKUs of the order found in the
/// catalogue. Returns every reason the order is invalid, not just the first.
pub fn validate(
    order: &OrderPlaced,
    known_skus: &HashSet<String>,
) -> Result<ValidOrder, Vec<RejectionReason>> {
    let mut reasons = Vec::new();
    let mut reject = |code: RejectionCode, message: String| {
        if !reasons
            .iter()
            .any(|r: &RejectionReason| r.code == code && r.message == message)
        {
            reasons.push(RejectionReason { code, message });
        }
    };
    if order.customer.id.trim().is_empty() {
        reject(
            RejectionCode::MissingCustomer,
            "the customer has no id".into(),
        );
    }
    match order.customer.email.as_deref().map(str::trim) {
        None | Some("") => reject(
            RejectionCode::MissingEmail,
            "the customer has no email".into(),
        ),
        // Deliberately loose: the storefront verified the address; this catches garbage.
        Some(e) if !e.contains('@') || e.starts_with('@') || e.ends_with('@') => reject(
            RejectionCode::InvalidEmail,
            "the customer's email is not an email address".into(),
        ),
        Some(_) => {}
    }
    if order.payment_token.trim().is_empty() {
        reject(
            RejectionCode::MissingPaymentToken,
            "the order has no payment token".into(),
        );
    }
    if order.lines.is_empty() {
        reject(RejectionCode::NoLines, "the order has no lines".into());
    }
    let mut currencies: Vec<Currency> = Vec::new();
    let mut total: Option<i64> = Some(0);
    // Units per SKU across the order, as inventory reserves them: `None` once past i64.
    let mut units: BTreeMap<&str, Option<i64>> = BTreeMap::new();
    for line in &order.lines {
        if line.quantity <= 0 {
            reject(
                RejectionCode::InvalidQuantity,
                format!(
                    "{} has quantity {}; it must be at least 1",
                    line.sku, line.quantity
                ),
            );
        } else {
            let sum = units.entry(line.sku.as_str()).or_insert(Some(0));
            *sum = sum.and_then(|s| s.checked_add(line.quantity));
        }
        if !line.unit_price.currency.is_iso_4217() {
            reject(
                RejectionCode::InvalidCurrency,
                format!(
                    "{} is priced in {}, which is not an ISO 4217 currency",
                    line.sku, line.unit_price.currency
                ),
            );
        }
        if line.unit_price.amount_minor < 0 {
            reject(
                RejectionCode::InvalidPrice,
                format!(
                    "{} has a negative unit price {}",
                    line.sku, line.unit_price.amount_minor
                ),
            );
        }
        if !known_skus.contains(&line.sku) {
            reject(
                RejectionCode::UnknownSku,
                format!("{:?} is not in the catalogue", line.sku),
            );
        }
        if !currencies.contains(&line.unit_price.currency) {
            currencies.push(line.unit_price.currency);
        }
        total = total
            .and_then(|t| t.checked_add(line.quantity.checked_mul(line.unit_price.amount_minor)?));
    }
    for (sku, sum) in &units {
        match sum {
            Some(n) if *n <= MAX_UNITS_PER_SKU => {}
            Some(n) => reject(
                RejectionCode::InvalidQuantity,
                format!("{sku} is ordered {n} times; an order takes at most {MAX_UNITS_PER_SKU} units of one SKU"),
            ),
            None => reject(
                RejectionCode::InvalidQuantity,
                format!("the quantities of {sku} add up past 64 bits; an order takes at most {MAX_UNITS_PER_SKU} units of one SKU"),
            ),
        }
    }
    if currencies.len() > 1 {
        let names: Vec<&str> = currencies.iter().map(Currency::as_str).collect();
        reject(
            RejectionCode::MixedCurrencies,
            format!("the lines mix currencies {}", names.join(", ")),
        );
    }
    // Discount, shipping and tax: in the lines' currency, never negative, a discount no larger
    // than the lines, and the total what the charges make of the subtotal.
    let (discount, shipping, tax) = order.charges.minor();
    for (what, charge) in [
        ("discount", order.charges.discount),
        ("shipping", order.charges.shipping),
        ("tax", order.charges.tax),
    ] {
        let Some(charge) = charge else { continue };
        if charge.amount_minor < 0 {
            reject(
                RejectionCode::InvalidPrice,
                format!("the order's {what} is negative ({})", charge.amount_minor),
            );
        }
        if currencies.first().is_some_and(|c| *c != charge.currency) {
            reject(
                RejectionCode::MixedCurrencies,
                format!(
                    "the order's {what} is in {}, its lines in {}",
                    charge.currency, currencies[0]
                ),
            );
        }
    }
    if let Some(subtotal) = total {
        if discount > subtotal {
            reject(
                RejectionCode::InvalidPrice,
                format!("the discount {discount} exceeds the lines' subtotal {subtotal}"),
            );
        }
    }
    let tax_on_top = if order.charges.tax_included { 0 } else { tax };
    let total = total.and_then(|t| {
        t.checked_sub(discount)?
            .checked_add(shipping)?
            .checked_add(tax_on_top)
    });
    if total.is_none() {
        reject(
            RejectionCode::TotalOverflow,
            "the order total does not fit in 64-bit minor units".into(),
        );
    }
    match (reasons.is_empty(), total, currencies.first()) {
        (true, Some(total), Some(&currency)) => Ok(ValidOrder {
            customer: Contact {
                id: order.customer.id.clone(),
                email: order
                    .customer
                    .email
                    .as_deref()
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                name: order.customer.name.clone(),
            },
            lines: order
                .lines
                .iter()
                .map(|l| OrderLine {
                    sku: l.sku.clone(),
                    quantity: l.quantity,
                    unit_price: l.unit_price,
                })
                .collect(),
            total: Money::new(total, currency),
        }),
        _ => Err(reasons),
    }
}
