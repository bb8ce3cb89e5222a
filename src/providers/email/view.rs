//! The data each kind of email is rendered from: the contract between the notifications
//! handler, which fills it, and the templates, which word it. Amounts arrive formatted
//! ([`format_money`]), so templates never do arithmetic on money.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::EmailKind;
use crate::domain::events::{Address, Currency, Money};

/// The data of one email, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EmailView {
    Confirmation(Confirmation),
    Shipped(Shipped),
    Cancelled(Cancelled),
    Refunded(Refunded),
    Recommendations(Recommendations),
}

impl EmailView {
    /// The kind of email this view renders.
    pub fn kind(&self) -> EmailKind {
        match self {
            EmailView::Confirmation(_) => EmailKind::Confirmation,
            EmailView::Shipped(_) => EmailKind::Shipped,
            EmailView::Cancelled(_) => EmailKind::Cancelled,
            EmailView::Refunded(_) => EmailKind::Refunded,
            EmailView::Recommendations(_) => EmailKind::Recommendations,
        }
    }

    /// One example of every kind and every branch the templates have (each money outcome of a
    /// cancellation, each refund). Rendered at startup, so that a broken
    /// template fails the worker's start rather than a customer's email.
    pub fn samples() -> Vec<EmailView> {
        // Cannot fail: "EUR" is three uppercase ASCII letters.
        let code = Currency::new("EUR").expect("EUR is a currency code");
        let eur = |minor| format_money(Money::new(minor, code));
        let confirmation = Confirmation {
            order_id: "ord-sample".into(),
            customer_name: "Ada Lovelace".into(),
            placed_on: "2024-01-31".into(),
            lines: vec![LineView {
                sku: "TEA-1".into(),
                name: "Teapot".into(),
                quantity: 2,
                unit_price: eur(1250),
                line_total: eur(2500),
            }],
            total: eur(2500),
            shipping: AddressView {
                name: "Ada Lovelace".into(),
                lines: vec!["12 St James's Square".into(), "SW1Y 4JH London".into()],
                country: "GB".into(),
            },
        };
        let cancelled = |reason: &str, money: MoneyOutcome| {
            EmailView::Cancelled(Cancelled {
                order_id: "ord-sample".into(),
                customer_name: String::new(),
                reason: reason.into(),
                money,
                amount: eur(2500),
            })
        };
        vec![
            EmailView::Confirmation(confirmation),
            EmailView::Recommendations(Recommendations {
                order_id: "ord-sample".into(),
                customer_name: "Ada Lovelace".into(),
                recommendations: vec![RecommendationView {
                    sku: "CUP-1".into(),
                    name: "Cup".into(),
                }],
                unsubscribe_url: "https://shop.example/unsubscribe?token=sample".into(),
            }),
            EmailView::Shipped(Shipped {
                order_id: "ord-sample".into(),
                customer_name: "Ada Lovelace".into(),
                carrier: "sandbox".into(),
                tracking_number: "SBX0123456789AB".into(),
                items: vec![ItemView {
                    sku: "TEA-1".into(),
                    name: "Teapot".into(),
                    quantity: 2,
                }],
            }),
            cancelled("requested", MoneyOutcome::AuthorizationVoided),
            cancelled("out_of_stock", MoneyOutcome::NothingCharged),
            cancelled("payment_failed", MoneyOutcome::Refunded),
            cancelled("something_new", MoneyOutcome::NothingCharged),
            EmailView::Refunded(Refunded {
                order_id: "ord-sample".into(),
                customer_name: "Ada Lovelace".into(),
                amount: eur(2500),
                returned: true,
            }),
            EmailView::Refunded(Refunded {
                order_id: "ord-sample".into(),
                customer_name: String::new(),
                amount: eur(2500),
                returned: false,
            }),
        ]
    }
}

/// The order confirmation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Confirmation {
    pub order_id: String,
    pub customer_name: String,
    /// The day the order was placed, UTC, `YYYY-MM-DD`.
    pub placed_on: String,
    pub lines: Vec<LineView>,
    pub total: String,
    pub shipping: AddressView,
}

/// "Customers also bought", after a completed order: marketing, so it carries an
/// unsubscribe link and goes only to customers who have not opted out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendations {
    pub order_id: String,
    pub customer_name: String,
    /// Never empty: without anything to recommend there is no email.
    pub recommendations: Vec<RecommendationView>,
    /// The shop's unsubscribe page with the customer's signed token.
    pub unsubscribe_url: String,
}

/// One line of a confirmation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LineView {
    pub sku: String,
    /// The product's name from the catalogue, or the SKU when it has none.
    pub name: String,
    pub quantity: i64,
    pub unit_price: String,
    pub line_total: String,
}

/// A shipping address, ready to print line by line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AddressView {
    pub name: String,
    pub lines: Vec<String>,
    pub country: String,
}

