//! The storefront simulator behind `orderfleet seed` and `orderfleet publish`: a deterministic
//! catalogue, a reproducible stream of storefront events, and the PutEvents publisher that puts
//! them on the bus the way the e-commerce platform would.
//!
//! Everything a run publishes is decided up front by [`plan_orders`] from a seed
//! ([`fastrand::Rng::with_seed`]), so the same seed gives the same customers, lines, tokens
//! and kinds of trouble. Only the identities differ between runs: every order id and event id
//! carries the run id, so a second run on the same database places new orders instead of
//! being absorbed as duplicates by the fleet's inbox.
//!
//! Putting them on the bus, and the bookkeeping of runs, are in [`bus`]. The simulator keeps a little bookkeeping of its own in `simulator_runs` (see
//! [`ensure_runs_table`]): how many orders each run published, so that `orderfleet wait`
//! knows what "all done" means.

pub mod bus;
pub mod platforms;

pub use bus::{ensure_runs_table, find_run, put_events, put_events_from, wait_for_inventory, Run};

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use chrono::Utc;
use serde::Serialize;
use serde_json::{json, Value};

use crate::domain::events::{
    Address, Currency, Customer, Event, Meta, Money, OrderCancellationRequested, OrderPlaced,
    PlacedLine, ProductUpserted, StockReceived,
};
use crate::providers::carrier::UNDELIVERABLE_POSTAL_CODE;
use crate::providers::payment::tokens;

/// PutEvents accepts at most this many entries per call.
pub const PUT_EVENTS_BATCH: usize = 10;

/// Default number of SKUs in the seeded catalogue.
pub const DEFAULT_SKUS: usize = 24;

/// Units a scarce SKU receives per seeding: few enough that a run of orders exhausts them.
pub const SCARCE_UNITS: i64 = 3;

/// Every `SCARCE_EVERY`-th SKU of the catalogue is scarce.
const SCARCE_EVERY: usize = 6;

/// One product of the simulated catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub category: &'static str,
    pub price: Money,
    /// Stocked with only [`SCARCE_UNITS`] units per seeding: orders for it run out.
    pub scarce: bool,
}

/// Base products, cycled (with an edition suffix) for catalogues larger than the list.
const PRODUCTS: &[(&str, &str, &str, i64)] = &[
    ("TEA", "Assam Breakfast Tea, 250 g", "tea", 895),
    ("TEA", "Darjeeling First Flush, 100 g", "tea", 1450),
    ("TEA", "Sencha Green Tea, 200 g", "tea", 1150),
    ("POT", "Cast Iron Teapot, 0.8 l", "teaware", 4900),
    ("CUP", "Stoneware Mug, Slate", "teaware", 1800),
    ("CUP", "Porcelain Cup and Saucer", "teaware", 2250),
    ("COF", "Ethiopia Yirgacheffe Beans, 250 g", "coffee", 1290),
    ("COF", "Colombia Huila Beans, 1 kg", "coffee", 3900),
    ("GRD", "Hand Coffee Grinder", "coffee gear", 6900),
    ("KET", "Gooseneck Kettle, 1 l", "coffee gear", 5490),
    ("FLT", "Paper Filters, 100 pack", "coffee gear", 690),
    ("HON", "Wildflower Honey, 500 g", "pantry", 990),
    ("BIS", "Shortbread Biscuits, 300 g", "pantry", 550),
    ("CHO", "Dark Chocolate 70%, 100 g", "pantry", 425),
    ("JAM", "Seville Orange Marmalade", "pantry", 675),
    ("TWL", "Linen Tea Towel", "home", 1500),
    ("CDL", "Soy Candle, Bergamot", "home", 2400),
    ("TRY", "Oak Serving Tray", "home", 3600),
    ("INF", "Steel Tea Infuser", "teaware", 850),
    ("SCL", "Coffee Scale with Timer", "coffee gear", 2990),
    ("JAR", "Airtight Storage Jar", "home", 1290),
    ("SPN", "Brass Measuring Spoon", "teaware", 790),
    ("SYR", "Vanilla Syrup, 250 ml", "pantry", 895),
    ("GFT", "Gift Card Sleeve", "home", 300),
];

fn eur() -> Currency {
    // Cannot fail: a literal, valid code.
    Currency::new("EUR").expect("EUR is a currency code")
}

fn usd() -> Currency {
    // Cannot fail: a literal, valid code.
    Currency::new("USD").expect("USD is a currency code")
}

