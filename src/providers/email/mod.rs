//! Customer emails: what they say, how they are built, and how they leave.
//!
//! - [`EmailArgs`]: the flags (each with an environment variable) that choose the transport,
//!   the sender and the templates.
//! - [`view`]: the typed data each kind of email is rendered from, and money formatting.
//! - [`templates`]: the minijinja templates, loaded at startup from `templates/email` (or
//!   `--email-templates-dir`) over copies embedded in the binary.
//! - [`transport`]: the file outbox (`.eml` files, the local default), SMTP (lettre) and SES v2
//!   (raw MIME), each classifying its own errors into [`SendError`].
//! - [`mask`]: masking of addresses for logs and the `emails` table.
//!
//! A [`Mailer`] ties them together: [`Mailer::compose`] renders a view into a lettre
//! [`Message`] (multipart/alternative, text and HTML) with a Message-ID derived from the order
//! and the kind, and [`Mailer::send`] hands it to the transport under a timeout. Recording
//! each send, and so sending at most one email per (order, kind), is the notifications
//! handler's job ([`crate::handlers::notifications`]).

pub mod templates;
pub mod transport;
pub mod view;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::{Address, Message};
use md5::{Digest, Md5};

pub use templates::Templates;

use crate::domain::deliverability::{AddressHasher, UnsubscribeSigner};
pub use transport::{SendError, Sent, Transport};
pub use view::EmailView;

/// The kinds of email, one per (order, kind) at most. The text is stored in `emails.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EmailKind {
    /// The order was accepted: lines, total, shipping address.
    Confirmation,
    /// The parcel left, with its tracking number.
    Shipped,
    /// The order was cancelled: why, and what happened to the money.
    Cancelled,
    /// A returned parcel was refunded.
    Refunded,
    /// "Customers also bought", after a completed order: marketing (List-Unsubscribe, opt-out).
    Recommendations,
}

impl EmailKind {
    /// Every kind.
    pub const ALL: [EmailKind; 5] = [
        EmailKind::Confirmation,
        EmailKind::Shipped,
        EmailKind::Cancelled,
        EmailKind::Refunded,
        EmailKind::Recommendations,
    ];

    /// The name stored in `emails.kind` and used for template files (`<kind>.txt.j2`).
    pub fn as_str(self) -> &'static str {
        match self {
            EmailKind::Confirmation => "confirmation",
            EmailKind::Shipped => "shipped",
            EmailKind::Cancelled => "cancelled",
            EmailKind::Refunded => "refunded",
            EmailKind::Recommendations => "recommendations",
        }
    }

    /// Whether the kind is marketing: sent only with an unsubscribe link, and never to a
    /// customer who opted out. The others are transactional and always go out (unless the
    /// address is suppressed).
    pub fn is_marketing(self) -> bool {
        self == EmailKind::Recommendations
    }
}

impl fmt::Display for EmailKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The business key of an email: at most one is sent per order and kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EmailKey {
    pub order_id: String,
    pub kind: EmailKind,
}

impl EmailKey {
    /// The key of `order_id`'s email of `kind`.
    pub fn new(order_id: impl Into<String>, kind: EmailKind) -> Self {
        EmailKey {
            order_id: order_id.into(),
            kind,
        }
    }

    /// A file-name-safe and Message-ID-safe token for the order: the order id itself when it
    /// is made of letters, digits, `-` and `_` only (and not too long), otherwise `h` and the
    /// MD5 of the id, so that any id maps to one stable token.
    pub fn order_token(&self) -> String {
        let id = &self.order_id;
        let plain = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if plain {
            id.clone()
        } else {
            let digest = Md5::digest(id.as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("h{hex}")
        }
    }

    /// The Message-ID of this email, `<kind.order@domain>`. It is the same every time the email
    /// is composed, so the rare repeat after a crash between the send and the commit carries
    /// the same Message-ID as the first copy, and mail systems that de-duplicate on it show
    /// the customer one message.
    pub fn message_id(&self, domain: &str) -> String {
        format!("<{}.{}@{domain}>", self.kind.as_str(), self.order_token())
    }
}

/// Which transport carries the emails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TransportKind {
    /// `.eml` files in `--email-outbox-dir`: the local default, for opening in a mail client.
    #[default]
    File,
    /// An SMTP relay (`--smtp-url`).
    Smtp,
    /// Amazon SES v2, sending the raw MIME message.
    Ses,
}

