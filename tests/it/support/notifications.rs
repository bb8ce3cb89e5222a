//! Support for the notifications tests: a saga fleet with the notifications handler on a fresh
//! database, a real SMTP server (aiosmtpd) on a free port, parsing of `.eml` files with
//! Python's standard email parser, and readers of the `emails` table.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::support;
use chrono::Utc;
use deadpool_postgres::Pool;
use orderfleet::domain::events::{Address, Contact, Meta, OrderAccepted, OrderLine};
use orderfleet::domain::names::HandlerName;
use orderfleet::handlers::notifications::Notifications;
use orderfleet::providers::email::transport::FileOutbox;
use orderfleet::providers::email::{self, Mailer, Templates, Transport};
use orderfleet_testkit::inproc::Fleet;
use serde_json::Value;

/// The repository root (where `.venv` and `templates` are).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project virtualenv's Python, with a hint when it is missing.
pub fn python() -> PathBuf {
    let py = root().join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `bash scripts/stack.sh up` and `bash scripts/stack.sh tools`",
        py.display()
    );
    py
}

/// A directory of its own for this test, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(support::unique(prefix));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A mailer with the default sender and the built-in templates over `transport`.
pub fn mailer(transport: Arc<dyn Transport>) -> Arc<Mailer> {
    Arc::new(Mailer::new(
        email::parse_from(email::DEFAULT_FROM).unwrap(),
        Templates::built_in().unwrap(),
        transport,
    ))
}

/// A mailer writing `.eml` files into `dir`.
pub fn file_mailer(dir: &Path) -> Arc<Mailer> {
    mailer(Arc::new(FileOutbox::new(dir)))
}

/// The saga handlers plus notifications through `mailer`, on a fresh database.
pub async fn fleet(mailer: Arc<Mailer>) -> Fleet {
    let (pool, url) = support::fresh_db().await;
    support::saga::sandbox_fleet(pool, &url).with_handler(
        HandlerName::Notifications,
        Arc::new(Notifications::new(mailer)),
    )
}

/// Notifications alone through `mailer`, on a fresh database (events are delivered by hand).
pub async fn notifications_only(mailer: Arc<Mailer>) -> Fleet {
    let (pool, _) = support::fresh_db().await;
    Fleet::new(pool).with_handler(
        HandlerName::Notifications,
        Arc::new(Notifications::new(mailer)),
    )
}

/// An `OrderAccepted` for `order_id` to `email`, of one teapot and two cups, with its own event
/// id (so two of them are two events to the inbox).
pub fn accepted(order_id: &str, email: &str) -> OrderAccepted {
    OrderAccepted {
        meta: Meta::with_id(support::unique("acc-")),
        order_id: order_id.into(),
        customer: Contact {
            id: "cus-1".into(),
            email: email.into(),
            name: "Ada Lovelace".into(),
        },
        lines: vec![
            OrderLine {
                sku: "TEA-1".into(),
                quantity: 1,
                unit_price: support::saga::eur(1250),
            },
            OrderLine {
                sku: "CUP-1".into(),
                quantity: 2,
                unit_price: support::saga::eur(800),
            },
        ],
        total: support::saga::eur(2850),
        payment_token: Some("tok_visa".into()),
        shipping_address: Address {
            name: "Ada Lovelace".into(),
            line1: "12 St James's Square".into(),
            line2: None,
            city: "London".into(),
            postal_code: "SW1Y 4JH".into(),
            country: "GB".into(),
        },
        placed_at: Utc::now(),
        order_number: None,
        platform: None,
        charges: Default::default(),
    }
}

#[allow(unused_imports)]
pub use orderfleet_testkit::examples::envelope;

/// A row of `emails`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailRow {
    pub order_id: String,
    pub kind: String,
    pub status: String,
    pub recipient_masked: String,
    pub message_id: String,
    pub transport: String,
    pub error: Option<String>,
    pub provider_message_id: Option<String>,
    pub sent: bool,
}

/// Every row of `emails`, by order and kind.
pub async fn emails(pool: &Pool) -> Vec<EmailRow> {
    let c = pool.get().await.unwrap();
    c.query(
        "SELECT order_id, kind, status, recipient_masked, message_id, transport, error,
                provider_message_id, sent_at IS NOT NULL
           FROM emails ORDER BY order_id, kind",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| EmailRow {
        order_id: r.get(0),
        kind: r.get(1),
        status: r.get(2),
        recipient_masked: r.get(3),
        message_id: r.get(4),
        transport: r.get(5),
        error: r.get(6),
        provider_message_id: r.get(7),
        sent: r.get(8),
    })
    .collect()
}

/// The `.eml` files in `dir`, sorted by name.
pub fn eml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// A message as Python's standard email parser reads it (see `parse_eml.py`).
#[derive(Debug)]
pub struct Parsed {
    pub json: Value,
}