impl From<&Address> for AddressView {
    fn from(a: &Address) -> Self {
        let mut lines = vec![a.line1.clone()];
        lines.extend(a.line2.clone().filter(|l| !l.trim().is_empty()));
        lines.push(format!("{} {}", a.postal_code, a.city).trim().to_string());
        AddressView {
            name: a.name.clone(),
            lines,
            country: a.country.clone(),
        }
    }
}

/// A recommended product.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecommendationView {
    pub sku: String,
    pub name: String,
}

/// The parcel left.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shipped {
    pub order_id: String,
    pub customer_name: String,
    pub carrier: String,
    pub tracking_number: String,
    pub items: Vec<ItemView>,
}

/// A SKU and a number of units, named.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemView {
    pub sku: String,
    pub name: String,
    pub quantity: i64,
}

/// What happened to the customer's money when an order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MoneyOutcome {
    /// The authorization (a hold on the card) was released; nothing was charged.
    AuthorizationVoided,
    /// No authorization existed (the payment failed or never started); nothing was charged.
    NothingCharged,
    /// The captured amount was refunded.
    Refunded,
}

/// The order was cancelled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cancelled {
    pub order_id: String,
    pub customer_name: String,
    /// The cancellation reason code (`requested`, `out_of_stock`, `payment_failed`); templates
    /// word each one and have a generic sentence for codes they do not know.
    pub reason: String,
    pub money: MoneyOutcome,
    /// The order total, or the refunded amount when `money` is `refunded`.
    pub amount: String,
}

/// A payment was refunded after the order was not cancelled (a returned parcel).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refunded {
    pub order_id: String,
    pub customer_name: String,
    pub amount: String,
    /// The parcel came back to the warehouse (delivery failed).
    pub returned: bool,
}

/// Formats an amount for a customer: the code, a space, the major units and the minor units,
/// e.g. `EUR 12.50`, `JPY 1200`, `KWD 1.250`, `EUR -0.05`, with the minor unit of the currency
/// ([`Currency::minor_unit_exponent`]). Exact: integer arithmetic only.
pub fn format_money(m: Money) -> String {
    format_minor(i128::from(m.amount_minor), m.currency)
}

/// [`format_money`] for an amount that may exceed `i64` (a line total: quantity × price). A
/// code that is not an ISO 4217 currency (orders rejects those, so only old data has one) is
/// printed in minor units, saying so, rather than with guessed decimals.
pub fn format_minor(amount_minor: i128, currency: Currency) -> String {
    let Some(digits) = currency.minor_unit_exponent() else {
        return format!("{currency} {amount_minor} (minor units)");
    };
    let sign = if amount_minor < 0 { "-" } else { "" };
    let abs = amount_minor.unsigned_abs();
    if digits == 0 {
        return format!("{currency} {sign}{abs}");
    }
    let unit = 10u128.pow(digits);
    format!(
        "{currency} {sign}{}.{:0width$}",
        abs / unit,
        abs % unit,
        width = digits as usize
    )
}

/// The UTC day of `at`, `YYYY-MM-DD`.
pub fn day(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn money(minor: i64, code: &str) -> Money {
        Money::new(minor, Currency::new(code).unwrap())
    }

    #[test]
    fn money_is_formatted_from_minor_units_by_currency() {
        assert_eq!(format_money(money(1250, "EUR")), "EUR 12.50");
        assert_eq!(format_money(money(5, "EUR")), "EUR 0.05");
        assert_eq!(format_money(money(-5, "USD")), "USD -0.05");
        assert_eq!(format_money(money(0, "GBP")), "GBP 0.00");
        assert_eq!(format_money(money(1200, "JPY")), "JPY 1200");
        assert_eq!(format_money(money(1250, "KWD")), "KWD 1.250");
        assert_eq!(format_money(money(12345, "CLF")), "CLF 1.2345");
        assert_eq!(format_money(money(-5, "BHD")), "BHD -0.005");
        assert_eq!(format_money(money(7, "XYZ")), "XYZ 7 (minor units)");
        assert_eq!(
            format_money(money(i64::MAX, "EUR")),
            "EUR 92233720368547758.07"
        );
        assert_eq!(
            format_minor(i128::from(i64::MAX) * 3, Currency::new("EUR").unwrap()),
            "EUR 276701161105643274.21"
        );
    }

    #[test]
    fn addresses_print_line_by_line_without_empty_lines() {
        let a = Address {
            name: "Ada".into(),
            line1: "12 St James's Square".into(),
            line2: Some(" ".into()),
            city: "London".into(),
            postal_code: "SW1Y 4JH".into(),
            country: "GB".into(),
        };
        let v = AddressView::from(&a);
        assert_eq!(v.lines, vec!["12 St James's Square", "SW1Y 4JH London"]);
    }

    #[test]
    fn samples_cover_every_kind() {
        let kinds: std::collections::BTreeSet<_> =
            EmailView::samples().iter().map(EmailView::kind).collect();
        assert_eq!(kinds.len(), EmailKind::ALL.len());
    }
}