impl TransportKind {
    /// The name stored in `emails.transport`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::File => "file",
            TransportKind::Smtp => "smtp",
            TransportKind::Ses => "ses",
        }
    }
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SmtpTls {
    /// Plain text. Only for a relay on the same host or a local test server.
    None,
    /// STARTTLS when the server offers it, plain text otherwise (open to downgrade).
    Opportunistic,
    /// STARTTLS, required (the default for `smtp://`).
    Starttls,
    /// TLS from the first byte, "SMTPS" (the default for `smtps://`).
    Tls,
}

/// A secret read from a flag or the environment: never shown by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// The default sender.
pub const DEFAULT_FROM: &str = "orderfleet shop <orders@example.com>";
/// The default directory of the file outbox.
pub const DEFAULT_OUTBOX_DIR: &str = ".local/outbox";
/// The default number of "customers also bought" products in a confirmation.
pub const DEFAULT_RECOMMENDATIONS: usize = 3;
/// The default bound on one send.
pub const DEFAULT_SEND_TIMEOUT_SECS: u64 = 20;

/// Email settings (part of the handlers' `DepsArgs`). Every flag has an environment variable.
#[derive(Debug, Clone, Args)]
pub struct EmailArgs {
    /// How emails leave: `file` (.eml files, the local default), `smtp` or `ses`.
    #[arg(
        long = "email-transport",
        env = "ORDERFLEET_EMAIL_TRANSPORT",
        value_enum,
        default_value_t = TransportKind::File
    )]
    pub transport: TransportKind,
    /// The sender, `Name <address>` or a bare address. With SES it must be a verified identity.
    #[arg(long = "email-from", env = "ORDERFLEET_EMAIL_FROM", default_value = DEFAULT_FROM)]
    pub from: String,
    /// Directory of the file transport: one `<order>.<kind>.eml` per email.
    #[arg(
        long = "email-outbox-dir",
        env = "ORDERFLEET_EMAIL_OUTBOX_DIR",
        default_value = DEFAULT_OUTBOX_DIR
    )]
    pub outbox_dir: PathBuf,
    /// Directory of the email templates. Files there override the copies built into the
    /// binary, name by name. Default: `templates/email` when it exists in the working
    /// directory, otherwise the built-in copies alone.
    #[arg(long = "email-templates-dir", env = "ORDERFLEET_EMAIL_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,
    /// How many "customers also bought" products the recommendations email lists (0: no
    /// recommendations email).
    #[arg(
        long = "email-recommendations",
        env = "ORDERFLEET_EMAIL_RECOMMENDATIONS",
        default_value_t = DEFAULT_RECOMMENDATIONS
    )]
    pub recommendations: usize,
    /// A send taking longer than this is abandoned and retried. Keep it under
    /// --handler-timeout-secs.
    #[arg(
        long = "email-send-timeout-secs",
        env = "ORDERFLEET_EMAIL_SEND_TIMEOUT_SECS",
        default_value_t = DEFAULT_SEND_TIMEOUT_SECS
    )]
    pub send_timeout_secs: u64,
    /// SMTP relay: `smtp://host[:port]` (port 587, STARTTLS) or `smtps://host[:port]` (port
    /// 465, TLS). Credentials go in ORDERFLEET_SMTP_USERNAME / ORDERFLEET_SMTP_PASSWORD, not
    /// in the URL.
    #[arg(long = "smtp-url", env = "ORDERFLEET_SMTP_URL")]
    pub smtp_url: Option<String>,
    /// Overrides the TLS mode the URL's scheme implies: none, opportunistic, starttls, tls.
    #[arg(long = "smtp-tls", env = "ORDERFLEET_SMTP_TLS", value_enum)]
    pub smtp_tls: Option<SmtpTls>,
    /// SMTP user name (with ORDERFLEET_SMTP_PASSWORD).
    #[arg(
        long = "smtp-username",
        env = "ORDERFLEET_SMTP_USERNAME",
        hide_env_values = true
    )]
    pub smtp_username: Option<String>,
    /// SMTP password. Prefer the environment variable: a flag shows in the process list.
    #[arg(
        long = "smtp-password",
        env = "ORDERFLEET_SMTP_PASSWORD",
        hide_env_values = true
    )]
    pub smtp_password: Option<Secret>,
    /// SES configuration set for event publishing (bounces, complaints, deliveries).
    #[arg(
        long = "ses-configuration-set",
        env = "ORDERFLEET_SES_CONFIGURATION_SET"
    )]
    pub ses_configuration_set: Option<String>,
    /// Key of the suppression list's address hashes (HMAC-SHA256, at least 32 bytes; keep it
    /// in a secret store). Needed to act on SES bounces and complaints: without it nothing is
    /// suppressed, and with an SES configuration set the worker refuses to start. The
    /// operator CLI needs the same key to remove a suppression by address.
    #[arg(
        long = "email-hash-key",
        env = "ORDERFLEET_EMAIL_HASH_KEY",
        hide_env_values = true
    )]
    pub hash_key: Option<Secret>,
    /// The shop's unsubscribe page (https), where a marketing email's unsubscribe link and
    /// its List-Unsubscribe header point, with `token=<signed customer id>` added. Unset: no
    /// marketing email (the recommendations email) is sent at all.
    #[arg(long = "unsubscribe-url", env = "ORDERFLEET_UNSUBSCRIBE_URL")]
    pub unsubscribe_url: Option<String>,
    /// Key that signs the unsubscribe tokens (HMAC-SHA256, at least 32 bytes), shared with
    /// the shop's unsubscribe page, which checks them. Required with --unsubscribe-url.
    #[arg(
        long = "unsubscribe-key",
        env = "ORDERFLEET_UNSUBSCRIBE_KEY",
        hide_env_values = true
    )]
    pub unsubscribe_key: Option<Secret>,
}

