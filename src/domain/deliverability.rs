//! Email deliverability: how an address is kept without keeping it, and the signed token of
//! the unsubscribe link.
//!
//! - [`AddressHasher`]: the keyed hash under which the suppression list stores an address
//!   (`hmac-sha256:` and 32 hex digits of HMAC-SHA256 of the trimmed, lower-cased address,
//!   the same construction as the lake's pseudonyms in [`crate::domain::redaction`], under a
//!   key of its own, `ORDERFLEET_EMAIL_HASH_KEY`). The list can answer "is this address
//!   suppressed?" for the worker that holds the key and the address, and nobody can read
//!   addresses out of it.
//! - [`UnsubscribeSigner`]: the token in a marketing email's unsubscribe link, naming the
//!   customer: `<customer id, base64url>.<HMAC-SHA256 of "orderfleet-unsubscribe:v1:" and the
//!   id, base64url>`, under `ORDERFLEET_UNSUBSCRIBE_KEY`. The fleet has no HTTP API: the
//!   shop's own page receives the link, checks the token the same way (the construction is
//!   documented in `docs/notifications.md`) and publishes `MarketingOptOut`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::domain::redaction::{Redactor, MIN_KEY_BYTES};

/// What the HMAC of an unsubscribe token covers before the customer id: a version, so that
/// the construction can change without old links being read as new ones.
const TOKEN_CONTEXT: &str = "orderfleet-unsubscribe:v1:";

/// A key too short to be a secret; `what` names the setting to change.
#[derive(Debug, thiserror::Error)]
#[error("{what} is {len} bytes; it must be at least {MIN_KEY_BYTES} (a random secret, e.g. `openssl rand -hex 32`)")]
pub struct WeakKey {
    pub what: &'static str,
    pub len: usize,
}

/// Hashes addresses for the suppression list.
#[derive(Clone, Debug)]
pub struct AddressHasher(Redactor);

impl AddressHasher {
    /// A hasher under `key` (ORDERFLEET_EMAIL_HASH_KEY), at least [`MIN_KEY_BYTES`] long.
    pub fn new(key: &[u8]) -> Result<Self, WeakKey> {
        Redactor::new(key).map(AddressHasher).map_err(|e| WeakKey {
            what: "ORDERFLEET_EMAIL_HASH_KEY",
            len: e.0,
        })
    }

    /// The keyed hash of `address`, case and surrounding space ignored.
    pub fn hash(&self, address: &str) -> String {
        self.0.pseudonym(address)
    }
}

/// Whether `text` has the shape of an [`AddressHasher::hash`] (an operator may name a
/// suppression by it instead of the address).
pub fn is_address_hash(text: &str) -> bool {
    text.strip_prefix("hmac-sha256:")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Why an unsubscribe token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not of the form <id>.<signature>")]
    Malformed,
    #[error("the token's signature does not match: it was altered, or signed under another key")]
    BadSignature,
}

/// Signs and checks unsubscribe tokens.
#[derive(Clone)]
pub struct UnsubscribeSigner {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for UnsubscribeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnsubscribeSigner { key: <secret> }")
    }
}

impl UnsubscribeSigner {
    /// A signer under `key` (ORDERFLEET_UNSUBSCRIBE_KEY), at least [`MIN_KEY_BYTES`] long.
    pub fn new(key: &[u8]) -> Result<Self, WeakKey> {
        let weak = WeakKey {
            what: "ORDERFLEET_UNSUBSCRIBE_KEY",
            len: key.len(),
        };
        if key.len() < MIN_KEY_BYTES {
            return Err(weak);
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| weak)?;
        Ok(UnsubscribeSigner { mac })
    }

    fn signature(&self, customer_id: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(TOKEN_CONTEXT.as_bytes());
        mac.update(customer_id.as_bytes());
        mac
    }

    /// The token naming `customer_id`. URL-safe: it goes into a query string as it is.
    pub fn sign(&self, customer_id: &str) -> String {
        let tag = self.signature(customer_id).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(customer_id.as_bytes()),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The customer id `token` names, if it was signed under this key (compared in constant
    /// time).
    pub fn verify(&self, token: &str) -> Result<String, TokenError> {
        let (id, tag) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
        let id = URL_SAFE_NO_PAD
            .decode(id)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|id| !id.is_empty())
            .ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        self.signature(&id)
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        Ok(id)
    }

    /// `base_url` with the token for `customer_id` added as the `token` query parameter.
    pub fn link(&self, base_url: &str, customer_id: &str) -> String {
        let separator = if base_url.contains('?') { '&' } else { '?' };
        format!("{base_url}{separator}token={}", self.sign(customer_id))
    }
}

/// The `token` query parameter of an unsubscribe link, as the shop's page would read it.
pub fn token_of_link(link: &str) -> Option<&str> {
    let (_, query) = link.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn addresses_hash_alike_whatever_their_case_and_the_key_matters() {
        let h = AddressHasher::new(KEY).unwrap();
        let a = h.hash(" Ada@Example.com ");
        assert_eq!(a, h.hash("ada@example.com"));
        assert!(is_address_hash(&a), "{a}");
        assert!(!a.contains("ada"));
        let other = AddressHasher::new(b"another key, also 32 bytes long!").unwrap();
        assert_ne!(a, other.hash("ada@example.com"));
        assert!(AddressHasher::new(b"short").is_err());
        assert!(!is_address_hash("ada@example.com"));
    }

    #[test]
    fn a_token_names_its_customer_and_any_change_is_refused() {
        let s = UnsubscribeSigner::new(KEY).unwrap();
        let token = s.sign("cust-7");
        assert_eq!(s.verify(&token), Ok("cust-7".to_string()));
        let (id, tag) = token.split_once('.').unwrap();
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode("cust-8"));
        assert_eq!(s.verify(&forged), Err(TokenError::BadSignature));
        assert_eq!(s.verify(id), Err(TokenError::Malformed));
        let other = UnsubscribeSigner::new(b"another key, also 32 bytes long!").unwrap();
        assert_eq!(other.verify(&token), Err(TokenError::BadSignature));
        let link = s.link("https://shop.example/unsubscribe?lang=en", "cust-7");
        assert_eq!(token_of_link(&link), Some(token.as_str()));
        assert!(link.starts_with("https://shop.example/unsubscribe?lang=en&token="));
    }
}