/// The deterministic catalogue of `skus` products: the same SKUs, names and prices every time.
pub fn catalogue(skus: usize) -> Vec<Product> {
    (0..skus.max(1))
        .map(|i| {
            let (code, name, category, price) = PRODUCTS[i % PRODUCTS.len()];
            let edition = i / PRODUCTS.len();
            let name = if edition == 0 {
                name.to_string()
            } else {
                format!("{name} (edition {})", edition + 1)
            };
            Product {
                sku: format!("{code}-{:03}", i + 1),
                name,
                category,
                // Later editions cost a little more, so prices stay distinct.
                price: Money::new(price + 100 * edition as i64, eur()),
                scarce: i % SCARCE_EVERY == SCARCE_EVERY - 1,
            }
        })
        .collect()
}

/// A storefront event ready for PutEvents.
#[derive(Debug, Clone, PartialEq)]
pub struct StorefrontEvent {
    pub detail_type: &'static str,
    pub detail: Value,
}

impl StorefrontEvent {
    fn new<T: Event>(event: &T) -> Result<Self> {
        Ok(StorefrontEvent {
            detail_type: T::DETAIL_TYPE,
            detail: serde_json::to_value(event)
                .with_context(|| format!("encoding {}", T::DETAIL_TYPE))?,
        })
    }

    /// The `event_id` the storefront gave the event (the fleet's inbox key).
    pub fn event_id(&self) -> Option<&str> {
        self.detail.get("event_id").and_then(Value::as_str)
    }
}

/// The events that upsert `products` and give each `units` (scarce ones [`SCARCE_UNITS`]).
/// Event ids carry `run_id`: seeding twice adds the stock twice, as two deliveries from the
/// warehouse would.
pub fn seed_events(run_id: &str, products: &[Product], units: i64) -> Result<Vec<StorefrontEvent>> {
    let mut out = Vec::with_capacity(products.len() * 2);
    for p in products {
        let mut extra = serde_json::Map::new();
        extra.insert("category".into(), json!(p.category));
        extra.insert("status".into(), json!("active"));
        out.push(StorefrontEvent::new(&ProductUpserted {
            meta: Meta::with_id(format!("sf-{run_id}-product-{}", p.sku)),
            sku: p.sku.clone(),
            name: p.name.clone(),
            price: Some(p.price),
            extra,
        })?);
    }
    for p in products {
        out.push(StorefrontEvent::new(&StockReceived {
            meta: Meta::with_id(format!("sf-{run_id}-stock-{}", p.sku)),
            sku: p.sku.clone(),
            quantity: if p.scarce { SCARCE_UNITS } else { units },
        })?);
    }
    Ok(out)
}

/// Units each regular SKU needs so that `orders` orders only run short on scarce SKUs: at most
/// 3 lines of at most 3 units, spread over the regular SKUs, with a wide margin.
pub fn units_for(orders: usize, skus: usize) -> i64 {
    let regular = (skus - skus / SCARCE_EVERY).max(1);
    let per_sku = (orders * 9).div_ceil(regular) as i64;
    (2 * per_sku).max(100)
}

/// What the simulator meant an order to exercise. The outcome is the fleet's to decide (a
/// cancellation may lose the race against the shipment, a scarce SKU may still have stock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderKind {
    /// Valid, paid with an approving token, deliverable.
    Regular,
    /// `tok_decline`: the authorization is declined.
    CardDeclined,
    /// `tok_insufficient_funds`: declined too, with another code.
    InsufficientFunds,
    /// `tok_flaky_1`: the provider fails once per call, then approves (exercises retries).
    FlakyPayment,
    /// Asks for a scarce SKU: out of stock once its few units are gone.
    ScarceStock,
    /// Followed shortly by an `OrderCancellationRequested`.
    CancelRequested,
    /// Shipped to postal code 00000: the carrier returns it, the payment is refunded.
    Undeliverable,
    /// A line with quantity zero or below.
    InvalidQuantity,
    /// A SKU the catalogue does not have.
    UnknownSku,
    /// The customer has no email.
    MissingEmail,
    /// Lines in two currencies.
    MixedCurrencies,
    /// A total that does not fit in 64-bit minor units.
    TotalOverflow,
}