impl Default for EmailArgs {
    /// The same values as the flags' defaults, for code that builds settings without clap.
    fn default() -> Self {
        EmailArgs {
            transport: TransportKind::File,
            from: DEFAULT_FROM.to_string(),
            outbox_dir: PathBuf::from(DEFAULT_OUTBOX_DIR),
            templates_dir: None,
            recommendations: DEFAULT_RECOMMENDATIONS,
            send_timeout_secs: DEFAULT_SEND_TIMEOUT_SECS,
            smtp_url: None,
            smtp_tls: None,
            smtp_username: None,
            smtp_password: None,
            ses_configuration_set: None,
            hash_key: None,
            unsubscribe_url: None,
            unsubscribe_key: None,
        }
    }
}

/// Why an email could not be composed.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// The recipient's address does not parse: no transport could deliver it. Recorded as
    /// `failed_permanent`; the text holds the masked address only.
    #[error("invalid recipient address {masked}: {reason}")]
    InvalidAddress { masked: String, reason: String },
    /// A template failed to render, or the message could not be built: a defect to fix, after
    /// which the event can be redriven.
    #[error("{0}")]
    Build(String),
}

/// Where marketing emails' unsubscribe links point, and how their tokens are signed.
#[derive(Debug, Clone)]
pub struct Unsubscribe {
    /// The shop's unsubscribe page.
    pub url: String,
    pub signer: UnsubscribeSigner,
}

impl Unsubscribe {
    /// The settings `--unsubscribe-url` and `--unsubscribe-key` describe; `None` without a URL.
    /// Fails, naming the flag, on a URL that is not http(s) or a missing or short key.
    pub fn from_args(args: &EmailArgs) -> Result<Option<Unsubscribe>> {
        let Some(url) = args
            .unsubscribe_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        else {
            return Ok(None);
        };
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            bail!(
                "--unsubscribe-url (ORDERFLEET_UNSUBSCRIBE_URL) {url:?} is not an http(s) URL; \
                 give the shop's unsubscribe page, e.g. https://shop.example/unsubscribe"
            );
        }
        if url.contains(['<', '>', ' ', ',']) {
            bail!(
                "--unsubscribe-url (ORDERFLEET_UNSUBSCRIBE_URL) {url:?} holds a character a \
                 List-Unsubscribe header cannot carry (<, >, space or comma); percent-encode it"
            );
        }
        let key = args
            .unsubscribe_key
            .as_ref()
            .map(|k| k.0.as_str())
            .unwrap_or("");
        if key.is_empty() {
            bail!(
                "--unsubscribe-url is set but --unsubscribe-key (ORDERFLEET_UNSUBSCRIBE_KEY) is \
                 not: set it to the secret the shop's unsubscribe page checks tokens with"
            );
        }
        let signer = UnsubscribeSigner::new(key.as_bytes())?;
        Ok(Some(Unsubscribe {
            url: url.to_string(),
            signer,
        }))
    }

    /// The link for `customer_id`.
    pub fn link(&self, customer_id: &str) -> String {
        self.signer.link(&self.url, customer_id)
    }
}

