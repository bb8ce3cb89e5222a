//! `orderfleet migrate`: applies pending migrations.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::DatabaseArg;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub db: DatabaseArg,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let pool = crate::store::db::pool(&args.db.database_url, 2)?;
    let applied = crate::store::db::migrate(&pool).await?;
    if applied.is_empty() {
        println!("migrate: schema is up to date");
    } else {
        println!("migrate: applied {applied:?}");
    }
    Ok(ExitCode::SUCCESS)
}
