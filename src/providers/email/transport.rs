//! How emails leave: a file outbox, SMTP, or SES v2. Each transport classifies its own errors
//! where they are converted, into a [`SendError`]:
//!
//! | [`SendError`] | the handler | file | SMTP | SES v2 |
//! |---|---|---|---|---|
//! | `Transient` | rolls back; retried with backoff | I/O error | 4xx reply, connection, TLS, timeout | `TooManyRequestsException`, `LimitExceededException`, 5xx, throttling, network |
//! | `Rejected` | records `failed_permanent`, succeeds: no retry | — | other 5xx (550 user unknown, 553 bad address, 554 refused) | `MessageRejected` about the recipient, `BadRequestException` |
//! | `Misconfigured` | to the DLQ with the reason, to redrive once fixed | permission denied | authentication (530, 534, 535, 538, 5.7.8), sender refused (5.1.7, 5.1.8), relaying denied | `MessageRejected` naming our sender, `AccountSuspendedException`, `SendingPausedException`, `MailFromDomainNotVerifiedException`, `NotFoundException`, other 4xx |
//!
//! `Rejected` is about this message or this recipient: no retry can help and no operator can
//! fix it. `Misconfigured` is about our side (credentials, sender identity, account): every
//! email fails the same way until someone fixes it, so those events wait in the DLQ instead of
//! being recorded as failed, and are sent when redriven.
//!
//! Error texts may echo the recipient's address; the handler redacts them with
//! [`crate::domain::mask::redact`] before they reach a log or a table.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use async_trait::async_trait;
use aws_sdk_sesv2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sesv2::operation::send_email::SendEmailError;
use aws_sdk_sesv2::primitives::Blob;
use aws_sdk_sesv2::types::{Destination, EmailContent, RawMessage};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{EmailArgs, EmailKey, SmtpTls};
use crate::domain::outcome::error_chain;

/// What a transport says about a message it accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sent {
    /// The transport's own id for it: the SES MessageId, the SMTP server's reply (often
    /// "queued as ..."), the outbox file name.
    pub provider_id: Option<String>,
}

/// Why a send failed, and so what happens next (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying later: throttling, a 4xx reply, a network or TLS failure, a timeout.
    #[error("transient: {0}")]
    Transient(String),
    /// This message or recipient was refused for good.
    #[error("rejected: {0}")]
    Rejected(String),
    /// Our configuration or account is wrong; every email would fail the same way.
    #[error("misconfigured: {0}")]
    Misconfigured(String),
}

