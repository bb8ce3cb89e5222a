//! Progress of a long operation on stderr: a redrawn bar on a terminal, a plain line every few
//! seconds otherwise (logs, CI), so that neither floods the other.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const TTY_EVERY: Duration = Duration::from_millis(100);
const PLAIN_EVERY: Duration = Duration::from_secs(5);
const BAR_WIDTH: usize = 30;

/// Counts of an operation in progress, drawn on stderr.
#[derive(Debug)]
pub struct Progress {
    label: String,
    /// Denominator of the bar (e.g. the queue's depth at the start), when known.
    total: Option<u64>,
    /// Messages examined so far (the bar's position).
    pub examined: u64,
    /// Messages acted on (moved, exported, sent).
    pub done: u64,
    pub failed: u64,
    started: Instant,
    last_draw: Option<Instant>,
    tty: bool,
    enabled: bool,
}

impl Progress {
    /// Progress drawn on stderr: a bar on a terminal, periodic lines otherwise.
    pub fn stderr(label: impl Into<String>, total: Option<u64>) -> Self {
        Progress {
            label: label.into(),
            total,
            examined: 0,
            done: 0,
            failed: 0,
            started: Instant::now(),
            last_draw: None,
            tty: std::io::stderr().is_terminal(),
            enabled: true,
        }
    }

    /// Progress that draws nothing (tests, `--json`).
    pub fn hidden() -> Self {
        Progress {
            enabled: false,
            ..Progress::stderr("", None)
        }
    }

    /// Redraws if it is time to.
    pub fn tick(&mut self) {
        if !self.enabled {
            return;
        }
        let every = if self.tty { TTY_EVERY } else { PLAIN_EVERY };
        if self.last_draw.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.draw(false);
    }

    /// Draws the final state and ends the bar's line.
    pub fn finish(&mut self) {
        if self.enabled && (self.last_draw.is_some() || self.tty) {
            self.draw(true);
        }
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        let of = match self.total {
            Some(t) => format!("{}/~{t} examined", self.examined),
            None => format!("{} examined", self.examined),
        };
        format!(
            "{}: {} done, {} failed, {of}, {rate:.1}/s",
            self.label, self.done, self.failed
        )
    }

    fn draw(&mut self, last: bool) {
        self.last_draw = Some(Instant::now());
        let mut err = std::io::stderr().lock();
        if self.tty {
            let filled = match self.total {
                Some(t) if t > 0 => ((self.examined.min(t) * BAR_WIDTH as u64) / t) as usize,
                _ => 0,
            };
            let bar = format!("[{}{}]", "#".repeat(filled), ".".repeat(BAR_WIDTH - filled));
            let _ = write!(err, "\r\x1b[2K{bar} {}", self.line());
            if last {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{}", self.line());
        }
        let _ = err.flush();
    }
}
