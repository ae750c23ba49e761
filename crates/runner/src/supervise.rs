//! `streamctl supervise`: what systemd's `Restart=on-failure` does on a real host, for the local
//! runner. One supervisor per (non-db) host leads the host's process group and runs the role's
//! service as its child in that group, so `kill NAME` (SIGKILL to the group) still kills the whole
//! "machine" and `kill --hang` (SIGSTOP to the group) still hangs it, supervisor included.
//!
//! A service that exits on its own with a failure (non-zero exit code, or a signal such as the
//! SIGABRT of a stack overflow) is started again after a backoff; a clean exit, or any exit after
//! SIGTERM/SIGINT reached the supervisor (`down`, `drain`, `sync`: they signal the group), ends
//! the supervisor too. SIGHUP (`add`, `sync` reloading configs) is passed on to the service.
//! The service's pid and the restart count are kept in a small JSON file next to the pid file.

use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use streaming_core::config::HostConfig;

/// First restart delay; doubled after each failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A service that ran this long before failing starts over at [`FIRST_BACKOFF`].
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// How often the supervisor looks at its child and at the signals it got. Polling (instead of a
/// blocking wait) means a signal arriving just before the wait is never left unforwarded.
const POLL: Duration = Duration::from_millis(50);

/// What one supervisor runs: `streamctl supervise`'s arguments.
#[derive(Debug, Clone)]
pub struct Supervised {
    /// The host's config file (`<state>/config/<host>.json`), passed on to the service.
    pub config: PathBuf,
    /// The role's service binary.
    pub binary: PathBuf,
    /// Where the service's pid and the restart count are written.
    pub service_file: PathBuf,
}

/// The supervised service as `status` and `kill --crash` read it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// The running service's pid (0 while waiting to restart it).
    pub pid: i32,
    /// Restarts after failures since the supervisor started.
    pub restarts: u64,
    /// How the previous service process ended, e.g. "killed by signal 6 (SIGABRT)".
    pub last_exit: Option<String>,
}

impl ServiceState {
    pub fn read(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    fn write(&self, path: &Path) {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        if let Err(e) = crate::files::write_file(path, &bytes, false) {
            eprintln!("streamctl supervise: cannot write {}: {e}", path.display());
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_reload(_: libc::c_int) {
    RELOAD.store(true, Ordering::SeqCst);
}

fn install_handlers() {
    let handlers: [(libc::c_int, extern "C" fn(libc::c_int)); 3] = [
        (libc::SIGTERM, on_stop),
        (libc::SIGINT, on_stop),
        (libc::SIGHUP, on_reload),
    ];
    for (signal, handler) in handlers {
        // SAFETY: a zeroed sigaction whose handler only stores an atomic (async-signal-safe).
        // Handlers, unlike SIG_IGN, are reset to the default in the child at exec.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// "exit code 3", "killed by signal 6 (SIGABRT)".
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => {
            let name = match signal {
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGBUS => " (SIGBUS)",
                libc::SIGILL => " (SIGILL)",
                _ => "",
            };
            format!("killed by signal {signal}{name}")
        }
        (None, None) => format!("{status}"),
    }
}

/// The next delay after a failure of a service that ran for `ran`.
pub fn next_backoff(previous: Option<Duration>, ran: Duration) -> Duration {
    match previous {
        Some(d) if ran < BACKOFF_RESET_AFTER => (d * 2).min(MAX_BACKOFF),
        _ => FIRST_BACKOFF,
    }
}

/// One line to the host's output (`<host>.out`, the supervisor's stdout) and its log file, so an
/// operator reading either sees why the pid changed.
fn note(log_file: Option<&Path>, line: &str) {
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::FormatTime as _;
    let mut stamp = String::new();
    let _ = tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut stamp));
    println!("{stamp} streamctl supervise: {line}");
    if let Some(path) = log_file
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(file, "{stamp}  WARN streamctl supervise: {line}");
    }
}

/// Sleeps `delay` unless a stop is asked for meanwhile; false when it was.
fn sleep_unless_stopped(delay: Duration) -> bool {
    let until = Instant::now() + delay;
    while Instant::now() < until {
        if STOP.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
    }
    !STOP.load(Ordering::SeqCst)
}

/// The body of `streamctl supervise`.
pub fn run(args: &Supervised) -> anyhow::Result<()> {
    let config = HostConfig::load(&args.config)?;
    let name = config.name.clone();
    let log_file = config
        .paths
        .log_dir
        .as_ref()
        .map(|dir| dir.join(format!("{name}.log")));
    let log_file = log_file.as_deref();
    install_handlers();
    let mut state = ServiceState::default();
    let mut backoff: Option<Duration> = None;
    loop {
        let started = Instant::now();
        let mut child = Command::new(&args.binary)
            .arg("--config")
            .arg(&args.config)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("{name}: start {}", args.binary.display()))?;
        state.pid = i32::try_from(child.id()).context("pid out of range")?;
        state.write(&args.service_file);
        if state.restarts > 0 {
            note(
                log_file,
                &format!(
                    "{name}: service started again as pid {} (restart {})",
                    state.pid, state.restarts
                ),
            );
        }
        let mut stop_forwarded = false;
        let status = loop {
            if RELOAD.swap(false, Ordering::SeqCst) {
                crate::procs::signal_pid(state.pid, libc::SIGHUP);
            }
            // Usually the service got the same SIGTERM from the group already; a second one
            // is harmless, and a SIGTERM sent to the supervisor alone must not orphan it.
            if STOP.load(Ordering::SeqCst) && !stop_forwarded {
                crate::procs::signal_pid(state.pid, libc::SIGTERM);
                stop_forwarded = true;
            }
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => anyhow::bail!("{name}: waiting for pid {}: {e}", state.pid),
            }
        };
        let how = describe_exit(status);
        let old_pid = state.pid;
        state.pid = 0;
        state.last_exit = Some(how.clone());
        state.write(&args.service_file);
        if STOP.load(Ordering::SeqCst) {
            return Ok(());
        }
        if status.success() {
            note(
                log_file,
                &format!("{name}: service pid {old_pid} ended ({how}); not restarted"),
            );
            return Ok(());
        }
        let delay = next_backoff(backoff, started.elapsed());
        backoff = Some(delay);
        note(
            log_file,
            &format!(
                "{name}: service pid {old_pid} failed after {:.1} s ({how}); restarting in {} s",
                started.elapsed().as_secs_f64(),
                delay.as_secs()
            ),
        );
        if !sleep_unless_stopped(delay) {
            return Ok(());
        }
        state.restarts += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets_after_a_long_run() {
        let short = Duration::from_secs(2);
        let mut delays = Vec::new();
        let mut previous = None;
        for _ in 0..7 {
            let d = next_backoff(previous, short);
            delays.push(d.as_secs());
            previous = Some(d);
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(
            next_backoff(Some(MAX_BACKOFF), BACKOFF_RESET_AFTER),
            FIRST_BACKOFF
        );
    }

    #[test]
    fn exits_are_described_for_operators() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGABRT)),
            "killed by signal 6 (SIGABRT)"
        );
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exit code 3");
    }
}
