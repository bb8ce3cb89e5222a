//! The fleet's handlers by name: the key of the catalogue's routing, the topology's queues and
//! the worker's `--handler` flag.

use std::fmt;
use std::str::FromStr;

/// The workers of the fleet. Each has its own queue, DLQ and rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HandlerName {
    Orders,
    Inventory,
    Payments,
    Fulfillment,
    Notifications,
    Analytics,
    Personalization,
    /// The connector to the shop's commerce platform: translates the platform's webhooks
    /// (through an EventBridge partner event source) into the catalogue's storefront events,
    /// and tells the platform what the fleet did (shipped, cancelled, refunded).
    Storefront,
}

impl HandlerName {
    pub const ALL: [HandlerName; 8] = [
        HandlerName::Orders,
        HandlerName::Inventory,
        HandlerName::Payments,
        HandlerName::Fulfillment,
        HandlerName::Notifications,
        HandlerName::Analytics,
        HandlerName::Personalization,
        HandlerName::Storefront,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandlerName::Orders => "orders",
            HandlerName::Inventory => "inventory",
            HandlerName::Payments => "payments",
            HandlerName::Fulfillment => "fulfillment",
            HandlerName::Notifications => "notifications",
            HandlerName::Analytics => "analytics",
            HandlerName::Personalization => "personalization",
            HandlerName::Storefront => "storefront",
        }
    }

    /// The EventBridge `source` of the events this handler emits.
    pub fn source(self) -> String {
        format!("orderfleet.{}", self.as_str())
    }
}

impl fmt::Display for HandlerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HandlerName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HandlerName::ALL
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = HandlerName::ALL.iter().map(|h| h.as_str()).collect();
                format!(
                    "unknown handler {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}
