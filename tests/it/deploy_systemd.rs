//! The systemd units in `deploy/systemd/`: accepted by `systemd-analyze verify`, hardened, and
//! stopping later than the worker's shutdown grace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(systemd_dir().join(name))
        .unwrap_or_else(|e| panic!("reading deploy/systemd/{name}: {e}"))
}

/// The value of `key=` in a unit or env file (the last assignment wins, as in systemd).
fn setting(text: &str, key: &str) -> Option<String> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
}

fn systemd_analyze(args: &[&str]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run systemd-analyze ({e}); install it with \
                 `apt-get update && apt-get install -y systemd`"
            )
        })
}

/// Copies of the units into a temporary directory, instantiated for `orders` and with
/// `ExecStart` pointing at the binaries this build produced (verify checks they exist).
struct Instantiated {
    dir: PathBuf,
}

impl Instantiated {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("orderfleet-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let worker = read("orderfleet-worker@.service").replace(
            "ExecStart=/usr/local/bin/orderfleet-worker",
            &format!("ExecStart={}", env!("CARGO_BIN_EXE_orderfleet-worker")),
        );
        let migrate = read("orderfleet-migrate.service").replace(
            "ExecStart=/usr/local/bin/orderfleet ",
            &format!("ExecStart={} ", env!("CARGO_BIN_EXE_orderfleet")),
        );
        assert!(worker.contains(env!("CARGO_BIN_EXE_orderfleet-worker")));
        assert!(migrate.contains(env!("CARGO_BIN_EXE_orderfleet")));
        std::fs::write(dir.join("orderfleet-worker@orders.service"), worker).expect("write");
        std::fs::write(dir.join("orderfleet-migrate.service"), migrate).expect("write");
        Instantiated { dir }
    }

    fn unit(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Instantiated {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_units_pass_systemd_analyze_verify_without_a_warning() {
    let units = Instantiated::new("verify");
    let out = systemd_analyze(&[
        "verify",
        &units.unit("orderfleet-worker@orders.service"),
        &units.unit("orderfleet-migrate.service"),
    ]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify (exit {:?}) says:\n{said}",
        out.status.code()
    );
}

#[test]
fn the_worker_unit_is_hardened_to_an_ok_exposure_level() {
    let units = Instantiated::new("security");
    for unit in [
        "orderfleet-worker@orders.service",
        "orderfleet-migrate.service",
    ] {
        // Exposure 0-10, threshold in tenths: fail above 2.0 ("OK" in systemd's words).
        let out = systemd_analyze(&[
            "security",
            "--offline=yes",
            "--threshold=20",
            &units.unit(unit),
        ]);
        assert!(
            out.status.success(),
            "{unit} is exposed above 2.0:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_worker_unit_is_notify_with_a_watchdog_and_stops_after_the_shutdown_grace() {
    let unit = read("orderfleet-worker@.service");
    let env = read("worker.env.example");
    assert_eq!(setting(&unit, "Type").as_deref(), Some("notify"));
    assert_eq!(setting(&unit, "NotifyAccess").as_deref(), Some("main"));
    assert_eq!(setting(&unit, "Restart").as_deref(), Some("on-failure"));
    assert_eq!(setting(&unit, "KillSignal").as_deref(), Some("SIGTERM"));
    assert_eq!(setting(&unit, "DynamicUser").as_deref(), Some("yes"));
    assert_eq!(setting(&unit, "ProtectSystem").as_deref(), Some("strict"));
    assert_eq!(
        setting(&unit, "Environment").as_deref(),
        Some("ORDERFLEET_HANDLERS=%I")
    );
    let secs = |v: Option<String>, what: &str| -> u64 {
        v.and_then(|v| v.trim_end_matches('s').parse().ok())
            .unwrap_or_else(|| panic!("{what} must be whole seconds"))
    };
    assert!(secs(setting(&unit, "WatchdogSec"), "WatchdogSec") > 0);
    let stop = secs(setting(&unit, "TimeoutStopSec"), "TimeoutStopSec");
    let grace = secs(
        setting(&env, "ORDERFLEET_SHUTDOWN_GRACE_SECS"),
        "ORDERFLEET_SHUTDOWN_GRACE_SECS in worker.env.example",
    );
    assert!(
        stop >= grace + 5,
        "TimeoutStopSec={stop} leaves no time after the {grace}s grace to flush and exit"
    );
    let told = setting(&env, "ORDERFLEET_STOP_TIMEOUT_SECS");
    assert_eq!(
        told.as_deref(),
        Some(stop.to_string().as_str()),
        "the worker must be told the unit's TimeoutStopSec"
    );
    let wait = setting(&env, "ORDERFLEET_WAIT_TIME_SECS").expect("ORDERFLEET_WAIT_TIME_SECS");
    worker_accepts_stop_budget(&wait, &grace.to_string(), &stop.to_string())
        .expect("the example settings' stop must fit in TimeoutStopSec");
}

/// What the worker says at startup of these shutdown settings.
fn worker_accepts_stop_budget(wait: &str, grace: &str, stop: &str) -> anyhow::Result<()> {
    use clap::Parser;
    #[derive(Parser)]
    struct Settings {
        #[command(flatten)]
        consumer: orderfleet::worker::ConsumerArgs,
    }
    Settings::try_parse_from([
        "orderfleet-worker",
        "--wait-time-secs",
        wait,
        "--shutdown-grace-secs",
        grace,
        "--stop-timeout-secs",
        stop,
    ])?
    .consumer
    .check_stop_budget()
}

#[test]
fn a_stop_budget_that_overruns_the_stop_timeout_is_refused_with_the_flags_to_change() {
    let err = worker_accepts_stop_budget("20", "25", "40").expect_err("55 s cannot fit in 40 s");
    let msg = err.to_string();
    for flag in [
        "--wait-time-secs",
        "--shutdown-grace-secs",
        "--stop-timeout-secs",
    ] {
        assert!(msg.contains(flag), "{msg}");
    }
    worker_accepts_stop_budget("1", "25", "40").expect("1 + 5 + 25 + 5 s fits in 40 s");
}

#[test]
fn the_example_env_file_lists_every_worker_setting() {
    let env = read("worker.env.example");
    let help = Command::new(env!("CARGO_BIN_EXE_orderfleet-worker"))
        .arg("--help")
        .output()
        .expect("orderfleet-worker --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let documented = |name: &str| {
        env.lines()
            .any(|l| l.trim_start_matches('#').starts_with(&format!("{name}=")))
    };
    // The handlers come from the unit's instance name, not from the file.
    let missing: Vec<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
        .filter(|name| !matches!(*name, "ORDERFLEET_HANDLERS" | "ORDERFLEET_ALL"))
        .filter(|name| !documented(name))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/systemd/worker.env.example lacks {missing:?}; add each with a dummy value \
         (commented out if optional)"
    );
}