impl OrderKind {
    /// The kind as it appears in summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderKind::Regular => "regular",
            OrderKind::CardDeclined => "card_declined",
            OrderKind::InsufficientFunds => "insufficient_funds",
            OrderKind::FlakyPayment => "flaky_payment",
            OrderKind::ScarceStock => "scarce_stock",
            OrderKind::CancelRequested => "cancel_requested",
            OrderKind::Undeliverable => "undeliverable",
            OrderKind::InvalidQuantity => "invalid_quantity",
            OrderKind::UnknownSku => "unknown_sku",
            OrderKind::MissingEmail => "missing_email",
            OrderKind::MixedCurrencies => "mixed_currencies",
            OrderKind::TotalOverflow => "total_overflow",
        }
    }

    /// Whether the storefront sent something the fleet must reject at the edge.
    pub fn is_invalid(self) -> bool {
        matches!(
            self,
            OrderKind::InvalidQuantity
                | OrderKind::UnknownSku
                | OrderKind::MissingEmail
                | OrderKind::MixedCurrencies
                | OrderKind::TotalOverflow
        )
    }
}

/// The mix of kinds, in percent; the invalid share is split evenly across the invalid kinds.
const MIX: &[(OrderKind, u32)] = &[
    (OrderKind::Regular, 62),
    (OrderKind::CardDeclined, 5),
    (OrderKind::InsufficientFunds, 3),
    (OrderKind::FlakyPayment, 2),
    (OrderKind::ScarceStock, 8),
    (OrderKind::CancelRequested, 8),
    (OrderKind::Undeliverable, 4),
];
const INVALID_KINDS: [OrderKind; 5] = [
    OrderKind::InvalidQuantity,
    OrderKind::UnknownSku,
    OrderKind::MissingEmail,
    OrderKind::MixedCurrencies,
    OrderKind::TotalOverflow,
];

const FIRST_NAMES: &[&str] = &[
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
    "Ken",
    "Margaret",
    "Dennis",
    "Radia",
    "Tim",
    "Hedy",
    "Niklaus",
    "Katherine",
    "John",
    "Sophie",
    "Leslie",
    "Annie",
    "Guido",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Allen",
    "Thompson",
    "Hamilton",
    "Ritchie",
    "Perlman",
    "Berners-Lee",
    "Lamarr",
    "Wirth",
    "Johnson",
    "Backus",
    "Wilson",
    "Lamport",
    "Easley",
    "van Rossum",
];
/// (street, city, postal code, country)
const PLACES: &[(&str, &str, &str, &str)] = &[
    ("12 St James's Square", "London", "SW1Y 4JH", "GB"),
    ("Kurfürstendamm 21", "Berlin", "10719", "DE"),
    ("8 Rue de Rivoli", "Paris", "75004", "FR"),
    ("Herengracht 182", "Amsterdam", "1016 BR", "NL"),
    ("Calle de Alcalá 50", "Madrid", "28014", "ES"),
    ("Via del Corso 120", "Roma", "00186", "IT"),
    ("Mariahilfer Straße 77", "Wien", "1060", "AT"),
    ("Grafton Street 9", "Dublin", "D02 VF65", "IE"),
    ("Rua Augusta 140", "Lisboa", "1100-053", "PT"),
    ("Drottninggatan 33", "Stockholm", "111 51", "SE"),
];

/// The number of distinct simulated customers.
pub const CUSTOMERS: usize = 60;

fn customer(
    i: usize,
) -> (
    Customer,
    &'static (&'static str, &'static str, &'static str, &'static str),
) {
    let first = FIRST_NAMES[i % FIRST_NAMES.len()];
    let last = LAST_NAMES[(i / FIRST_NAMES.len() + i) % LAST_NAMES.len()];
    let local = format!("{first}.{last}")
        .to_lowercase()
        .replace([' ', '\''], "")
        .replace('-', ".");
    (
        Customer {
            id: format!("cus-{:04}", i + 1),
            email: Some(format!("{local}@example.com")),
            name: format!("{first} {last}"),
        },
        &PLACES[i % PLACES.len()],
    )
}

/// What [`plan_orders`] is asked for.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    pub orders: usize,
    pub seed: u64,
    /// Goes into every order id and event id.
    pub run_id: String,
    /// Only [`OrderKind::Regular`] orders (for the saga benchmark): every order takes the
    /// whole happy path.
    pub regular_only: bool,
}

/// A planned order: its id, its kind, and where its events sit in [`Plan::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedOrder {
    pub order_id: String,
    pub kind: OrderKind,
}

/// Everything one `publish` run sends, in order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub orders: Vec<PlannedOrder>,
    /// `OrderPlaced` events, with each cancellation a few orders after its order.
    pub events: Vec<StorefrontEvent>,
}

