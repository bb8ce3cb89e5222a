//! What of an event may leave the fleet for the data lake, defined next to the catalogue.
//!
//! The lake is kept for years and read by analysts, so it holds no direct identifier of a
//! customer. Before an event is archived, [`Redactor::redact`] rewrites its `detail`:
//!
//! | field | in the lake |
//! |---|---|
//! | `payment_token` | dropped |
//! | `customer.email`, `customer.name` | a keyed hash ([`Redactor::pseudonym`]) |
//! | `customer.id` | kept (the store's own opaque id) |
//! | `shipping_address` | `country` and `postal_prefix` (the postal code's first three characters) |
//!
//! The hash is HMAC-SHA256 under a key the lake's readers do not have
//! (`ORDERFLEET_LAKE_HASH_KEY`, from Secrets Manager in production), so the same customer
//! hashes the same way in every event and year (analysis can still count returning customers)
//! while nobody can test a guessed email against the lake without the key. Every payload of
//! the catalogue carries customer data only in these fields (`customer`, `shipping_address`,
//! `payment_token`, at the top of `detail`); `tests/it/analytics_lake.rs` reads the lake back
//! and finds no token, email address or street line.

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::domain::mask;

/// The shortest key accepted, in bytes: a key is a secret, not a password.
pub const MIN_KEY_BYTES: usize = 32;

/// Characters of a postal code the lake keeps: a region, not a street.
pub const POSTAL_PREFIX_CHARS: usize = 3;

/// Rewrites event details for the lake under one key.
#[derive(Clone)]
pub struct Redactor {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redactor { key: <secret> }")
    }
}

/// A key too short to be a secret.
#[derive(Debug, thiserror::Error)]
#[error("the lake hash key is {0} bytes; it must be at least {MIN_KEY_BYTES} (a random secret, e.g. `openssl rand -hex 32`)")]
pub struct WeakKey(pub usize);

impl Redactor {
    pub fn new(key: &[u8]) -> Result<Self, WeakKey> {
        if key.len() < MIN_KEY_BYTES {
            return Err(WeakKey(key.len()));
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| WeakKey(key.len()))?;
        Ok(Redactor { mac })
    }

    /// The keyed hash of `value`, case and surrounding space ignored (`Ada@Example.com ` and
    /// `ada@example.com` are one customer): `hmac-sha256:` and the first 16 bytes in hex.
    pub fn pseudonym(&self, value: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(value.trim().to_lowercase().as_bytes());
        let digest = mac.finalize().into_bytes();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("hmac-sha256:{hex}")
    }

    /// `detail` as the lake may keep it (see the module doc).
    pub fn redact(&self, detail: &Value) -> Value {
        let Some(fields) = detail.as_object() else {
            return detail.clone();
        };
        let mut out = Map::with_capacity(fields.len());
        for (name, value) in fields {
            match name.as_str() {
                "payment_token" => {}
                "customer" => {
                    out.insert(name.clone(), self.customer(value));
                }
                "shipping_address" => {
                    out.insert(name.clone(), address(value));
                }
                _ => {
                    out.insert(name.clone(), value.clone());
                }
            }
        }
        Value::Object(out)
    }

    fn customer(&self, value: &Value) -> Value {
        let Some(fields) = value.as_object() else {
            return Value::Null;
        };
        let mut out = Map::new();
        if let Some(id) = fields.get("id") {
            out.insert("id".into(), id.clone());
        }
        for key in ["email", "name"] {
            if let Some(text) = fields.get(key).and_then(Value::as_str) {
                if !text.trim().is_empty() {
                    out.insert(key.into(), Value::String(self.pseudonym(text)));
                }
            }
        }
        Value::Object(out)
    }
}

/// An address cut to its country and the start of its postal code.
fn address(value: &Value) -> Value {
    let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or("");
    let prefix: String = text("postal_code")
        .chars()
        .filter(|c| !c.is_whitespace())
        .take(POSTAL_PREFIX_CHARS)
        .collect::<String>()
        .to_uppercase();
    serde_json::json!({"country": text("country"), "postal_prefix": prefix})
}

