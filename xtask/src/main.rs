//! `cargo run -p xtask -- <task>`: the workspace's developer tasks.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use orderfleet::infra::topology::Topology;
use xtask::{cfn, template_path, TEMPLATE};

const USAGE: &str = "\
usage: cargo run -p xtask -- <task>

tasks:
  cfn            write the CloudFormation template, generated from the topology, to
                 deploy/cloudformation/orderfleet.json
  cfn --check    exit 1 if the committed template differs from the generated one";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["cfn"] => write_template(),
        ["cfn", "--check"] => check_template(),
        ["help" | "-h" | "--help"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_template() -> Result<()> {
    let path = template_path();
    std::fs::write(&path, cfn::render(&Topology::default()))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {TEMPLATE}");
    Ok(())
}

fn check_template() -> Result<()> {
    let path = template_path();
    let committed =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let generated = cfn::render(&Topology::default());
    if committed == generated {
        println!("{TEMPLATE} is up to date");
        return Ok(());
    }
    let line = committed
        .lines()
        .zip(generated.lines())
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()))
        + 1;
    bail!(
        "{TEMPLATE} differs from the template generated from the topology (first at line \
         {line}); regenerate it with `make cfn` (`cargo run -p xtask -- cfn`) and commit it"
    )
}