impl Plan {
    /// Orders per kind.
    pub fn counts(&self) -> BTreeMap<OrderKind, usize> {
        let mut counts = BTreeMap::new();
        for o in &self.orders {
            *counts.entry(o.kind).or_default() += 1;
        }
        counts
    }

    /// The prefix every order id of the run starts with.
    pub fn order_id_prefix(run_id: &str) -> String {
        format!("ord-{run_id}-")
    }
}

fn pick_kind(rng: &mut fastrand::Rng) -> OrderKind {
    let roll = rng.u32(0..100);
    let mut acc = 0;
    for &(kind, weight) in MIX {
        acc += weight;
        if roll < acc {
            return kind;
        }
    }
    INVALID_KINDS[rng.usize(0..INVALID_KINDS.len())]
}

/// Plans `cfg.orders` orders over `products`. Deterministic in `cfg.seed` (and `cfg.run_id`
/// for the ids); `placed_at` is the planning time.
pub fn plan_orders(cfg: &PlanConfig, products: &[Product]) -> Result<Plan> {
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let regular: Vec<&Product> = products.iter().filter(|p| !p.scarce).collect();
    let scarce: Vec<&Product> = products.iter().filter(|p| p.scarce).collect();
    if regular.is_empty() {
        bail!("the catalogue has no regular SKUs; seed at least 2 SKUs");
    }
    let now = Utc::now();
    let prefix = Plan::order_id_prefix(&cfg.run_id);
    let mut orders = Vec::with_capacity(cfg.orders);
    let mut events = Vec::with_capacity(cfg.orders + cfg.orders / 8);
    // Cancellations waiting to go out: (after this many more orders, event).
    let mut pending_cancels: Vec<(usize, StorefrontEvent)> = Vec::new();
    for n in 1..=cfg.orders {
        let mut kind = pick_kind(&mut rng);
        if cfg.regular_only || (kind == OrderKind::ScarceStock && scarce.is_empty()) {
            kind = OrderKind::Regular;
        }
        let order_id = format!("{prefix}{n:05}");
        let (mut customer, place) = customer(rng.usize(0..CUSTOMERS));
        // 1 to 3 distinct regular SKUs, mostly one unit each.
        let line_count = [1, 1, 1, 2, 2, 3][rng.usize(0..6)].min(regular.len());
        let mut picked: Vec<&Product> = Vec::with_capacity(line_count);
        while picked.len() < line_count {
            let p = regular[rng.usize(0..regular.len())];
            if !picked.iter().any(|q| q.sku == p.sku) {
                picked.push(p);
            }
        }
        let mut lines: Vec<PlacedLine> = picked
            .iter()
            .map(|p| PlacedLine {
                sku: p.sku.clone(),
                quantity: [1, 1, 1, 2, 3][rng.usize(0..5)],
                unit_price: p.price,
            })
            .collect();
        let mut token = if rng.bool() {
            "tok_visa"
        } else {
            "tok_mastercard"
        }
        .to_string();
        let (street, city, mut postal_code, country) = *place;
        match kind {
            OrderKind::Regular | OrderKind::CancelRequested => {}
            OrderKind::CardDeclined => token = tokens::DECLINE.into(),
            OrderKind::InsufficientFunds => token = tokens::INSUFFICIENT_FUNDS.into(),
            OrderKind::FlakyPayment => token = format!("{}1", tokens::FLAKY_PREFIX),
            OrderKind::ScarceStock => {
                let p = scarce[rng.usize(0..scarce.len())];
                lines[0] = PlacedLine {
                    sku: p.sku.clone(),
                    quantity: rng.i64(1..=2),
                    unit_price: p.price,
                };
            }
            OrderKind::Undeliverable => postal_code = UNDELIVERABLE_POSTAL_CODE,
            OrderKind::InvalidQuantity => lines[0].quantity = -rng.i64(0..=1),
            OrderKind::UnknownSku => lines[0].sku = format!("DISCONTINUED-{n:05}"),
            OrderKind::MissingEmail => customer.email = None,
            OrderKind::MixedCurrencies => lines.push(PlacedLine {
                sku: regular[0].sku.clone(),
                quantity: 1,
                unit_price: Money::new(regular[0].price.amount_minor, usd()),
            }),
            OrderKind::TotalOverflow => lines[0].quantity = i64::MAX / 2,
        }
        events.push(StorefrontEvent::new(&OrderPlaced {
            meta: Meta::with_id(format!("sf-{}-placed-{n:05}", cfg.run_id)),
            order_id: order_id.clone(),
            shipping_address: Address {
                name: customer.name.clone(),
                line1: street.into(),
                line2: None,
                city: city.into(),
                postal_code: postal_code.into(),
                country: country.into(),
            },
            customer,
            lines,
            payment_token: token,
            placed_at: now,
            order_number: None,
            platform: None,
            charges: Default::default(),
        })?);
        // Release the cancellations that are due after this order.
        let mut still_pending = Vec::with_capacity(pending_cancels.len());
        for (after, event) in pending_cancels.drain(..) {
            if after == 0 {
                events.push(event);
            } else {
                still_pending.push((after - 1, event));
            }
        }
        pending_cancels = still_pending;
        if kind == OrderKind::CancelRequested {
            let reason =
                ["changed my mind", "ordered by mistake", "found it cheaper"][rng.usize(0..3)];
            let event = StorefrontEvent::new(&OrderCancellationRequested {
                meta: Meta::with_id(format!("sf-{}-cancel-{n:05}", cfg.run_id)),
                order_id: order_id.clone(),
                reason: reason.into(),
            })?;
            // "Shortly after": right away, or after up to three more orders.
            pending_cancels.push((rng.usize(0..4), event));
        }
        orders.push(PlannedOrder { order_id, kind });
    }
    events.extend(pending_cancels.into_iter().map(|(_, e)| e));
    Ok(Plan { orders, events })
}

