//! Liveness without an HTTP port. The worker rewrites a small JSON file every second from
//! its async runtime; `orderfleet-worker healthcheck` (an ECS container health check, or a
//! systemd `ExecStartPost` probe) passes only if the file is fresh and its process alive. A
//! worker whose runtime is wedged (blocked thread, deadlock, stopped process) stops writing,
//! and the check fails within `--max-age-secs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::domain::names::HandlerName;
use crate::runtime::lease::Leases;
use crate::telemetry::metrics::Counters;

/// The default liveness file: in the temporary directory, so it works under
/// `ProtectSystem=strict` with `PrivateTmp` and in a container.
pub fn default_path() -> PathBuf {
    std::env::temp_dir().join("orderfleet-worker.health")
}

/// What the liveness file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub pid: u32,
    pub updated_at_ms: i64,
    pub handlers: Vec<String>,
    pub in_flight: usize,
    pub processed: u64,
}

/// Writes the liveness file.
#[derive(Clone)]
pub struct Liveness {
    path: PathBuf,
}

impl Liveness {
    pub fn new(path: PathBuf) -> Self {
        Liveness { path }
    }

    /// Rewrites the file every second until `stop`.
    pub async fn run(
        self,
        counters: Arc<Vec<(HandlerName, Arc<Counters>)>>,
        leases: Leases,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let health = Health {
                pid: std::process::id(),
                updated_at_ms: chrono::Utc::now().timestamp_millis(),
                handlers: counters.iter().map(|(h, _)| h.to_string()).collect(),
                in_flight: leases.len(),
                processed: counters
                    .iter()
                    .map(|(_, c)| {
                        let s = c.snapshot();
                        s.succeeded + s.duplicates
                    })
                    .sum(),
            };
            if let Err(e) = write_atomically(&self.path, &health) {
                tracing::warn!(error = %format!("{e:#}"), path = %self.path.display(), "cannot write the liveness file");
            }
        }
    }

    /// Removes the file at a clean stop, so a stopped worker is not reported healthy.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn write_atomically(path: &Path, health: &Health) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(health)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Checks the liveness file: it exists, names a live process, and is at most `max_age` old.
pub fn check(path: &Path, max_age: Duration) -> Result<Health> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "no liveness file at {} (is the worker running?)",
            path.display()
        )
    })?;
    let health: Health = serde_json::from_slice(&bytes)
        .with_context(|| format!("liveness file {} is not valid", path.display()))?;
    if !Path::new(&format!("/proc/{}", health.pid)).exists() {
        bail!("the worker process {} is gone", health.pid);
    }
    let age_ms = chrono::Utc::now().timestamp_millis() - health.updated_at_ms;
    if age_ms > max_age.as_millis() as i64 {
        bail!(
            "the worker (pid {}) last reported {:.1}s ago, more than {}s: it is wedged",
            health.pid,
            age_ms as f64 / 1000.0,
            max_age.as_secs()
        );
    }
    Ok(health)
}