/// A way for emails to leave.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// `file`, `smtp` or `ses`: stored in `emails.transport`.
    fn name(&self) -> &'static str;

    /// Sends `message`, the email of `key`.
    async fn send(&self, key: &EmailKey, message: &Message) -> Result<Sent, SendError>;

    /// True when a send waits on nothing remote and sending again is harmless (the file
    /// outbox: a repeat overwrites the first copy), so the notifications handler may send
    /// several events' emails in one transaction: a group rolled back and run again writes
    /// the same files, where a remote transport would deliver a second copy of each.
    fn answers_locally(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// File outbox
// ---------------------------------------------------------------------------------------------

/// Writes each email as an `.eml` file (RFC 5322, CRLF line endings: the bytes an SMTP server
/// would receive, the same lettre's own `FileTransport` writes) that a mail client opens.
///
/// Unlike lettre's `FileTransport`, which names files by a random UUID, the name is
/// `<order>.<kind>.eml`, a function of the email's key: a repeat after a crash overwrites the
/// first copy instead of adding a second, and a newcomer finds an order's emails by name. The
/// file is written under a temporary name and renamed, so a reader never sees half of one.
///
/// One thread of its own writes the files, in turn. On tokio's blocking pool each write could
/// start a thread, and every such thread keeps a heap of its own while it lives: the fleet
/// benchmark's notifications process ran up to 11 threads instead of 4, and peaked about 2 MB
/// higher (docs/BENCHMARKS.md, "Memory"). A write takes well under a millisecond, so one
/// thread keeps up with any queue. It ends with the last clone.
#[derive(Debug, Clone)]
pub struct FileOutbox {
    dir: PathBuf,
    writer: mpsc::Sender<FileWrite>,
}

/// One email for the writer thread, and where its outcome goes.
struct FileWrite {
    path: PathBuf,
    bytes: Vec<u8>,
    done: tokio::sync::oneshot::Sender<std::io::Result<()>>,
}

impl FileOutbox {
    /// An outbox in `dir`, created on the first send.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let (writer, writes) = mpsc::channel::<FileWrite>();
        std::thread::Builder::new()
            .name("email-files".into())
            .spawn(move || {
                for write in writes {
                    // The sender is gone when its send was given up on; nothing to tell.
                    let _ = write.done.send(write_file(&write.path, &write.bytes));
                }
            })
            .expect("starting the email outbox's writer thread");
        FileOutbox { dir, writer }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file `key`'s email is written to.
    pub fn path_for(&self, key: &EmailKey) -> PathBuf {
        self.dir
            .join(format!("{}.{}.eml", key.order_token(), key.kind.as_str()))
    }
}

#[async_trait]
impl Transport for FileOutbox {
    fn name(&self) -> &'static str {
        "file"
    }

    fn answers_locally(&self) -> bool {
        true
    }

    async fn send(&self, key: &EmailKey, message: &Message) -> Result<Sent, SendError> {
        let path = self.path_for(key);
        let bytes = message.formatted();
        let (done, written) = tokio::sync::oneshot::channel();
        let gone = || SendError::Transient("the outbox's writer thread is gone".to_owned());
        self.writer
            .send(FileWrite {
                path: path.clone(),
                bytes,
                done,
            })
            .map_err(|_| gone())?;
        let written = written.await.map_err(|_| gone())?.map(|()| path);
        match written {
            Ok(path) => Ok(Sent {
                provider_id: path.file_name().map(|n| n.to_string_lossy().into_owned()),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                Err(SendError::Misconfigured(format!(
                    "cannot write to the outbox {} ({e}); change --email-outbox-dir",
                    self.dir.display()
                )))
            }
            Err(e) => Err(SendError::Transient(format!(
                "writing to the outbox {}: {e}",
                self.dir.display()
            ))),
        }
    }
}

/// Writes `bytes` to `path` under a temporary name in its directory, then renames it into
/// place.
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    // 0600: a message holds the customer's address and order; nobody else on the host needs
    // to read it.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut file, bytes)?;
    drop(file);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

// ---------------------------------------------------------------------------------------------
// SMTP
// ---------------------------------------------------------------------------------------------

/// Where an SMTP relay is, from `--smtp-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpEndpoint {
    pub host: String,
    pub port: u16,
    /// The TLS mode the scheme implies: STARTTLS for `smtp://`, TLS for `smtps://`.
    pub tls: SmtpTls,
}

/// Parses `smtp://host[:port]` (default port 587, STARTTLS required) or `smtps://host[:port]`
/// (default 465, TLS). Credentials in the URL are refused: they would end up in logs and
/// process listings; they go in ORDERFLEET_SMTP_USERNAME / ORDERFLEET_SMTP_PASSWORD.
pub fn parse_smtp_url(url: &str) -> Result<SmtpEndpoint> {
    let hint =
        "--smtp-url (ORDERFLEET_SMTP_URL) must look like smtp://host:port or smtps://host:port";
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("{hint}; got {url:?}"))?;
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "smtp" => (SmtpTls::Starttls, 587),
        "smtps" => (SmtpTls::Tls, 465),
        other => bail!("{hint}; the scheme {other:?} is neither smtp nor smtps"),
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains('@') {
        bail!(
            "--smtp-url must not hold credentials; set ORDERFLEET_SMTP_USERNAME and \
             ORDERFLEET_SMTP_PASSWORD instead"
        );
    }
    if authority.contains(['/', '?', '#']) {
        bail!("{hint}; a path or query is not allowed (use --smtp-tls for the TLS mode)");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .with_context(|| format!("{hint}; unclosed [ in {url:?}"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => bail!("{hint}; unexpected {after:?} after the address"),
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        bail!("{hint}; the host is missing in {url:?}");
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .with_context(|| format!("{hint}; {p:?} is not a port"))?,
        None => default_port,
    };
    Ok(SmtpEndpoint { host, port, tls })
}

/// An SMTP relay, through lettre. One connection per email (lettre's pool is not built in):
/// simple, and plenty for one email per order event.
#[derive(Clone)]
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// `host:port`, for errors (never the credentials).
    endpoint: String,
}

