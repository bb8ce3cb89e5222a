//! The commerce platforms a shop can run on, as far as the bus is concerned: how their events
//! reach EventBridge (a partner event source per platform) and how one event is told from a
//! redelivered copy of it.
//!
//! | platform | partner event source | detail-type | dedup key |
//! |---|---|---|---|
//! | Shopify | `aws.partner/shopify.com/<app id>/<name>` | `shopifyWebhook` (topic in `detail.metadata`) | `X-Shopify-Webhook-Id` |
//! | commercetools | `aws.partner/commercetools.com/<project>/<subscription>` | the message type (`OrderCreated`, ...) | the message's `id` |

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A commerce platform the storefront handler connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Shopify,
    Commercetools,
}

impl Platform {
    pub const ALL: [Platform; 2] = [Platform::Shopify, Platform::Commercetools];

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Shopify => "shopify",
            Platform::Commercetools => "commercetools",
        }
    }

    /// What every partner event source of the platform starts with.
    pub fn source_prefix(self) -> &'static str {
        match self {
            Platform::Shopify => "aws.partner/shopify.com/",
            Platform::Commercetools => "aws.partner/commercetools.com/",
        }
    }

    /// The platform whose partner event source `source` is.
    pub fn of_source(source: &str) -> Option<Platform> {
        Platform::ALL
            .into_iter()
            .find(|p| source.starts_with(p.source_prefix()))
    }

    /// The platform a partner event source name belongs to, or why it is not one.
    pub fn of_partner_source(name: &str) -> Result<Platform, String> {
        Platform::of_source(name)
            .filter(|p| name.len() > p.source_prefix().len())
            .ok_or_else(|| {
                let prefixes: Vec<_> = Platform::ALL.iter().map(|p| p.source_prefix()).collect();
                format!(
                    "{name:?} is not a partner event source this fleet connects: expected a name \
                     starting with {}",
                    prefixes.join(" or ")
                )
            })
    }

    /// The event pattern of the rule on the platform's partner event bus: every event of the
    /// source. Topics the storefront does not translate are acknowledged and counted there,
    /// so that a topic subscribed on the platform side never sits in a DLQ.
    pub fn pattern(self, partner_source: &str) -> Value {
        json!({"source": [partner_source]})
    }

    /// The key that tells one platform event from a redelivered copy of it: the platform's
    /// own id, which every redelivery (and every EventBridge retry, each with a new EventBridge
    /// id) carries unchanged. `None` when the event lacks it.
    pub fn event_key(self, detail: &Value) -> Option<&str> {
        let key = match self {
            Platform::Shopify => {
                let metadata = detail.get("metadata")?;
                metadata
                    .get("X-Shopify-Webhook-Id")
                    .or_else(|| metadata.get("X-Shopify-Event-Id"))
            }
            Platform::Commercetools => detail.get("id"),
        };
        key.and_then(Value::as_str).filter(|s| !s.is_empty())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown platform {s:?}; expected shopify or commercetools"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partner_sources_name_their_platform() {
        assert_eq!(
            Platform::of_partner_source("aws.partner/shopify.com/1234/orderfleet"),
            Ok(Platform::Shopify)
        );
        assert_eq!(
            Platform::of_partner_source("aws.partner/commercetools.com/shop/orders"),
            Ok(Platform::Commercetools)
        );
        assert!(Platform::of_partner_source("aws.partner/shopify.com/").is_err());
        assert!(Platform::of_partner_source("orderfleet.storefront").is_err());
    }

    #[test]
    fn the_platforms_own_ids_are_the_dedup_keys() {
        let shopify = json!({"metadata": {"X-Shopify-Webhook-Id": "wh-1"}, "payload": {}});
        assert_eq!(Platform::Shopify.event_key(&shopify), Some("wh-1"));
        assert_eq!(Platform::Shopify.event_key(&json!({"payload": {}})), None);
        let ct = json!({"id": "msg-1", "type": "OrderCreated"});
        assert_eq!(Platform::Commercetools.event_key(&ct), Some("msg-1"));
    }
}
