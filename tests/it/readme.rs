//! The README stays true: every flag's environment variable and every command of both binaries
//! is documented in it.

use std::collections::BTreeSet;
use std::process::Command;

fn help(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{bin} {args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Subcommand names listed under "Commands:" in a help text.
fn subcommands(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

fn env_vars(text: &str, into: &mut BTreeSet<String>) {
    for part in text.split("[env: ").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        into.insert(name);
    }
}

/// Walks a binary's command tree, collecting env vars and command paths.
fn walk(bin: &str, path: Vec<String>, vars: &mut BTreeSet<String>, commands: &mut Vec<String>) {
    let args: Vec<&str> = path.iter().map(String::as_str).collect();
    let text = help(bin, &args);
    env_vars(&text, vars);
    for sub in subcommands(&text) {
        let mut p = path.clone();
        p.push(sub);
        commands.push(p.join(" "));
        walk(bin, p, vars, commands);
    }
}

#[test]
fn the_readme_documents_every_environment_variable_and_command() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut vars = BTreeSet::new();
    let mut commands = Vec::new();
    walk(
        env!("CARGO_BIN_EXE_orderfleet-worker"),
        vec![],
        &mut vars,
        &mut commands,
    );
    walk(
        env!("CARGO_BIN_EXE_orderfleet"),
        vec![],
        &mut vars,
        &mut commands,
    );
    let missing_vars: Vec<_> = vars
        .iter()
        .filter(|v| !readme.contains(v.as_str()))
        .collect();
    let missing_cmds: Vec<_> = commands
        .iter()
        .filter(|c| {
            !readme.contains(&format!("`orderfleet {c}"))
                && !readme.contains(&format!("`orderfleet-worker {c}"))
        })
        .collect();
    assert!(
        missing_vars.is_empty() && missing_cmds.is_empty(),
        "README.md does not mention these environment variables: {missing_vars:?}\nnor these commands: {missing_cmds:?}"
    );
}
