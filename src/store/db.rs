//! PostgreSQL: the connection pool and the versioned migrations.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use deadpool_postgres::{
    GenericClient, Hook, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime,
};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The migrations, in order. Each runs in its own transaction and is recorded in
/// `schema_migrations`; a version that is already recorded is skipped.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "spine", include_str!("../../migrations/0001_spine.sql")),
    (
        2,
        "inventory",
        include_str!("../../migrations/0002_inventory.sql"),
    ),
    (
        3,
        "orders",
        include_str!("../../migrations/0003_orders.sql"),
    ),
    (
        4,
        "payments",
        include_str!("../../migrations/0004_payments.sql"),
    ),
    (
        5,
        "emails",
        include_str!("../../migrations/0005_emails.sql"),
    ),
    (
        6,
        "lake_and_personalization",
        include_str!("../../migrations/0006_personalization.sql"),
    ),
    (
        7,
        "payment_attempts",
        include_str!("../../migrations/0007_payment_attempts.sql"),
    ),
    (
        8,
        "hot_updates",
        include_str!("../../migrations/0008_hot_updates.sql"),
    ),
    (
        9,
        "inbox_retention",
        include_str!("../../migrations/0009_inbox_retention.sql"),
    ),
    (
        10,
        "inbox_detail_type",
        include_str!("../../migrations/0010_inbox_detail_type.sql"),
    ),
    (
        11,
        "outbox_dead_letters",
        include_str!("../../migrations/0011_outbox_dead_letters.sql"),
    ),
    (
        12,
        "shipping",
        include_str!("../../migrations/0012_shipping.sql"),
    ),
    (
        13,
        "payment_methods",
        include_str!("../../migrations/0013_payment_methods.sql"),
    ),
    (
        14,
        "customer_erasures",
        include_str!("../../migrations/0014_customer_erasures.sql"),
    ),
    (
        15,
        "worker_roles",
        include_str!("../../migrations/0015_worker_roles.sql"),
    ),
    (
        16,
        "narrower_grants",
        include_str!("../../migrations/0016_narrower_grants.sql"),
    ),
    (
        17,
        "platforms",
        include_str!("../../migrations/0017_platforms.sql"),
    ),
    (
        18,
        "operator_actions",
        include_str!("../../migrations/0018_operator_actions.sql"),
    ),
    (
        19,
        "email_deliverability",
        include_str!("../../migrations/0019_email_deliverability.sql"),
    ),
    (
        20,
        "outbox_by_source",
        include_str!("../../migrations/0020_outbox_by_source.sql"),
    ),
    (
        21,
        "outbox_claims",
        include_str!("../../migrations/0021_outbox_claims.sql"),
    ),
];

/// The TLS connector. TLS is negotiated as the URL's `sslmode` says (libpq's default, `prefer`,
/// uses it when the server offers it; `require` insists). Certificates are verified against
/// Mozilla's roots plus the PEM bundle in `PGSSLROOTCERT`, as libpq does: RDS's CA is not a
/// public one, so production sets `PGSSLROOTCERT` to the RDS bundle and `sslmode=require`.
fn tls() -> Result<MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = std::env::var_os("PGSSLROOTCERT") {
        let certs = CertificateDer::pem_file_iter(&path)
            .with_context(|| format!("reading PGSSLROOTCERT {}", path.to_string_lossy()))?;
        for cert in certs {
            roots
                .add(cert.context("PGSSLROOTCERT holds an invalid certificate")?)
                .context("PGSSLROOTCERT holds an unusable certificate")?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS configuration")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Builds a pool for `url` with at most `max_size` connections. Connections are opened lazily,
/// so this does not fail when the database is down; the first query does.
pub fn pool(url: &str, max_size: usize) -> Result<Pool> {
    build_pool(url, max_size, None)
}

/// [`pool`], each connection taking `role` (`SET ROLE`) as it is made: for a login that is a
/// member of several of the fleet's roles (migration 0015) and must act as one of them, as the
/// tests do to run each handler with its own grants.
pub fn pool_as(url: &str, max_size: usize, role: &str) -> Result<Pool> {
    build_pool(url, max_size, Some(role.to_string()))
}

fn build_pool(url: &str, max_size: usize, role: Option<String>) -> Result<Pool> {
    let mut config = tokio_postgres::Config::from_str(url)
        .with_context(|| "DATABASE_URL is not a valid PostgreSQL URL".to_string())?;
    if config.get_application_name().is_none() {
        config.application_name("orderfleet");
    }
    config.connect_timeout(Duration::from_secs(5));
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    // A Unix-domain socket has no server name to verify, and the TLS connector rejects a path
    // as one before `sslmode` is even looked at, so socket-only URLs connect without TLS.
    let unix_only = !config.get_hosts().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)));
    let manager = if unix_only {
        Manager::from_config(config, tokio_postgres::NoTls, manager_config)
    } else {
        Manager::from_config(config, tls()?, manager_config)
    };
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .post_create(Hook::async_fn(move |client, _| {
            let role = role.clone();
            Box::pin(async move {
                watch_for_a_closed_client(client).await;
                if let Some(role) = role {
                    client
                        .batch_execute(&format!("SET ROLE {}", quote_ident(&role)))
                        .await
                        .map_err(deadpool_postgres::HookError::Backend)?;
                }
                Ok(())
            })
        }))
        .build()
        .context("building the database pool")
}

/// The database role of `handler`'s worker (migration 0015).
pub fn worker_role(handler: crate::domain::names::HandlerName) -> String {
    format!("orderfleet_{handler}")
}