/// The suppression list's hasher `--email-hash-key` describes, if given.
pub fn address_hasher(args: &EmailArgs) -> Result<Option<AddressHasher>> {
    match args
        .hash_key
        .as_ref()
        .map(|k| k.0.as_str())
        .filter(|k| !k.is_empty())
    {
        Some(key) => Ok(Some(AddressHasher::new(key.as_bytes())?)),
        None => Ok(None),
    }
}

/// Builds and sends customer emails: the sender, the templates and the transport.
pub struct Mailer {
    from: Mailbox,
    shop_name: String,
    templates: Templates,
    transport: Arc<dyn Transport>,
    recommendations: usize,
    send_timeout: Duration,
    unsubscribe: Option<Unsubscribe>,
    hasher: Option<AddressHasher>,
}

impl fmt::Debug for Mailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mailer")
            .field("from", &self.from.to_string())
            .field("transport", &self.transport.name())
            .field("templates", &self.templates.origin())
            .finish()
    }
}

impl Mailer {
    /// Builds the mailer the flags describe. Fails, saying which flag to change, on a sender
    /// that does not parse, templates that do not render, or an incomplete SMTP setting.
    /// Nothing is contacted yet: SMTP connects and the outbox directory is created on the
    /// first send.
    pub async fn from_args(args: &EmailArgs) -> Result<Self> {
        let from = parse_from(&args.from)?;
        let templates = Templates::load(args.templates_dir.as_deref())?;
        if args.send_timeout_secs == 0 {
            bail!("--email-send-timeout-secs must be at least 1");
        }
        let send_timeout = Duration::from_secs(args.send_timeout_secs);
        let unsubscribe = Unsubscribe::from_args(args)?;
        let hasher = address_hasher(args)?;
        let ses_events = args.transport == TransportKind::Ses
            && args
                .ses_configuration_set
                .as_deref()
                .is_some_and(|s| !s.trim().is_empty());
        if ses_events && hasher.is_none() {
            bail!(
                "--ses-configuration-set is set, so SES bounces and complaints reach this worker, \
                 but --email-hash-key (ORDERFLEET_EMAIL_HASH_KEY) is not: set it to a secret of \
                 at least 32 bytes (e.g. `openssl rand -hex 32`) so they can be recorded"
            );
        }
        if unsubscribe.is_some() && hasher.is_none() {
            bail!(
                "--unsubscribe-url is set but --email-hash-key (ORDERFLEET_EMAIL_HASH_KEY) is \
                 not: opt-outs are also kept by address (a keyed hash), so that a guest's \
                 opt-out holds for their next order; set it to a secret of at least 32 bytes"
            );
        }
        let transport: Arc<dyn Transport> = match args.transport {
            TransportKind::File => Arc::new(transport::FileOutbox::new(&args.outbox_dir)),
            TransportKind::Smtp => Arc::new(transport::Smtp::from_args(args, send_timeout)?),
            TransportKind::Ses => {
                let sdk = crate::infra::aws::sdk_config().await;
                Arc::new(transport::Ses::new(
                    aws_sdk_sesv2::Client::new(&sdk),
                    from.email.to_string(),
                    args.ses_configuration_set.clone(),
                ))
            }
        };
        Ok(Mailer::new(from, templates, transport)
            .with_recommendations(args.recommendations)
            .with_send_timeout(send_timeout)
            .with_unsubscribe(unsubscribe)
            .with_hasher(hasher))
    }

