//! The worker image's Dockerfile: nothing it downloads goes into the image unverified.
//!
//! A remote `ADD` must carry `--checksum`; a `RUN` that fetches with `curl` or `wget` must check
//! what it fetched with `sha256sum -c` (or `sha512sum -c`) in the same step. The RDS CA bundle,
//! which decides whom the workers trust, is pinned by a build argument without a default.

use std::path::PathBuf;

fn dockerfile_path() -> PathBuf {
    xtask::workspace_root().join("deploy/docker/Dockerfile")
}

fn dockerfile() -> String {
    std::fs::read_to_string(dockerfile_path())
        .unwrap_or_else(|e| panic!("reading {}: {e}", dockerfile_path().display()))
}

/// The instructions of a Dockerfile, one string each: comment lines dropped, continuation lines
/// joined, a heredoc's body kept with the instruction that opens it.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut heredoc: Option<String> = None;
    for line in text.lines() {
        if let Some(end) = &heredoc {
            current.push('\n');
            current.push_str(line);
            if line.trim() == end {
                heredoc = None;
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        let trimmed = line.trim();
        // Docker drops comment lines and empty lines, inside a continuation too.
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if !current.is_empty() {
            current.push(' ');
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => current.push_str(head.trim_end()),
            None => {
                current.push_str(trimmed);
                heredoc = heredoc_end(trimmed);
                if heredoc.is_none() {
                    out.push(std::mem::take(&mut current));
                }
            }
        }
    }
    if !current.trim().is_empty() {
        out.push(current);
    }
    out
}

/// The terminator of a heredoc opened on `line` (`<<EOF`, `<<-EOF`, `<<"EOF"`), if any.
fn heredoc_end(line: &str) -> Option<String> {
    let start = line.find("<<")?;
    let word = line[start + 2..].trim_start_matches('-');
    let word: String = word
        .trim_start_matches(['"', '\''])
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!word.is_empty()).then_some(word)
}

/// Splits an `ADD`'s arguments into its flags (`--name=value`, quotes removed) and its sources
/// and destination, in either the shell form or the JSON form.
fn add_flags_and_args(args: &str) -> (Vec<String>, Vec<String>) {
    let mut flags = Vec::new();
    let mut rest = args.trim_start();
    while rest.starts_with("--") {
        let mut flag = String::new();
        let mut quote = None;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => flag.push(c),
                None if c == '"' || c == '\'' => quote = Some(c),
                None if c.is_whitespace() => {
                    end = i;
                    break;
                }
                None => flag.push(c),
            }
        }
        flags.push(flag);
        rest = rest[end..].trim_start();
    }
    let args = if rest.starts_with('[') {
        serde_json::from_str::<Vec<String>>(rest)
            .unwrap_or_else(|e| panic!("an ADD in JSON form that does not parse ({e}): {rest}"))
    } else {
        rest.split_whitespace().map(str::to_string).collect()
    };
    (flags, args)
}