/// Lets `role` log in with `password`. Run by `orderfleet migrate --login-for` as the owner;
/// the password is a generated secret, quoted as a literal (ALTER ROLE takes no parameters).
pub async fn allow_login(pool: &Pool, role: &str, password: &str) -> Result<()> {
    if password.contains(['\0', '\\']) {
        anyhow::bail!("the login password may not hold a NUL or a backslash");
    }
    let client = pool.get().await.context("connecting to set a login")?;
    let role_ident = quote_ident(role);
    let literal = format!("'{}'", password.replace('\'', "''"));
    client
        .batch_execute(&format!(
            "ALTER ROLE {role_ident} WITH LOGIN PASSWORD {literal}"
        ))
        .await
        .with_context(|| format!("letting {role} log in"))?;
    Ok(())
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// How often a backend checks, while it runs a statement or waits for a lock, that its client
/// is still there.
pub const CLIENT_CHECK_INTERVAL: &str = "1s";

/// Asks the server to notice when this connection's client goes away mid-statement.
///
/// A handler that times out or panics has its connection closed (see [`OpenTransaction`]), but
/// a backend blocked in a lock wait does not read its socket: without this check it would stay
/// behind, holding its own locks and a connection slot, until the lock it waits for is
/// released. `client_connection_check_interval` (PostgreSQL 14 and later) makes it poll the
/// socket and end. An older server refuses the setting; the connection is used anyway.
async fn watch_for_a_closed_client(client: &tokio_postgres::Client) {
    let set = format!("SET client_connection_check_interval = '{CLIENT_CHECK_INTERVAL}'");
    if let Err(e) = client.batch_execute(&set).await {
        tracing::debug!(error = %e, "the server does not check for closed clients");
    }
}

/// Applies every migration not yet applied. Concurrent runs are serialised by an advisory lock.
/// Returns the versions it applied.
pub async fn migrate(pool: &Pool) -> Result<Vec<i32>> {
    let mut client = pool.get().await.context("connecting to the database")?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer     PRIMARY KEY,
                 name       text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .context("creating schema_migrations")?;
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        // Held until commit: a second migrator waits here, then sees the version recorded.
        tx.execute("SELECT pg_advisory_xact_lock(7355608)", &[])
            .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[&version],
            )
            .await?
            .is_some();
        if done {
            tx.rollback().await?;
            continue;
        }
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("applying migration {version} ({name})"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        tx.commit()
            .await
            .with_context(|| format!("committing migration {version} ({name})"))?;
        applied.push(version);
    }
    Ok(applied)
}

/// Queries by SQL text through the connection's statement cache.
///
/// `tokio_postgres` prepares a statement given as text on every call: an extra round trip and a
/// fresh parse and plan each time. These methods prepare each text once per connection
/// ([`GenericClient::prepare_cached`]) and reuse it, so a hot statement costs one round trip and,
/// after a few executions, PostgreSQL's cached plan. Use them for every statement that runs per
/// message; plain `query`/`execute` are for one-off and administrative statements.
#[async_trait::async_trait]
pub trait Cached {
    async fn query_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error>;
    async fn query_one_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error>;
    async fn query_opt_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error>;
    async fn execute_cached(&self, sql: &str, params: &[&(dyn ToSql + Sync)])
        -> Result<u64, Error>;
}

#[async_trait::async_trait]
impl<G: GenericClient + Sync> Cached for G {
    async fn query_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let statement = self.prepare_cached(sql).await?;
        self.query(&statement, params).await
    }

    async fn query_one_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        let statement = self.prepare_cached(sql).await?;
        self.query_one(&statement, params).await
    }

    async fn query_opt_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        let statement = self.prepare_cached(sql).await?;
        self.query_opt(&statement, params).await
    }

    async fn execute_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        let statement = self.prepare_cached(sql).await?;
        self.execute(&statement, params).await
    }
}

/// The connection a handler runs on, inside the transaction that
/// [`crate::runtime::execute`] opened on it. Handlers never commit or roll back themselves.
///
/// It is a plain connection rather than a `tokio_postgres::Transaction` so that `BEGIN` and
/// `COMMIT` can be pipelined with the statements next to them (a `Transaction` only exists
/// once its `BEGIN` has come back, and its commit consumes it); see [`OpenTransaction`].
pub type Tx = deadpool_postgres::Client;

/// A pooled connection with a transaction open on it, for [`crate::runtime::execute`].
///
/// Dropped without [`OpenTransaction::finished`] (the handler timed out, panicked or a
/// pipelined `BEGIN` failed), the connection is taken out of the pool and closed, so
/// PostgreSQL rolls the transaction back and the next user never finds it half done.
pub struct OpenTransaction {
    conn: Option<deadpool_postgres::Object>,
}

impl OpenTransaction {
    /// Wraps `conn`; the caller sends `BEGIN` on it next.
    pub fn new(conn: deadpool_postgres::Object) -> Self {
        OpenTransaction { conn: Some(conn) }
    }

    /// The connection.
    pub fn tx(&self) -> &Tx {
        match &self.conn {
            Some(conn) => conn,
            None => unreachable!("an OpenTransaction has its connection until dropped"),
        }
    }

    /// The transaction ended (`COMMIT` or `ROLLBACK` came back): the connection may go back to
    /// the pool.
    pub fn finished(mut self) {
        drop(self.conn.take());
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Detached from the pool and dropped: the connection closes.
            drop(deadpool_postgres::Object::take(conn));
        }
    }
}