impl Smtp {
    /// The relay the flags describe.
    pub fn from_args(args: &EmailArgs, timeout: Duration) -> Result<Self> {
        let url = args.smtp_url.as_deref().context(
            "--email-transport smtp needs --smtp-url (ORDERFLEET_SMTP_URL), e.g. \
             smtp://mail.example.com:587",
        )?;
        let endpoint = parse_smtp_url(url)?;
        let tls = args.smtp_tls.unwrap_or(endpoint.tls);
        let credentials = match (&args.smtp_username, &args.smtp_password) {
            (Some(user), Some(password)) => {
                Some(Credentials::new(user.clone(), password.0.clone()))
            }
            (None, None) => None,
            _ => {
                bail!("set both ORDERFLEET_SMTP_USERNAME and ORDERFLEET_SMTP_PASSWORD, or neither")
            }
        };
        Self::new(&endpoint.host, endpoint.port, tls, credentials, timeout)
    }

    /// A relay at `host:port` with `tls`, authenticating with `credentials` when given. Each
    /// SMTP command waits at most `timeout`.
    pub fn new(
        host: &str,
        port: u16,
        tls: SmtpTls,
        credentials: Option<Credentials>,
        timeout: Duration,
    ) -> Result<Self> {
        let params = || {
            TlsParameters::new(host.to_string())
                .with_context(|| format!("TLS settings for the SMTP relay {host}"))
        };
        let tls = match tls {
            SmtpTls::None => Tls::None,
            SmtpTls::Opportunistic => Tls::Opportunistic(params()?),
            SmtpTls::Starttls => Tls::Required(params()?),
            SmtpTls::Tls => Tls::Wrapper(params()?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .tls(tls)
            .timeout(Some(timeout));
        if let Some(credentials) = credentials {
            builder = builder.credentials(credentials);
        }
        Ok(Smtp {
            transport: builder.build(),
            endpoint: format!("{host}:{port}"),
        })
    }
}

#[async_trait]
impl Transport for Smtp {
    fn name(&self) -> &'static str {
        "smtp"
    }

    async fn send(&self, _key: &EmailKey, message: &Message) -> Result<Sent, SendError> {
        match self
            .transport
            .send_raw(message.envelope(), &message.formatted())
            .await
        {
            Ok(response) => Ok(Sent {
                provider_id: response.first_line().map(|l| l.trim().to_string()),
            }),
            Err(e) => Err(classify_smtp(&e, &self.endpoint)),
        }
    }
}

/// Classifies a lettre SMTP error (see the module documentation).
fn classify_smtp(err: &lettre::transport::smtp::Error, endpoint: &str) -> SendError {
    let text = format!("SMTP {endpoint}: {}", error_chain(err));
    match err.status() {
        Some(code) => {
            let code = code.to_string().parse::<u16>().unwrap_or(0);
            classify_smtp_reply(code, text)
        }
        // Client errors are ours (no usable authentication mechanism, an invalid envelope).
        None if err.is_client() => SendError::Misconfigured(text),
        // Connection refused or reset, DNS, TLS handshake, timeouts, unparsable replies.
        None => SendError::Transient(text),
    }
}

/// Classifies an SMTP reply code and its text.
fn classify_smtp_reply(code: u16, text: String) -> SendError {
    let lower = text.to_ascii_lowercase();
    // Enhanced status codes (RFC 3463): 5.1.7 / 5.1.8 bad sender, 5.7.8 bad credentials.
    let ours = matches!(code, 530 | 534 | 535 | 538)
        || [
            "5.1.7",
            "5.1.8",
            "5.7.8",
            "relay access denied",
            "relaying denied",
        ]
        .iter()
        .any(|marker| lower.contains(marker));
    match code {
        400..=499 => SendError::Transient(text),
        _ if ours => SendError::Misconfigured(text),
        500..=599 => SendError::Rejected(text),
        _ => SendError::Transient(text),
    }
}

// ---------------------------------------------------------------------------------------------
// SES v2
// ---------------------------------------------------------------------------------------------

/// Amazon SES v2 `SendEmail` with the raw MIME message (`EmailContent::Raw`), so that SES sends
/// exactly the bytes the other transports would.
#[derive(Clone, Debug)]
pub struct Ses {
    client: aws_sdk_sesv2::Client,
    /// The sender's bare address: `FromEmailAddress`, which IAM's `ses:FromAddress` checks.
    from_address: String,
    configuration_set: Option<String>,
}

impl Ses {
    /// SES through `client`, sending from `from_address` (a verified identity), optionally
    /// through a configuration set.
    pub fn new(
        client: aws_sdk_sesv2::Client,
        from_address: String,
        configuration_set: Option<String>,
    ) -> Self {
        Ses {
            client,
            from_address,
            configuration_set,
        }
    }
}

#[async_trait]
impl Transport for Ses {
    fn name(&self) -> &'static str {
        "ses"
    }