    /// A mailer from parts (tests use it to plug in a transport).
    pub fn new(from: Mailbox, templates: Templates, transport: Arc<dyn Transport>) -> Self {
        let shop_name = from
            .name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| "orderfleet".to_string());
        Mailer {
            from,
            shop_name,
            templates,
            transport,
            recommendations: DEFAULT_RECOMMENDATIONS,
            send_timeout: Duration::from_secs(DEFAULT_SEND_TIMEOUT_SECS),
            unsubscribe: None,
            hasher: None,
        }
    }

    /// Sets where marketing emails' unsubscribe links point (`None`: no marketing email).
    pub fn with_unsubscribe(mut self, unsubscribe: Option<Unsubscribe>) -> Self {
        self.unsubscribe = unsubscribe;
        self
    }

    /// Sets the suppression list's hasher (`None`: nothing is suppressed).
    pub fn with_hasher(mut self, hasher: Option<AddressHasher>) -> Self {
        self.hasher = hasher;
        self
    }

    /// The unsubscribe settings, when marketing email is on.
    pub fn unsubscribe(&self) -> Option<&Unsubscribe> {
        self.unsubscribe.as_ref()
    }

    /// The suppression list's hasher, when a key is configured.
    pub fn hasher(&self) -> Option<&AddressHasher> {
        self.hasher.as_ref()
    }

    /// Sets how many recommendations a confirmation lists.
    pub fn with_recommendations(mut self, n: usize) -> Self {
        self.recommendations = n;
        self
    }

    /// Sets the bound on one send.
    pub fn with_send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// The sender.
    pub fn from(&self) -> &Mailbox {
        &self.from
    }

    /// The transport's name, as stored in `emails.transport`.
    pub fn transport_name(&self) -> &'static str {
        self.transport.name()
    }

    /// Where the templates came from, for the startup log.
    pub fn templates_origin(&self) -> String {
        self.templates.origin()
    }

    /// How many recommendations a confirmation lists.
    pub fn recommendations(&self) -> usize {
        self.recommendations
    }

    /// The Message-ID of `key`'s email, in the sender's domain.
    pub fn message_id(&self, key: &EmailKey) -> String {
        key.message_id(self.from.email.domain())
    }

    /// Renders `view` for `key` into a multipart/alternative message (text, then HTML) to
    /// `to_email`, named `to_name` when not empty. With `unsubscribe` (a marketing email's
    /// link), the message carries `List-Unsubscribe: <link>` and `List-Unsubscribe-Post:
    /// List-Unsubscribe=One-Click` (RFC 8058), so a mail client can offer one-click
    /// unsubscribing; the link is also in the body.
    pub fn compose(
        &self,
        key: &EmailKey,
        to_email: &str,
        to_name: &str,
        view: &EmailView,
        unsubscribe: Option<&str>,
    ) -> Result<Message, ComposeError> {
        let address: Address =
            to_email
                .trim()
                .parse()
                .map_err(
                    |e: lettre::address::AddressError| ComposeError::InvalidAddress {
                        masked: crate::domain::mask::mask(to_email),
                        reason: e.to_string(),
                    },
                )?;
        let name = to_name.trim();
        let to = Mailbox::new((!name.is_empty()).then(|| name.to_string()), address);
        let rendered = self
            .templates
            .render(view, &self.shop_name)
            .map_err(|e| ComposeError::Build(format!("rendering the {} email: {e:#}", key.kind)))?;
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(rendered.subject)
            .message_id(Some(self.message_id(key)))
            .date_now()
            // RFC 3834: tells autoresponders (out-of-office replies) not to answer.
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("Auto-Submitted"),
                "auto-generated".to_string(),
            ));
        if let Some(link) = unsubscribe {
            builder = builder
                .raw_header(HeaderValue::new(
                    HeaderName::new_from_ascii_str("List-Unsubscribe"),
                    format!("<{link}>"),
                ))
                .raw_header(HeaderValue::new(
                    HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
                    "List-Unsubscribe=One-Click".to_string(),
                ));
        }
        builder
            .multipart(MultiPart::alternative_plain_html(
                rendered.text,
                rendered.html,
            ))
            .map_err(|e| ComposeError::Build(format!("building the {} email: {e}", key.kind)))
    }

    /// Sends `message` through the transport, giving up after the send timeout (a timeout is
    /// transient: the handler's transaction rolls back and the event is retried).
    pub async fn send(&self, key: &EmailKey, message: &Message) -> Result<Sent, SendError> {
        self.send_within(key, message, self.send_timeout).await
    }

    /// Whether its transport sends locally and harmlessly again
    /// ([`transport::Transport::answers_locally`]).
    pub fn answers_locally(&self) -> bool {
        self.transport.answers_locally()
    }

    /// The longest a send may take (`--email-send-timeout-secs`).
    pub fn send_timeout(&self) -> Duration {
        self.send_timeout
    }

    /// Sends `message`, giving up after `limit` (a handler passes what its own time allows);
    /// a zero limit does not start the send.
    pub async fn send_within(
        &self,
        key: &EmailKey,
        message: &Message,
        limit: Duration,
    ) -> Result<Sent, SendError> {
        if limit.is_zero() {
            return Err(SendError::Transient(format!(
                "{} send not started: the handler's time is nearly up",
                self.transport.name()
            )));
        }
        match tokio::time::timeout(limit, self.transport.send(key, message)).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Transient(format!(
                "{} send timed out after {}ms",
                self.transport.name(),
                limit.as_millis()
            ))),
        }
    }
}

