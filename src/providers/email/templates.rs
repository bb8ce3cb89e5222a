//! The email templates: minijinja, one subject, one text and one HTML template per kind, plus
//! an HTML layout they extend.
//!
//! Where templates come from (decided once, at startup):
//!
//! 1. every template is built into the binary (`include_str!` of `templates/email/*.j2`), so
//!    an installed worker needs no files next to it;
//! 2. the `*.j2` files of a directory override the built-in ones name by name (and may add
//!    partials for them to include). The directory is `--email-templates-dir` when given, which
//!    must then exist; otherwise `templates/email` under the working directory when it exists,
//!    which is the repository's copy while developing.
//!
//! Templates are read once: editing one takes a restart. Each is rendered at startup with
//! [`EmailView::samples`] under strict undefined-variable checks, so a broken override fails
//! the start, not a customer's email. HTML templates (`*.html.j2`) are autoescaped; text ones
//! are not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use minijinja::{context, AutoEscape, Environment, UndefinedBehavior, Value};

use super::view::EmailView;
use super::EmailKind;

/// The directory tried when `--email-templates-dir` is not given.
pub const DEFAULT_DIR: &str = "templates/email";

/// The templates built into the binary, by file name.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "layout.html.j2",
        include_str!("../../../templates/email/layout.html.j2"),
    ),
    (
        "confirmation.subject.j2",
        include_str!("../../../templates/email/confirmation.subject.j2"),
    ),
    (
        "confirmation.txt.j2",
        include_str!("../../../templates/email/confirmation.txt.j2"),
    ),
    (
        "confirmation.html.j2",
        include_str!("../../../templates/email/confirmation.html.j2"),
    ),
    (
        "shipped.subject.j2",
        include_str!("../../../templates/email/shipped.subject.j2"),
    ),
    (
        "shipped.txt.j2",
        include_str!("../../../templates/email/shipped.txt.j2"),
    ),
    (
        "shipped.html.j2",
        include_str!("../../../templates/email/shipped.html.j2"),
    ),
    (
        "cancelled.subject.j2",
        include_str!("../../../templates/email/cancelled.subject.j2"),
    ),
    (
        "cancelled.txt.j2",
        include_str!("../../../templates/email/cancelled.txt.j2"),
    ),
    (
        "cancelled.html.j2",
        include_str!("../../../templates/email/cancelled.html.j2"),
    ),
    (
        "refunded.subject.j2",
        include_str!("../../../templates/email/refunded.subject.j2"),
    ),
    (
        "refunded.txt.j2",
        include_str!("../../../templates/email/refunded.txt.j2"),
    ),
    (
        "refunded.html.j2",
        include_str!("../../../templates/email/refunded.html.j2"),
    ),
    (
        "recommendations.subject.j2",
        include_str!("../../../templates/email/recommendations.subject.j2"),
    ),
    (
        "recommendations.txt.j2",
        include_str!("../../../templates/email/recommendations.txt.j2"),
    ),
    (
        "recommendations.html.j2",
        include_str!("../../../templates/email/recommendations.html.j2"),
    ),
];

/// One rendered email: a one-line subject, the text part and the HTML part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// The compiled templates.
pub struct Templates {
    env: Environment<'static>,
    /// The directory whose files override the built-in templates, if any.
    dir: Option<PathBuf>,
    /// The names taken from `dir`.
    overridden: Vec<String>,
}

impl Templates {
    /// The built-in templates alone.
    pub fn built_in() -> Result<Self> {
        Self::build(None, BTreeMap::new())
    }

    /// The built-in templates, overridden by the `*.j2` files of `dir` (see the module
    /// documentation for the default). Every kind is test-rendered before this returns.
    pub fn load(dir: Option<&Path>) -> Result<Self> {
        let dir = match dir {
            Some(dir) => {
                if !dir.is_dir() {
                    bail!(
                        "--email-templates-dir (ORDERFLEET_EMAIL_TEMPLATES_DIR) {} is not a \
                         directory; point it at a copy of the repository's templates/email, or \
                         leave it unset to use the templates built into the binary",
                        dir.display()
                    );
                }
                Some(dir.to_path_buf())
            }
            None => Some(PathBuf::from(DEFAULT_DIR)).filter(|d| d.is_dir()),
        };
        let mut files = BTreeMap::new();
        if let Some(dir) = &dir {
            let entries = std::fs::read_dir(dir)
                .with_context(|| format!("reading the email templates in {}", dir.display()))?;
            for entry in entries {
                let path = entry
                    .with_context(|| format!("reading the email templates in {}", dir.display()))?
                    .path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if !name.ends_with(".j2") || !path.is_file() {
                    continue;
                }
                let source = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the email template {}", path.display()))?;
                files.insert(name.to_string(), source);
            }
        }
        Self::build(dir, files)
    }