    async fn send(&self, _key: &EmailKey, message: &Message) -> Result<Sent, SendError> {
        let raw = RawMessage::builder()
            .data(Blob::new(message.formatted()))
            .build()
            .map_err(|e| SendError::Misconfigured(format!("building the SES raw message: {e}")))?;
        let to: Vec<String> = message
            .envelope()
            .to()
            .iter()
            .map(ToString::to_string)
            .collect();
        let result = self
            .client
            .send_email()
            .from_email_address(&self.from_address)
            .destination(Destination::builder().set_to_addresses(Some(to)).build())
            .content(EmailContent::builder().raw(raw).build())
            .set_configuration_set_name(self.configuration_set.clone())
            .send()
            .await;
        match result {
            Ok(out) => Ok(Sent {
                provider_id: out.message_id().map(str::to_string),
            }),
            Err(e) => Err(classify_ses(&e, &self.from_address)),
        }
    }
}

/// Classifies an SES v2 `SendEmail` error (see the module documentation).
fn classify_ses(err: &SdkError<SendEmailError>, from: &str) -> SendError {
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let status = service.raw().status().as_u16();
            classify_ses_code(e.code(), e.message().unwrap_or_default(), status, from)
        }
        SdkError::ConstructionFailure(_) => {
            SendError::Misconfigured(format!("SES: {}", error_chain(err)))
        }
        // Dispatch failures (connection, DNS, TLS), timeouts, unreadable responses.
        _ => SendError::Transient(format!("SES: {}", error_chain(err))),
    }
}

