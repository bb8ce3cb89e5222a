//! The folders of `src/` draw the architecture, and the arrows point one way: a layer uses
//! only the layers below it. This reads every `use crate::` (and every other `crate::` path
//! outside comments) of every file and fails on an arrow that points up or sideways. The
//! order is the one `src/lib.rs` and the README's layout section describe.

use std::path::Path;

/// Top to bottom. Modules on one line are side by side and must not use each other.
const LAYERS: &[&[&str]] = &[
    &["worker", "cli"],
    &["operator"],
    &["runtime"],
    &["handlers"],
    &["providers"],
    &["store"],
    &["infra", "sqs"],
    &["telemetry"],
    &["domain"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level module a file under `src/` belongs to (`None` for `lib.rs` and `bin/`).
fn owner(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "bin").then(|| name.to_string())
}

fn rust_files(dir: &Path, into: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// Every `crate::<module>` a line of code names (comments skipped).
fn crate_paths(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("crate::")
        .filter(|(at, _)| {
            // `orderfleet_testkit::` or `my_crate::` are not this crate.
            !code[..*at].ends_with(|c: char| c.is_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            let rest = &code[at + "crate::".len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn every_module_of_src_is_in_one_layer_and_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut arrows = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let Some(from) = owner(relative) else {
            continue;
        };
        let from_rank = rank(&from).unwrap_or_else(|| {
            panic!(
                "src/{} is in no layer: add `{from}` to LAYERS",
                relative.display()
            )
        });
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for to in crate_paths(line) {
                if to == from {
                    continue;
                }
                match rank(to) {
                    Some(to_rank) if to_rank > from_rank => {}
                    _ => arrows.push(format!(
                        "src/{}:{}: {from} uses {to}: {}",
                        relative.display(),
                        n + 1,
                        line.trim()
                    )),
                }
            }
        }
    }
    assert!(
        arrows.is_empty(),
        "arrows pointing up or sideways:\n{}",
        arrows.join("\n")
    );
}

#[test]
fn the_layering_check_sees_an_arrow_that_points_up() {
    assert_eq!(
        crate_paths("use crate::runtime::lease::Leases; // crate::worker"),
        vec!["runtime"]
    );
    assert_eq!(
        crate_paths("use orderfleet_testkit::inproc;"),
        Vec::<&str>::new()
    );
    assert!(rank("runtime") < rank("store"));
    assert!(rank("domain") > rank("telemetry"));
}
