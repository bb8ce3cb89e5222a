//! `orderfleet cfn`: prints the production CloudFormation template, generated from the topology.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::topology::Topology;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Write the template to this file instead of stdout
    /// (the committed copy: deploy/cloudformation/orderfleet.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let text = crate::deploy::render(&Topology::default());
    match args.out {
        Some(path) => std::fs::write(&path, text)
            .with_context(|| format!("writing the template to {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
