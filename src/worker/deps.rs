//! What the handlers need from the process, and how the worker builds each one: the payment
//! provider and its attempt log, the carrier, the mailer, the Personalize tracker, and their
//! pools and flags.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use deadpool_postgres::Pool;

use crate::domain::events::Currency;
use crate::domain::names::HandlerName;
use crate::domain::platform::Platform;
use crate::handlers::{
    analytics, fulfillment, inventory, notifications, orders, payments, personalization,
    storefront, AnyHandler,
};
use crate::infra::aws::Clients;
use crate::providers::carrier::{Carrier, SandboxCarrier};
use crate::providers::payment::{PaymentProvider, SandboxProvider};
use crate::providers::platform::PlatformApi;

/// Settings the handlers themselves need (providers, carriers, transports).
#[derive(Debug, Clone, Args, Default)]
pub struct DepsArgs {
    /// Email settings of the notifications worker (transport, sender, templates).
    #[command(flatten)]
    pub email: crate::providers::email::EmailArgs,
    /// Latency the sandbox payment provider adds to every call, to imitate a real one.
    #[arg(
        long = "sandbox-payment-latency-ms",
        env = "ORDERFLEET_SANDBOX_PAYMENT_LATENCY_MS",
        default_value_t = 0
    )]
    pub sandbox_payment_latency_ms: u64,
    /// Database where the sandbox payment provider keeps its state, through a pool of its own
    /// (the worker defaults it to DATABASE_URL: a payment holds one connection for its
    /// transaction while the sandbox takes another, so sharing one pool could starve).
    #[arg(
        long = "sandbox-payment-database-url",
        env = "ORDERFLEET_SANDBOX_PAYMENT_DATABASE_URL",
        hide_env_values = true
    )]
    pub sandbox_payment_database_url: Option<String>,
    /// Connections of the sandbox payment provider's own pool.
    #[arg(
        long = "sandbox-payment-pool-size",
        env = "ORDERFLEET_SANDBOX_PAYMENT_POOL_SIZE",
        default_value_t = 8
    )]
    pub sandbox_payment_pool_size: usize,
    /// The Firehose delivery stream the analytics worker ships the lake to; default: the
    /// topology's `<prefix>-lake`.
    #[arg(long = "firehose-stream", env = "ORDERFLEET_FIREHOSE_STREAM")]
    pub firehose_stream: Option<String>,
    /// How long lake records gather before a PutRecordBatch when the shipper has caught up
    /// (full batches of 500 leave at once).
    #[arg(
        long = "lake-flush-ms",
        env = "ORDERFLEET_LAKE_FLUSH_MS",
        default_value_t = 1000
    )]
    pub lake_flush_ms: u64,
    /// The secret key under which the analytics worker pseudonymises customers in the lake
    /// (HMAC-SHA256, at least 32 bytes; see `crate::domain::redaction`). Required by the
    /// analytics worker; keep it as long as the lake, since a new key makes returning customers
    /// look new.
    #[arg(
        long = "lake-hash-key",
        env = "ORDERFLEET_LAKE_HASH_KEY",
        hide_env_values = true
    )]
    pub lake_hash_key: Option<String>,
    /// Amazon Personalize event tracker's tracking id: purchases are also sent to it with
    /// PutEvents. Empty or unset: not forwarded. (Its endpoint can be overridden with
    /// AWS_ENDPOINT_URL_PERSONALIZE_EVENTS.)
    #[arg(
        long = "personalize-tracking-id",
        env = "ORDERFLEET_PERSONALIZE_TRACKING_ID"
    )]
    pub personalize_tracking_id: Option<String>,
    /// The storefront worker's settings: which platforms it writes back to, and how.
    #[command(flatten)]
    pub platform: PlatformArgs,
}

/// commercetools' default region (the flags' defaults, also for [`PlatformArgs::default`]).
const CT_AUTH_URL: &str = "https://auth.europe-west1.gcp.commercetools.com";
const CT_API_URL: &str = "https://api.europe-west1.gcp.commercetools.com";