fn is_http(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

fn is_remote(source: &str) -> bool {
    is_http(source) || source.starts_with("git@") || source.starts_with("ssh://")
}

/// Every download in `text` that goes unverified, as a message naming the instruction.
fn unverified_downloads(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for instruction in instructions(text) {
        let (keyword, args) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((instruction.as_str(), ""));
        let keyword = keyword.to_ascii_uppercase();
        match keyword.as_str() {
            "ADD" => {
                let (flags, args) = add_flags_and_args(args);
                let sources = &args[..args.len().saturating_sub(1)];
                if !sources.iter().any(|s| is_remote(s)) {
                    continue;
                }
                let checksum = flags
                    .iter()
                    .find_map(|f| f.strip_prefix("--checksum="))
                    .unwrap_or_default();
                let pinned = if sources.iter().any(|s| is_http(s)) {
                    checksum
                        .strip_prefix("sha256:")
                        .is_some_and(|hash| !hash.is_empty())
                } else {
                    !checksum.is_empty()
                };
                if !pinned {
                    problems.push(format!("remote ADD without --checksum: {instruction}"));
                }
            }
            "RUN" | "ONBUILD" => {
                let fetches = args
                    .split(|c: char| c.is_whitespace() || matches!(c, ';' | '&' | '|' | '(' | '`'))
                    .any(|word| matches!(word, "curl" | "wget"));
                let verifies = ["sha256sum", "sha512sum"].iter().any(|tool| {
                    args.contains(&format!("{tool} -c"))
                        || args.contains(&format!("{tool} --check"))
                });
                if fetches && !verifies {
                    problems.push(format!(
                        "download without a checksum check in the same step: {instruction}"
                    ));
                }
            }
            _ => {}
        }
    }
    problems
}

#[test]
fn nothing_the_image_downloads_goes_in_unverified() {
    let problems = unverified_downloads(&dockerfile());
    assert!(
        problems.is_empty(),
        "deploy/docker/Dockerfile fetches without verifying:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_download_check_catches_an_unpinned_add_curl_or_wget() {
    let unpinned = [
        "ADD https://example.com/ca.pem /etc/ca.pem",
        "ADD --chmod=0644 \\\n    https://example.com/ca.pem /etc/ca.pem",
        "ADD --checksum= https://example.com/ca.pem /etc/ca.pem",
        "ADD --checksum=sha256: https://example.com/ca.pem /etc/ca.pem",
        "ADD git@github.com:example/repo.git /src",
        "ADD [\"https://example.com/ca.pem\", \"/etc/ca.pem\"]",
        "RUN curl -fsSL https://example.com/tool -o /usr/local/bin/tool",
        "RUN apt-get update \\\n && wget -q https://example.com/tool.tgz",
        "RUN set -e; curl -fsSLO https://example.com/a.tgz",
        "RUN <<EOF\ncurl -fsSL https://example.com/tool -o /tool\nEOF",
    ];
    for text in unpinned {
        assert_eq!(
            unverified_downloads(text).len(),
            1,
            "this download should be caught:\n{text}"
        );
    }
    let pinned = [
        "ADD --checksum=sha256:0123abcd https://example.com/ca.pem /etc/ca.pem",
        "ADD --chmod=0644 --checksum=\"sha256:${CA_SHA256:?set it}\" \\\n    https://example.com/ca.pem /etc/ca.pem",
        "ADD --checksum=be1f38e git@github.com:example/repo.git /src",
        "RUN curl -fsSL https://example.com/t -o /t \\\n && echo \"0123abcd  /t\" | sha256sum -c -",
        "# RUN curl https://example.com/commented-out\nRUN true",
        "ADD ./local.pem /etc/ca.pem",
        "COPY --from=build /usr/local/bin/curl /usr/local/bin/",
    ];
    for text in pinned {
        assert_eq!(
            unverified_downloads(text),
            Vec::<String>::new(),
            "this should pass:\n{text}"
        );
    }
}

#[test]
fn the_rds_ca_bundle_is_pinned_by_a_build_argument_without_a_default() {
    let text = dockerfile();
    let instructions = instructions(&text);
    assert!(
        instructions
            .iter()
            .any(|i| i.split_whitespace().collect::<Vec<_>>() == ["ARG", "RDS_CA_BUNDLE_SHA256"]),
        "the Dockerfile must declare `ARG RDS_CA_BUNDLE_SHA256` with no default"
    );
    let add = instructions
        .iter()
        .find(|i| i.starts_with("ADD ") && i.contains("truststore.pki.rds.amazonaws.com"))
        .expect("an ADD of the RDS CA bundle");
    let (flags, _) = add_flags_and_args(&add["ADD ".len()..]);
    let checksum = flags
        .iter()
        .find_map(|f| f.strip_prefix("--checksum="))
        .expect("the bundle's ADD carries --checksum");
    // `:?` makes BuildKit stop with a message when the argument is missing or empty, instead of
    // failing on a malformed digest.
    assert!(
        checksum.starts_with("sha256:${RDS_CA_BUNDLE_SHA256:?"),
        "the bundle's checksum must be the build argument, required: {checksum}"
    );
}