    fn build(dir: Option<PathBuf>, files: BTreeMap<String, String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html.j2") {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        // A misspelt variable is an error at startup, not an empty gap in a customer's email.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(true);
        let mut overridden = Vec::new();
        let mut names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        names.extend(files.keys().map(String::as_str));
        names.sort_unstable();
        names.dedup();
        for name in names {
            let source = match files.get(name) {
                Some(source) => {
                    overridden.push(name.to_string());
                    source.clone()
                }
                None => match BUILT_IN.iter().find(|(n, _)| *n == name) {
                    Some((_, source)) => source.to_string(),
                    None => continue,
                },
            };
            env.add_template_owned(name.to_string(), source)
                .with_context(|| format!("compiling the email template {name}"))?;
        }
        let templates = Templates {
            env,
            dir,
            overridden,
        };
        for sample in EmailView::samples() {
            templates
                .render(&sample, "orderfleet shop")
                .with_context(|| {
                    format!(
                        "the {} email templates ({}) do not render",
                        sample.kind(),
                        templates.origin()
                    )
                })?;
        }
        Ok(templates)
    }

    /// Where the templates came from, e.g. `built-in` or `built-in, 3 from templates/email`.
    pub fn origin(&self) -> String {
        match &self.dir {
            Some(dir) if !self.overridden.is_empty() => format!(
                "built-in, {} overridden from {}",
                self.overridden.len(),
                dir.display()
            ),
            _ => "built-in".to_string(),
        }
    }

    /// Renders the subject, text and HTML of `view`. `shop` is the shop's name for the
    /// signature (the sender's display name).
    pub fn render(&self, view: &EmailView, shop: &str) -> Result<Rendered, minijinja::Error> {
        let kind = view.kind();
        let ctx = context! { shop => shop, ..Value::from_serialize(view) };
        let part = |suffix: &str| {
            self.env
                .get_template(&format!("{}.{suffix}", kind.as_str()))?
                .render(&ctx)
        };
        let subject = part("subject.j2")?;
        Ok(Rendered {
            subject: one_line(&subject),
            text: part("txt.j2")?,
            html: part("html.j2")?,
        })
    }

    /// The names of every template, for tests and diagnostics.
    pub fn names(&self) -> Vec<String> {
        self.env
            .templates()
            .map(|(name, _)| name.to_string())
            .collect()
    }
}

/// Collapses a rendered subject to one line of single spaces.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The template names a kind needs.
pub fn names_for(kind: EmailKind) -> [String; 3] {
    ["subject.j2", "txt.j2", "html.j2"].map(|suffix| format!("{}.{suffix}", kind.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::email::view::{Cancelled, MoneyOutcome};

    #[test]
    fn every_kind_has_built_in_templates_that_render() {
        let t = Templates::built_in().unwrap();
        let names = t.names();
        for kind in EmailKind::ALL {
            for name in names_for(kind) {
                assert!(names.contains(&name), "{name} missing");
            }
        }
        for sample in EmailView::samples() {
            let r = t.render(&sample, "shop").unwrap();
            assert!(!r.subject.is_empty() && !r.subject.contains('\n'));
            assert!(r.text.contains("ord-sample"), "{}", r.text);
            assert!(r.html.contains("ord-sample"), "{}", r.html);
            assert!(r.html.contains("<html"), "{}", r.html);
        }
    }

    #[test]
    fn html_is_escaped_and_text_is_not() {
        let t = Templates::built_in().unwrap();
        let view = EmailView::Cancelled(Cancelled {
            order_id: "ord-<1>".into(),
            customer_name: "<script>alert(1)</script> & Co".into(),
            reason: "requested".into(),
            money: MoneyOutcome::AuthorizationVoided,
            amount: "EUR 1.00".into(),
        });
        let r = t.render(&view, "shop").unwrap();
        assert!(!r.html.contains("<script>"), "{}", r.html);
        assert!(r.html.contains("&lt;script&gt;"), "{}", r.html);
        assert!(
            r.text.contains("<script>alert(1)</script> & Co"),
            "{}",
            r.text
        );
    }

    #[test]
    fn a_directory_overrides_built_in_templates_by_name() {
        let dir = std::env::temp_dir().join(format!("of-tpl-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("shipped.subject.j2"),
            "On its way: {{ order_id }} via {{ carrier }}",
        )
        .unwrap();
        let t = Templates::load(Some(&dir)).unwrap();
        assert!(t.origin().contains("1 overridden"), "{}", t.origin());
        let shipped = EmailView::samples()
            .into_iter()
            .find(|v| v.kind() == EmailKind::Shipped)
            .unwrap();
        let r = t.render(&shipped, "shop").unwrap();
        assert_eq!(r.subject, "On its way: ord-sample via sandbox");

        // A broken override fails the load, naming the kind.
        std::fs::write(dir.join("refunded.txt.j2"), "{{ no_such_field }}").unwrap();
        let err = Templates::load(Some(&dir)).err().unwrap();
        assert!(format!("{err:#}").contains("refunded"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_templates_directory_names_the_flag() {
        let err = Templates::load(Some(Path::new("/nonexistent/orderfleet-templates")))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("--email-templates-dir"));
    }
}
