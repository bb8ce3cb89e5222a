//! `orderfleet migrate`: applies pending migrations, and lets a worker's database role log in.

use std::process::ExitCode;

use anyhow::{bail, Result};

use crate::cli::DatabaseArg;
use crate::domain::names::HandlerName;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub db: DatabaseArg,
    /// After migrating, let HANDLER's database role (`orderfleet_<HANDLER>`, migration 0015)
    /// log in with the password in --login-password (idempotent; a new password rotates it).
    /// The stack's migrate container runs this for its own worker.
    #[arg(long = "login-for", value_name = "HANDLER")]
    pub login_for: Option<HandlerName>,
    /// The password for --login-for.
    #[arg(
        long = "login-password",
        env = "ORDERFLEET_DB_LOGIN_PASSWORD",
        hide_env_values = true
    )]
    pub login_password: Option<String>,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let pool = crate::store::db::pool(&args.db.database_url, 2)?;
    let applied = crate::store::db::migrate(&pool).await?;
    if applied.is_empty() {
        println!("migrate: schema is up to date");
    } else {
        println!("migrate: applied {applied:?}");
    }
    if let Some(handler) = args.login_for {
        let Some(password) = args.login_password.filter(|p| !p.is_empty()) else {
            bail!("--login-for {handler} needs --login-password (ORDERFLEET_DB_LOGIN_PASSWORD)");
        };
        let role = crate::store::db::worker_role(handler);
        crate::store::db::allow_login(&pool, &role, &password).await?;
        println!("migrate: {role} may log in");
    }
    Ok(ExitCode::SUCCESS)
}