/// How the storefront worker talks back to the shop's commerce platform.
#[derive(Debug, Clone, Args)]
pub struct PlatformArgs {
    /// The shop's currency: the currency Shopify orders are charged in (an order whose
    /// shop money is another currency is poison).
    #[arg(
        long = "shop-currency",
        env = "ORDERFLEET_SHOP_CURRENCY",
        default_value = "USD"
    )]
    pub shop_currency: String,
    /// `sandbox`: write-back calls are recorded in the database (`sandbox_platform_calls`),
    /// nothing leaves the machine; `live`: they go to the platforms' APIs with the
    /// credentials below (a platform without credentials is refused at start).
    #[arg(
        long = "platform-api",
        env = "ORDERFLEET_PLATFORM_API",
        default_value = "sandbox",
        value_parser = ["sandbox", "live"]
    )]
    pub platform_api: String,
    /// Shopify Admin API access token of the shop's custom app (scopes: write_orders,
    /// write_merchant_managed_fulfillment_orders, read_products, read_inventory).
    #[arg(
        long = "shopify-access-token",
        env = "ORDERFLEET_SHOPIFY_ACCESS_TOKEN",
        hide_env_values = true
    )]
    pub shopify_access_token: Option<String>,
    /// Where the Shopify Admin API is; default `https://<shop>.myshopify.com` from each event.
    #[arg(long = "shopify-admin-url", env = "ORDERFLEET_SHOPIFY_ADMIN_URL")]
    pub shopify_admin_url: Option<String>,
    /// commercetools API client's client id (scopes: manage_orders, manage_payments).
    #[arg(
        long = "commercetools-client-id",
        env = "ORDERFLEET_COMMERCETOOLS_CLIENT_ID"
    )]
    pub commercetools_client_id: Option<String>,
    /// commercetools API client's secret.
    #[arg(
        long = "commercetools-client-secret",
        env = "ORDERFLEET_COMMERCETOOLS_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub commercetools_client_secret: Option<String>,
    /// commercetools authorization server, e.g. `https://auth.europe-west1.gcp.commercetools.com`.
    #[arg(
        long = "commercetools-auth-url",
        env = "ORDERFLEET_COMMERCETOOLS_AUTH_URL",
        default_value = CT_AUTH_URL
    )]
    pub commercetools_auth_url: String,
    /// commercetools HTTP API, e.g. `https://api.europe-west1.gcp.commercetools.com`.
    #[arg(
        long = "commercetools-api-url",
        env = "ORDERFLEET_COMMERCETOOLS_API_URL",
        default_value = CT_API_URL
    )]
    pub commercetools_api_url: String,
    /// The longest one write-back request may take.
    #[arg(
        long = "platform-timeout-ms",
        env = "ORDERFLEET_PLATFORM_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub platform_timeout_ms: u64,
}

impl Default for PlatformArgs {
    fn default() -> Self {
        PlatformArgs {
            shop_currency: "USD".into(),
            platform_api: "sandbox".into(),
            shopify_access_token: None,
            shopify_admin_url: None,
            commercetools_client_id: None,
            commercetools_client_secret: None,
            commercetools_auth_url: CT_AUTH_URL.into(),
            commercetools_api_url: CT_API_URL.into(),
            platform_timeout_ms: 10_000,
        }
    }
}

impl PlatformArgs {
    /// The write-back clients: the sandbox for both platforms, or the live APIs of those
    /// that have credentials.
    pub fn clients(&self, sandbox_pool: &Pool) -> Result<Vec<Arc<dyn PlatformApi>>> {
        use crate::providers::platform::{commercetools, http::JsonClient, shopify, Sandbox};
        let timeout = Duration::from_millis(self.platform_timeout_ms.max(1));
        if self.platform_api == "sandbox" {
            return Ok(Platform::ALL
                .into_iter()
                .map(|p| Arc::new(Sandbox::new(p, sandbox_pool.clone())) as Arc<dyn PlatformApi>)
                .collect());
        }
        let set = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        let mut clients: Vec<Arc<dyn PlatformApi>> = Vec::new();
        if let Some(token) = set(&self.shopify_access_token) {
            clients.push(Arc::new(shopify::Shopify::new(
                JsonClient::new(timeout),
                token,
                set(&self.shopify_admin_url),
            )));
        }
        if let (Some(client_id), Some(client_secret)) = (
            set(&self.commercetools_client_id),
            set(&self.commercetools_client_secret),
        ) {
            clients.push(Arc::new(commercetools::Commercetools::new(
                JsonClient::new(timeout),
                commercetools::Credentials {
                    auth_url: self
                        .commercetools_auth_url
                        .trim_end_matches('/')
                        .to_string(),
                    api_url: self.commercetools_api_url.trim_end_matches('/').to_string(),
                    client_id,
                    client_secret,
                },
            )));
        }
        if clients.is_empty() {
            anyhow::bail!(
                "--platform-api live needs a platform's credentials: \
                 ORDERFLEET_SHOPIFY_ACCESS_TOKEN, or ORDERFLEET_COMMERCETOOLS_CLIENT_ID and \
                 ORDERFLEET_COMMERCETOOLS_CLIENT_SECRET"
            );
        }
        Ok(clients)
    }
}

/// What handlers are built from: the pool, the AWS clients and their own settings.
#[derive(Clone)]
pub struct Deps {
    pub pool: Pool,
    pub clients: Clients,
    pub args: DepsArgs,
    /// The payment provider (the sandbox, keeping its state in `pool`'s database).
    pub payment_provider: Arc<dyn PaymentProvider>,
    /// Where payments records each provider call before making it, outside the handler's
    /// transaction (see [`crate::handlers::payments`]): the main database, through a pool of its own in the
    /// worker so that a payment holding one connection never waits on itself for a second.
    pub payment_attempts_pool: Pool,
    /// The parcel carrier (the sandbox, keeping its parcels in the sandbox payment provider's
    /// pool, of its own in the worker).
    pub carrier: Arc<dyn Carrier>,
    /// Builds and sends customer emails (notifications).
    pub mailer: Arc<crate::providers::email::Mailer>,
    /// The Amazon Personalize event tracker, when `--personalize-tracking-id` is set.
    pub personalize: Option<personalization::PersonalizeTracker>,
    /// The storefront worker's write-back clients, one per platform.
    pub platforms: Vec<Arc<dyn PlatformApi>>,
}