/// `detail` as an operator's terminal may show it (`dlq peek`, a redrive's samples): no
/// token, customer emails masked ([`crate::domain::mask::mask`]), names and street lines
/// hidden; the rest (ids, lines, money, city, postal code, country) kept for debugging.
pub fn for_display(detail: &Value) -> Value {
    let mut out = detail.clone();
    let Some(fields) = out.as_object_mut() else {
        return out;
    };
    if fields.contains_key("payment_token") {
        fields.insert("payment_token".into(), Value::String(HIDDEN.into()));
    }
    if let Some(customer) = fields.get_mut("customer").and_then(Value::as_object_mut) {
        if let Some(email) = customer.get("email").and_then(Value::as_str) {
            let masked = mask::mask(email);
            customer.insert("email".into(), Value::String(masked));
        }
        hide(customer, "name");
    }
    if let Some(address) = fields
        .get_mut("shipping_address")
        .and_then(Value::as_object_mut)
    {
        for key in ["name", "line1", "line2"] {
            hide(address, key);
        }
    }
    out
}

/// A message body as a terminal may show it: an event's `detail` through [`for_display`],
/// anything else with its email addresses masked.
pub fn body_for_display(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(mut event) if event.get("detail").is_some_and(Value::is_object) => {
            event["detail"] = for_display(&event["detail"]);
            event.to_string()
        }
        _ => mask::emails_in(body),
    }
}

/// What stands for a hidden value on a terminal.
const HIDDEN: &str = "***";

fn hide(fields: &mut Map<String, Value>, key: &str) {
    if fields.get(key).is_some_and(|v| !v.is_null()) {
        fields.insert(key.into(), Value::String(HIDDEN.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn redactor() -> Redactor {
        Redactor::new(&[7u8; 32]).unwrap()
    }

    #[test]
    fn a_short_key_is_refused() {
        assert!(Redactor::new(b"secret").is_err());
    }

    #[test]
    fn tokens_go_identifiers_are_hashed_and_addresses_cut_to_a_region() {
        let r = redactor();
        let detail = json!({
            "version": 1, "order_id": "o-1", "payment_token": "tok_visa",
            "customer": {"id": "cus-1", "email": "ada@example.com", "name": "Ada Lovelace"},
            "shipping_address": {"name": "Ada Lovelace", "line1": "12 St James's Square",
                                 "city": "London", "postal_code": "sw1y 4jh", "country": "GB"},
            "total": {"amount_minor": 1250, "currency": "EUR"}
        });
        let out = r.redact(&detail);
        assert!(out.get("payment_token").is_none());
        assert_eq!(out["customer"]["id"], "cus-1");
        assert_eq!(out["customer"]["email"], r.pseudonym("ada@example.com"));
        assert_eq!(out["customer"]["name"], r.pseudonym("Ada Lovelace"));
        assert_eq!(
            out["shipping_address"],
            json!({"country": "GB", "postal_prefix": "SW1"})
        );
        assert_eq!(out["total"], detail["total"]);
        let text = out.to_string();
        for secret in ["tok_visa", "ada@example.com", "Lovelace", "James", "London"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }

    #[test]
    fn one_customer_hashes_the_same_way_and_another_key_hashes_differently() {
        let r = redactor();
        assert_eq!(
            r.pseudonym("Ada@Example.com "),
            r.pseudonym("ada@example.com")
        );
        assert_ne!(
            r.pseudonym("ada@example.com"),
            r.pseudonym("bob@example.com")
        );
        let other = Redactor::new(&[8u8; 32]).unwrap();
        assert_ne!(
            other.pseudonym("ada@example.com"),
            r.pseudonym("ada@example.com")
        );
    }

    #[test]
    fn a_terminal_sees_masked_emails_and_no_token() {
        let body = json!({"id": "e-1", "detail-type": "OrderPlaced", "detail": {
            "order_id": "o-1", "payment_token": "tok_visa",
            "customer": {"id": "cus-1", "email": "ada@example.com", "name": "Ada Lovelace"},
            "shipping_address": {"name": "Ada Lovelace", "line1": "12 St James's Square",
                                 "city": "London", "postal_code": "SW1Y 4JH", "country": "GB"}
        }})
        .to_string();
        let shown = body_for_display(&body);
        for secret in ["tok_visa", "ada@example.com", "Lovelace", "James"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("a***@example.com"), "{shown}");
        assert!(
            shown.contains("SW1Y 4JH") && shown.contains("cus-1"),
            "{shown}"
        );
        assert_eq!(
            body_for_display("not json, from bob@example.org"),
            "not json, from b***@example.org"
        );
    }
}