impl Parsed {
    /// A header's decoded value (names are case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.json["headers"][name.to_ascii_lowercase()].as_str()
    }

    pub fn content_type(&self) -> &str {
        self.json["content_type"].as_str().unwrap()
    }

    /// The decoded body of the first leaf part of `content_type`, with `\n` line ends.
    pub fn part(&self, content_type: &str) -> Option<String> {
        self.json["parts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["content_type"] == content_type)
            .map(|p| p["body"].as_str().unwrap().replace("\r\n", "\n"))
    }

    /// The leaf parts' content types, in order.
    pub fn part_types(&self) -> Vec<String> {
        self.json["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["content_type"].as_str().unwrap().to_string())
            .collect()
    }

    /// Every defect the parser found, in the message and its parts.
    pub fn defects(&self) -> Vec<String> {
        let mut all: Vec<String> = self.json["defects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect();
        for p in self.json["parts"].as_array().unwrap() {
            all.extend(
                p["defects"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_str().unwrap().to_string()),
            );
        }
        all
    }

    pub fn crlf_only(&self) -> bool {
        self.json["crlf_only"].as_bool().unwrap()
    }
}

/// Parses `raw` with Python's `email` package.
pub fn parse(raw: &[u8]) -> Parsed {
    use std::io::Write;
    let mut child = Command::new(python())
        .arg(root().join("tests/it/support/parse_eml.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(raw).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "parse_eml.py failed");
    Parsed {
        json: serde_json::from_slice(&out.stdout).unwrap(),
    }
}

/// Asserts what every email must be: a valid RFC 5322 message from the shop to `to`, with a
/// Message-ID, MIME-Version 1.0, and a multipart/alternative body of a text part then an HTML
/// part. Returns the parsed message.
pub fn assert_well_formed(raw: &[u8], to: &str) -> Parsed {
    let text = String::from_utf8_lossy(raw);
    let head = text.split("\r\n\r\n").next().unwrap();
    assert!(
        head.lines()
            .any(|l| l == "MIME-Version: 1.0\r" || l == "MIME-Version: 1.0"),
        "no MIME-Version in {head}"
    );
    let parsed = parse(raw);
    assert!(parsed.crlf_only(), "lines must end in CRLF");
    assert!(
        parsed.defects().is_empty(),
        "defects: {:?}",
        parsed.defects()
    );
    assert_eq!(
        parsed.header("From"),
        Some("orderfleet shop <orders@example.com>")
    );
    assert!(
        parsed.header("To").unwrap().contains(to),
        "To: {:?}",
        parsed.header("To")
    );
    assert!(parsed.header("Subject").is_some_and(|s| !s.is_empty()));
    assert!(parsed.header("Date").is_some());
    assert_eq!(parsed.header("Auto-Submitted"), Some("auto-generated"));
    assert_eq!(parsed.content_type(), "multipart/alternative");
    assert_eq!(parsed.part_types(), vec!["text/plain", "text/html"]);
    parsed
}

/// A real SMTP server (aiosmtpd, `smtp_sink.py`) on a free port, killed on drop.
pub struct SmtpSink {
    pub port: u16,
    pub dir: TempDir,
    _proc: support::Proc,
}

impl SmtpSink {
    /// Starts a server that accepts everything except recipients starting with `reject`.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `smtp_sink.py` arguments (`--throttle-first 1`, ...).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = TempDir::new("of-smtp-");
        let mut child = Command::new(python())
            .arg(root().join("tests/it/support/smtp_sink.py"))
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the SMTP sink (bash scripts/stack.sh tools installs aiosmtpd)");
        let stdout = child.stdout.take().unwrap();
        let proc = support::Proc(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .unwrap_or_else(|| panic!("the SMTP sink said {line:?}; is aiosmtpd installed?"))
            .parse()
            .unwrap();
        SmtpSink {
            port,
            dir,
            _proc: proc,
        }
    }

    /// The messages received so far: (raw bytes, envelope JSON).
    pub fn received(&self) -> Vec<(Vec<u8>, Value)> {
        eml_files(self.dir.path())
            .into_iter()
            .map(|p| {
                let raw = std::fs::read(&p).unwrap();
                let env = std::fs::read(p.with_extension("json")).unwrap();
                (raw, serde_json::from_slice(&env).unwrap())
            })
            .collect()
    }

    /// How many MAIL FROM commands the server answered: one per delivery attempt.
    pub fn attempts(&self) -> u32 {
        std::fs::read_to_string(self.dir.path().join("attempts"))
            .map(|s| s.trim().parse().unwrap())
            .unwrap_or(0)
    }

    /// An SMTP transport to this server, in plain text.
    pub fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(
            email::transport::Smtp::new(
                "127.0.0.1",
                self.port,
                email::SmtpTls::None,
                None,
                Duration::from_secs(10),
            )
            .unwrap(),
        )
    }
}