impl Deps {
    pub async fn new(args: &DepsArgs, pool: &Pool, clients: &Clients) -> Result<Self> {
        let sandbox_pool = match &args.sandbox_payment_database_url {
            Some(url) => crate::store::db::pool(url, args.sandbox_payment_pool_size.max(1))
                .context("--sandbox-payment-database-url")?,
            None => pool.clone(),
        };
        Ok(Deps {
            payment_attempts_pool: pool.clone(),
            pool: pool.clone(),
            clients: clients.clone(),
            args: args.clone(),
            payment_provider: Arc::new(SandboxProvider::new(
                sandbox_pool.clone(),
                Duration::from_millis(args.sandbox_payment_latency_ms),
            )),
            carrier: Arc::new(SandboxCarrier::new(sandbox_pool.clone())),
            mailer: Arc::new(
                crate::providers::email::Mailer::from_args(&args.email)
                    .await
                    .context("email settings")?,
            ),
            personalize: personalize_tracker(args).await,
            platforms: args.platform.clients(&sandbox_pool)?,
        })
    }

    /// The lake shipper the analytics worker needs running beside it (see [`crate::store::lake`]):
    /// to `--firehose-stream`, or else the topology's stream.
    pub fn lake_shipper(
        &self,
        topo: &crate::infra::topology::Topology,
    ) -> crate::store::lake::LakeShipper {
        crate::store::lake::LakeShipper::new(
            self.pool.clone(),
            self.clients.firehose.clone(),
            self.args
                .firehose_stream
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| topo.firehose_stream()),
            crate::store::lake::ShipperConfig {
                flush_interval: Duration::from_millis(self.args.lake_flush_ms.max(1)),
                ..crate::store::lake::ShipperConfig::default()
            },
        )
    }
}

/// The Personalize tracker from `--personalize-tracking-id`; the CloudFormation stack passes
/// an empty value to mean "none".
async fn personalize_tracker(args: &DepsArgs) -> Option<personalization::PersonalizeTracker> {
    let tracking_id = args
        .personalize_tracking_id
        .clone()
        .filter(|s| !s.trim().is_empty())?;
    let config = crate::infra::aws::sdk_config().await;
    Some(personalization::PersonalizeTracker {
        client: aws_sdk_personalizeevents::Client::new(&config),
        tracking_id,
    })
}

/// Builds the handler called `name`.
pub fn build(name: HandlerName, deps: &Deps) -> Result<Arc<dyn AnyHandler>> {
    match name {
        HandlerName::Orders => Ok(Arc::new(orders::Orders)),
        HandlerName::Inventory => Ok(Arc::new(inventory::Inventory)),
        HandlerName::Payments => Ok(Arc::new(payments::Payments::with_attempt_log(
            deps.payment_provider.clone(),
            deps.payment_attempts_pool.clone(),
        ))),
        // The intent to ship is committed outside the handler's transaction, like payments'
        // attempt log, through the same second pool.
        HandlerName::Fulfillment => Ok(Arc::new(fulfillment::Fulfillment::new(
            deps.carrier.clone(),
            deps.payment_attempts_pool.clone(),
        ))),
        HandlerName::Notifications => Ok(Arc::new(notifications::Notifications::new(
            deps.mailer.clone(),
        ))),
        HandlerName::Analytics => {
            let key = deps.args.lake_hash_key.as_deref().unwrap_or("");
            if key.is_empty() {
                anyhow::bail!(
                    "the analytics worker pseudonymises customers in the lake with a keyed hash: \
                     set ORDERFLEET_LAKE_HASH_KEY (or --lake-hash-key) to a secret of at least \
                     32 bytes, the same on every analytics worker and kept as long as the lake"
                );
            }
            let redactor = crate::domain::redaction::Redactor::new(key.as_bytes())
                .context("ORDERFLEET_LAKE_HASH_KEY")?;
            Ok(Arc::new(analytics::Analytics::new(redactor)))
        }
        HandlerName::Personalization => Ok(Arc::new(personalization::Personalization::new(
            deps.personalize.clone(),
        ))),
        // Write-back calls are recorded before they are made through the second pool, like
        // payments' attempts.
        HandlerName::Storefront => {
            let currency = Currency::new(deps.args.platform.shop_currency.trim())
                .map_err(|e| anyhow::anyhow!("ORDERFLEET_SHOP_CURRENCY: {e}"))?;
            Ok(Arc::new(storefront::Storefront::new(
                deps.platforms.clone(),
                currency,
                deps.payment_attempts_pool.clone(),
                Duration::from_millis(deps.args.platform.platform_timeout_ms.max(1)),
            )))
        }
    }
}