/// Classifies an SES error code with its HTTP status.
fn classify_ses_code(code: Option<&str>, message: &str, status: u16, from: &str) -> SendError {
    let text = format!("SES {} ({status}): {message}", code.unwrap_or("error"));
    match code {
        Some("TooManyRequestsException" | "LimitExceededException" | "Throttling")
        | Some("ThrottlingException" | "RequestTimeout" | "ServiceUnavailable") => {
            SendError::Transient(text)
        }
        // In the SES sandbox, or with an unverified sender, SES answers MessageRejected and
        // names the identities that failed: when ours is among them, the fault is ours.
        Some("MessageRejected")
            if message
                .to_ascii_lowercase()
                .contains(&from.to_ascii_lowercase()) =>
        {
            SendError::Misconfigured(text)
        }
        Some("MessageRejected" | "BadRequestException") => SendError::Rejected(text),
        Some(
            "AccountSuspendedException"
            | "SendingPausedException"
            | "MailFromDomainNotVerifiedException"
            | "NotFoundException",
        ) => SendError::Misconfigured(text),
        _ if status == 429 || status >= 500 => SendError::Transient(text),
        // Anything else (access denied, an unknown code) is about our request or our account.
        _ => SendError::Misconfigured(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::email::{EmailKey, EmailKind};

    fn message(subject: &str) -> Message {
        Message::builder()
            .from("shop@example.com".parse().unwrap())
            .to("ana@example.com".parse().unwrap())
            .subject(subject)
            .body(String::from("hello"))
            .unwrap()
    }

    /// Sends from many tasks and from clones all go through the one writer thread: each lands
    /// in its own file, readable by its owner only; a repeat (a redelivery after a crash)
    /// replaces its first copy; and dropping a clone leaves the others writing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_thread_writes_every_email_once_under_its_key() {
        let dir = std::env::temp_dir().join(format!("orderfleet-outbox-{}", uuid::Uuid::new_v4()));
        let outbox = FileOutbox::new(dir.join("nested"));
        let sends: Vec<_> = (0..40)
            .map(|i| {
                let outbox = outbox.clone();
                tokio::spawn(async move {
                    let key = EmailKey::new(format!("ord-{i}"), EmailKind::Confirmation);
                    outbox.send(&key, &message(&format!("first {i}"))).await
                })
            })
            .collect();
        for send in sends {
            let sent = send.await.unwrap().unwrap();
            assert!(sent.provider_id.unwrap().ends_with(".confirmation.eml"));
        }
        let key = EmailKey::new("ord-7", EmailKind::Confirmation);
        drop(outbox.clone());
        outbox.send(&key, &message("again 7")).await.unwrap();

        let names: Vec<_> = std::fs::read_dir(outbox.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names.len(),
            40,
            "one file per key, no temporary left: {names:?}"
        );
        let again = std::fs::read_to_string(outbox.path_for(&key)).unwrap();
        assert!(again.contains("Subject: again 7"), "{again}");
        assert!(!again.contains("first 7"));
        let mode = std::fs::metadata(outbox.path_for(&key))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn smtp_urls_give_host_port_and_tls_mode() {
        let e = parse_smtp_url("smtp://mail.example.com").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("mail.example.com", 587, SmtpTls::Starttls)
        );
        let e = parse_smtp_url("smtps://mail.example.com:2465/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("mail.example.com", 2465, SmtpTls::Tls)
        );
        let e = parse_smtp_url("smtp://127.0.0.1:1025").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 1025));
        let e = parse_smtp_url("smtp://[::1]:25").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 25));
        for bad in [
            "mail.example.com",
            "http://mail.example.com",
            "smtp://",
            "smtp://host:0",
            "smtp://host:x",
            "smtp://host:25?tls=required",
        ] {
            assert!(parse_smtp_url(bad).is_err(), "{bad}");
        }
        let err = parse_smtp_url("smtp://user:secret@host:25").unwrap_err();
        assert!(!format!("{err:#}").contains("secret"));
        assert!(format!("{err:#}").contains("ORDERFLEET_SMTP_PASSWORD"));
    }

    #[test]
    fn smtp_replies_are_classified_by_code_and_enhanced_status() {
        let c = |code, text: &str| classify_smtp_reply(code, text.to_string());
        assert!(matches!(
            c(451, "4.7.1 Greylisted"),
            SendError::Transient(_)
        ));
        assert!(matches!(c(421, "4.4.2 closing"), SendError::Transient(_)));
        assert!(matches!(
            c(450, "4.2.1 mailbox busy"),
            SendError::Transient(_)
        ));
        assert!(matches!(
            c(550, "5.1.1 user unknown"),
            SendError::Rejected(_)
        ));
        assert!(matches!(
            c(553, "5.1.3 bad address syntax"),
            SendError::Rejected(_)
        ));
        assert!(matches!(c(554, "5.7.1 spam"), SendError::Rejected(_)));
        assert!(matches!(
            c(535, "5.7.8 bad credentials"),
            SendError::Misconfigured(_)
        ));
        assert!(matches!(
            c(530, "5.7.0 auth required"),
            SendError::Misconfigured(_)
        ));
        assert!(matches!(
            c(553, "5.1.8 sender domain"),
            SendError::Misconfigured(_)
        ));
        assert!(matches!(
            c(554, "5.7.1 Relay access denied"),
            SendError::Misconfigured(_)
        ));
    }

    #[test]
    fn ses_errors_are_classified_by_code() {
        let from = "orders@shop.example";
        let c = |code: &str, msg: &str, status| classify_ses_code(Some(code), msg, status, from);
        assert!(matches!(
            c("TooManyRequestsException", "slow down", 429),
            SendError::Transient(_)
        ));
        assert!(matches!(
            c("LimitExceededException", "quota", 400),
            SendError::Transient(_)
        ));
        assert!(matches!(
            c("InternalFailure", "oops", 500),
            SendError::Transient(_)
        ));
        assert!(matches!(
            c(
                "MessageRejected",
                "Email address is not verified: ada@example.com",
                400
            ),
            SendError::Rejected(_)
        ));
        assert!(matches!(
            c(
                "MessageRejected",
                "Did not have authority to send from email Orders@shop.example",
                400
            ),
            SendError::Misconfigured(_)
        ));
        assert!(matches!(
            c("BadRequestException", "invalid address", 400),
            SendError::Rejected(_)
        ));
        assert!(matches!(
            c("SendingPausedException", "paused", 400),
            SendError::Misconfigured(_)
        ));
        assert!(matches!(
            c("AccessDeniedException", "no", 403),
            SendError::Misconfigured(_)
        ));
        assert!(matches!(
            classify_ses_code(None, "", 503, from),
            SendError::Transient(_)
        ));
    }
}