/// A fresh run id: 8 hex digits, unique enough to keep runs on one database apart.
pub fn new_run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_is_the_same_every_time_and_has_scarce_skus() {
        let a = catalogue(30);
        assert_eq!(a, catalogue(30));
        assert_eq!(a.len(), 30);
        assert_eq!(a[0].sku, "TEA-001");
        assert!(a.iter().any(|p| p.scarce));
        let mut skus: Vec<&str> = a.iter().map(|p| p.sku.as_str()).collect();
        skus.dedup();
        assert_eq!(skus.len(), 30, "SKUs are unique");
    }

    #[test]
    fn a_plan_is_reproducible_from_its_seed() {
        let products = catalogue(DEFAULT_SKUS);
        let cfg = PlanConfig {
            orders: 300,
            seed: 7,
            run_id: "r1".into(),
            regular_only: false,
        };
        let a = plan_orders(&cfg, &products).unwrap();
        let b = plan_orders(&cfg, &products).unwrap();
        assert_eq!(a.orders, b.orders);
        let strip = |p: &Plan| {
            p.events
                .iter()
                .map(|e| {
                    let mut d = e.detail.clone();
                    d.as_object_mut().unwrap().remove("placed_at");
                    (e.detail_type, d)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&a), strip(&b));
        let other = plan_orders(&PlanConfig { seed: 8, ..cfg }, &products).unwrap();
        assert_ne!(a.orders, other.orders);
    }

    #[test]
    fn a_plan_mixes_every_kind_and_cancels_only_its_own_orders() {
        let products = catalogue(DEFAULT_SKUS);
        let cfg = PlanConfig {
            orders: 2000,
            seed: 1,
            run_id: "r2".into(),
            regular_only: false,
        };
        let plan = plan_orders(&cfg, &products).unwrap();
        let counts = plan.counts();
        for &(kind, _) in MIX {
            assert!(counts.get(&kind).copied().unwrap_or(0) > 0, "{kind:?}");
        }
        for kind in INVALID_KINDS {
            assert!(counts.get(&kind).copied().unwrap_or(0) > 0, "{kind:?}");
        }
        let placed = plan
            .events
            .iter()
            .filter(|e| e.detail_type == "OrderPlaced")
            .count();
        let cancels = plan
            .events
            .iter()
            .filter(|e| e.detail_type == "OrderCancellationRequested")
            .count();
        assert_eq!(placed, 2000);
        assert_eq!(cancels, counts[&OrderKind::CancelRequested]);
        // Every cancellation follows its order.
        for (i, e) in plan.events.iter().enumerate() {
            if e.detail_type == "OrderCancellationRequested" {
                let id = &e.detail["order_id"];
                assert!(plan.events[..i]
                    .iter()
                    .any(|p| p.detail_type == "OrderPlaced" && &p.detail["order_id"] == id));
            }
        }
        assert!(plan
            .orders
            .iter()
            .all(|o| o.order_id.starts_with("ord-r2-")));
    }

    #[test]
    fn regular_skus_get_enough_units_for_the_run() {
        assert_eq!(units_for(10, DEFAULT_SKUS), 100);
        assert!(units_for(10_000, DEFAULT_SKUS) >= 10_000 * 9 / 20);
    }
}