/// Parses `--email-from`.
pub fn parse_from(from: &str) -> Result<Mailbox> {
    from.trim().parse::<Mailbox>().with_context(|| {
        format!(
            "--email-from (ORDERFLEET_EMAIL_FROM) {from:?} is not a mailbox; use \
             `Shop name <orders@shop.example>` or `orders@shop.example`"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        email: EmailArgs,
    }

    #[test]
    fn the_default_settings_match_the_flags_defaults() {
        let parsed = Cli::parse_from(["test"]).email;
        let default = EmailArgs::default();
        // The environment may set some of them; compare only what it does not.
        if std::env::var_os("ORDERFLEET_EMAIL_TRANSPORT").is_none() {
            assert_eq!(parsed.transport, default.transport);
        }
        if std::env::var_os("ORDERFLEET_EMAIL_FROM").is_none() {
            assert_eq!(parsed.from, default.from);
        }
        if std::env::var_os("ORDERFLEET_EMAIL_OUTBOX_DIR").is_none() {
            assert_eq!(parsed.outbox_dir, default.outbox_dir);
        }
        assert_eq!(parsed.recommendations, default.recommendations);
        assert_eq!(parsed.send_timeout_secs, default.send_timeout_secs);
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let args = EmailArgs {
            smtp_password: Some(Secret("hunter2".into())),
            ..EmailArgs::default()
        };
        assert!(!format!("{args:?}").contains("hunter2"));
    }

    #[test]
    fn the_default_sender_parses_and_a_bad_one_names_the_flag() {
        let from = parse_from(DEFAULT_FROM).unwrap();
        assert_eq!(from.email.to_string(), "orders@example.com");
        assert_eq!(from.name.as_deref(), Some("orderfleet shop"));
        assert!(parse_from("orders@shop.example").is_ok());
        let err = parse_from("not an address").unwrap_err();
        assert!(format!("{err:#}").contains("--email-from"));
    }

    #[test]
    fn marketing_settings_are_checked_at_startup_and_name_the_flag() {
        assert!(Unsubscribe::from_args(&EmailArgs::default())
            .unwrap()
            .is_none());
        let with = |url: &str, key: Option<&str>| EmailArgs {
            unsubscribe_url: Some(url.into()),
            unsubscribe_key: key.map(|k| Secret(k.into())),
            ..EmailArgs::default()
        };
        let key = "0123456789abcdef0123456789abcdef";
        let u = Unsubscribe::from_args(&with("https://shop.example/u", Some(key)))
            .unwrap()
            .unwrap();
        assert!(u.link("cus-1").starts_with("https://shop.example/u?token="));
        for (args, flag) in [
            (with("https://shop.example/u", None), "--unsubscribe-key"),
            (
                with("https://shop.example/u", Some("short")),
                "ORDERFLEET_UNSUBSCRIBE_KEY",
            ),
            (
                with("mailto:stop@shop.example", Some(key)),
                "--unsubscribe-url",
            ),
            (
                with("https://shop.example/a b", Some(key)),
                "--unsubscribe-url",
            ),
        ] {
            let err = Unsubscribe::from_args(&args).unwrap_err();
            assert!(format!("{err:#}").contains(flag), "{err:#}");
        }
    }

    #[tokio::test]
    async fn ses_with_a_configuration_set_and_no_hash_key_refuses_to_start() {
        let args = EmailArgs {
            transport: TransportKind::Ses,
            ses_configuration_set: Some("shop-email".into()),
            ..EmailArgs::default()
        };
        let err = Mailer::from_args(&args).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("ORDERFLEET_EMAIL_HASH_KEY"),
            "{err:#}"
        );
    }

    #[test]
    fn message_ids_are_stable_per_order_and_kind() {
        let a = EmailKey::new("ord-1", EmailKind::Confirmation);
        assert_eq!(
            a.message_id("shop.example"),
            "<confirmation.ord-1@shop.example>"
        );
        assert_eq!(a.message_id("x"), a.message_id("x"));
        let b = EmailKey::new("ord-1", EmailKind::Shipped);
        assert_ne!(a.message_id("x"), b.message_id("x"));
        // Ids with characters a Message-ID or a file name cannot hold are hashed, stably.
        let odd = EmailKey::new("ord 1/<x>@y", EmailKind::Refunded);
        let token = odd.order_token();
        assert!(token.starts_with('h') && token.len() == 33, "{token}");
        assert_eq!(
            token,
            EmailKey::new("ord 1/<x>@y", EmailKind::Refunded).order_token()
        );
        assert_ne!(
            token,
            EmailKey::new("ord 1/<x>@z", EmailKind::Refunded).order_token()
        );
    }
}
