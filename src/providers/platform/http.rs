//! A small JSON-over-HTTPS client for the platforms' APIs: hyper with rustls (Mozilla's roots),
//! one request at a time, a timeout per request, and the status codes mapped onto
//! [`PlatformError`]: 429, 5xx, 409 and network errors are worth a retry; any other non-2xx is
//! a refusal, with the platform's body in the reason.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::PlatformError;

/// The longest a platform's answer is quoted in an error.
const QUOTED: usize = 500;

/// A JSON client.
#[derive(Clone)]
pub struct JsonClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl JsonClient {
    pub fn new(timeout: Duration) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        // The provider supports the default versions: this cannot fail.
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
        // Plain HTTP only for a local endpoint (tests, an emulator): checked by the callers'
        // configuration, which takes https:// URLs in production.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        JsonClient {
            client: Client::builder(TokioExecutor::new()).build(https),
            timeout,
        }
    }

    /// Sends `body` (or nothing) with `headers` and reads a JSON answer. `what` names the call
    /// in errors.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
        what: &str,
    ) -> Result<Value, PlatformError> {
        let mut req = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| PlatformError::Refused(format!("{what}: building the request: {e}")))?;
        let response = tokio::time::timeout(self.timeout, async {
            let response = self.client.request(req).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, retry_after, body))
        })
        .await;
        let (status, retry_after, body) = match response {
            Err(_) => {
                return Err(PlatformError::Retry(format!(
                    "{what}: no answer within {}ms",
                    self.timeout.as_millis()
                )))
            }
            Ok(Err(e)) => return Err(PlatformError::Retry(format!("{what}: {e}"))),
            Ok(Ok(answer)) => answer,
        };
        let quoted = || {
            let text = String::from_utf8_lossy(&body);
            text.chars().take(QUOTED).collect::<String>()
        };
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::CONFLICT
            || status.is_server_error()
        {
            let after = retry_after.map_or(String::new(), |s| format!(" (Retry-After {s})"));
            return Err(PlatformError::Retry(format!(
                "{what}: HTTP {status}{after}: {}",
                quoted()
            )));
        }
        if !status.is_success() {
            return Err(PlatformError::Refused(format!(
                "{what}: HTTP {status}: {}",
                quoted()
            )));
        }
        serde_json::from_slice(&body).map_err(|e| {
            PlatformError::Retry(format!(
                "{what}: the answer is not JSON ({e}): {}",
                quoted()
            ))
        })
    }
}
