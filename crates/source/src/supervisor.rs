//! Keeps exactly one ffmpeg encode running on a dedicated thread, and publishes what it encodes.
//!
//! The thread spawns ffmpeg (with a parent-death signal, so the child never outlives this thread),
//! reads its log through ffmpeg-sidecar, and restarts it with exponential backoff when it exits.
//! ffmpeg writes FLV to its stdout; a task on the runtime reads the tags and publishes them over
//! RTMPS to every ingest, each through its own queue with its own reconnects, so one ingest down
//! never disturbs the other. Each start takes a new anchor: the ingests learn it from the publish
//! name. A reload that changes the encode asks for an immediate restart; shutdown stops it for good.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ffmpeg_sidecar::command::FfmpegCommand;
use ffmpeg_sidecar::event::{FfmpegEvent, LogLevel};
use serde::Serialize;
use streaming_core::lifecycle::Lifecycle;
use streaming_rtmp_publish::{Backoff, Fanout, FlvReader, PublishOptions, Stream, Target};

use crate::encode::EncodeSpec;
use streaming_core::sync::lock;

/// First wait after a crash; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A run longer than this was healthy: the next crash restarts after [`MIN_BACKOFF`] again.
pub const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// How long ffmpeg gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// The same ffmpeg error line (an ingest down: one per recovery attempt) is logged at most this often.
pub const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// The encode counts as healthy while it reported progress this recently.
pub const PROGRESS_STALE: Duration = Duration::from_secs(5);
/// Media time 0 must be the anchor's wall-clock time: the ingests map timestamps to slots with
/// it and count a source as delivering only when a slot's media is in by 0.7 s after its end.
/// ffmpeg starts its real-time clock only once encoders and outputs are open, which on a busy
/// machine can take seconds after the spawn. A run whose media lags the anchor by more than this
/// is restarted with the anchor moved by the lag measured.
pub const MAX_START_LAG_MS: i64 = 300;
/// The other way: media ahead of its anchor by more than this (this start was quicker than
/// the one the delay was measured on) claims wall-clock times it has not reached, so every
/// PROGRAM-DATE-TIME and every latency figure would understate the real delay by as much.
/// Corrected the same way.
pub const MAX_START_LEAD_MS: i64 = 150;
/// Restarts for a late start in a row; after them the next run is first checked only once the
/// machine had time to settle ([`SETTLED_CHECK_MS`] of media).
const MAX_LAG_CORRECTIONS: u32 = 3;
/// Media time of the first check after [`MAX_LAG_CORRECTIONS`] restarts in a row.
const SETTLED_CHECK_MS: i64 = 30_000;
/// A run is checked again every this much media time: one whose start was measured wrong (a
/// machine busy starting a whole cluster jitters the measure by a second) would otherwise
/// never deliver a slot on time, and the ingests would never come back to it.
const LAG_RECHECK_MS: i64 = 10_000;
/// The bound of those later checks, looser than the start's: they catch runs that are off,
/// not the jitter of the progress reports.
const MAX_RUNNING_SKEW_MS: i64 = 600;
/// Tags queued per ingest before a stuck one starts dropping (about 3.5 s at 25 fps + audio).
pub const PUBLISH_QUEUE_TAGS: usize = 256;
/// Reconnection waits towards an ingest that went away: at most a second, so a restarted
/// ingest gets its sources back within a second of listening.
pub const PUBLISH_BACKOFF: Backoff = Backoff {
    first: Duration::from_millis(500),
    max: Duration::from_secs(1),
};

/// What `/status` shows and `/healthz` decides on.
#[derive(Debug, Default, Clone, Serialize)]
pub struct EncodeStatus {
    pub running: bool,
    pub pid: Option<u32>,
    /// Wall-clock unix ms of media time 0 of the current encode.
    pub anchor_ms: Option<u64>,
    /// Times ffmpeg exited on its own and was restarted.
    pub restarts: u64,
    /// Frames encoded by the current ffmpeg.
    pub frames: u64,
    pub last_exit: Option<String>,
    pub outputs: Vec<String>,
}

#[derive(Default)]
struct Control {
    /// `None` once shutdown was asked for.
    spec: Option<EncodeSpec>,
    /// Set by [`Supervisor::replace`]: the current exit is wanted, restart without backoff.
    restart_now: bool,
    /// Pid of the live child; cleared before the child is reaped, so a kill never hits a reused pid.
    pid: Option<u32>,
}

struct Shared {
    /// The channel this encode publishes: every metric carries it.
    channel: String,
    control: Mutex<Control>,
    wake: Condvar,
    status: Mutex<EncodeStatus>,
    /// Millis since `epoch` of the last progress line.
    last_progress_ms: AtomicU64,
    epoch: Instant,
    /// Where the publishing tasks run (the supervisor itself is a plain thread).
    runtime: tokio::runtime::Handle,
    lifecycle: Lifecycle,
}

/// Handle to the supervisor thread.
pub struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts the supervisor thread; must be called on the runtime that runs the publishing.
    pub fn start(spec: EncodeSpec, lifecycle: Lifecycle) -> std::io::Result<Self> {
        let spec_channel = spec.channel.clone();
        let shared = Arc::new(Shared {
            channel: spec_channel.clone(),
            control: Mutex::new(Control {
                spec: Some(spec),
                ..Control::default()
            }),
            wake: Condvar::new(),
            status: Mutex::new(EncodeStatus::default()),
            last_progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            runtime: tokio::runtime::Handle::current(),
            lifecycle,
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ffmpeg-{}", spec_channel))
            .spawn(move || supervise(&thread_shared))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The encode currently wanted.
    pub fn spec(&self) -> Option<EncodeSpec> {
        lock(&self.shared.control).spec.clone()
    }

    /// Switches to a new encode: the running ffmpeg is stopped and the new one starts at once.
    pub fn replace(&self, spec: EncodeSpec) {
        let mut control = lock(&self.shared.control);
        control.spec = Some(spec);
        control.restart_now = true;
        terminate(control.pid);
        self.shared.wake.notify_all();
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> EncodeStatus {
        lock(&self.shared.status).clone()
    }

    /// True while ffmpeg runs and reported progress in the last [`PROGRESS_STALE`].
    pub fn is_healthy(&self) -> bool {
        let running = lock(&self.shared.status).running;
        let last = self.shared.last_progress_ms.load(Ordering::Relaxed);
        let now = self.shared.epoch.elapsed().as_millis() as u64;
        running && last > 0 && now.saturating_sub(last) < PROGRESS_STALE.as_millis() as u64
    }

    /// Stops ffmpeg (SIGTERM, then SIGKILL after [`STOP_GRACE`]) and joins the thread. Blocking.
    pub fn stop(mut self) {
        let pid = {
            let mut control = lock(&self.shared.control);
            control.spec = None;
            terminate(control.pid);
            self.shared.wake.notify_all();
            control.pid
        };
        let deadline = Instant::now() + STOP_GRACE;
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if !thread.is_finished() {
                let still = lock(&self.shared.control).pid.or(pid);
                if let Some(pid) = still {
                    tracing::warn!(pid, "ffmpeg ignored SIGTERM, killing it");
                    signal(Some(pid), libc::SIGKILL);
                }
            }
            let _ = thread.join();
        }
    }
}

fn terminate(pid: Option<u32>) {
    signal(pid, libc::SIGTERM);
}

fn signal(pid: Option<u32>, sig: libc::c_int) {
    if let Some(pid) = pid.and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: plain syscall; the pid is our unreaped child (see `Control::pid`).
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn supervise(shared: &Shared) {
    let mut backoff = MIN_BACKOFF;
    // How long ffmpeg takes from spawn to its first frame, as last measured: added to the anchor.
    let mut start_delay_ms: i64 = 0;
    let mut corrections = 0;
    loop {
        let spec = {
            let mut control = lock(&shared.control);
            control.restart_now = false;
            match control.spec.clone() {
                Some(spec) => spec,
                None => break,
            }
        };
        let anchor_ms = streaming_hls::timeline::unix_now_ms() + start_delay_ms.max(0) as u64;
        let started = Instant::now();
        let first_check_ms = if corrections < MAX_LAG_CORRECTIONS {
            1000
        } else {
            SETTLED_CHECK_MS
        };
        let exit = match run_once(shared, &spec, anchor_ms, first_check_ms) {
            RunEnd::Exited(exit) => exit,
            RunEnd::Late { lag_ms } => {
                // Off after a long run: a new problem, not one more try at the same start.
                if started.elapsed() > HEALTHY_RUN {
                    corrections = 0;
                }
                corrections += 1;
                start_delay_ms = (start_delay_ms + lag_ms).clamp(0, 10_000);
                tracing::warn!(
                    lag_ms,
                    start_delay_ms,
                    "ffmpeg's media started {lag_ms} ms after its anchor (negative: before it): \
                     restarting with the anchor {start_delay_ms} ms after the spawn"
                );
                continue;
            }
        };
        let (wanted, stopping) = {
            let control = lock(&shared.control);
            (control.restart_now, control.spec.is_none())
        };
        {
            let mut status = lock(&shared.status);
            status.running = false;
            status.pid = None;
            status.last_exit = Some(exit.clone());
        }
        metrics::gauge!("source_ffmpeg_running", "channel" => shared.channel.clone()).set(0.0);
        if stopping {
            tracing::info!("ffmpeg stopped ({exit})");
            break;
        }
        if wanted {
            tracing::info!("ffmpeg stopped for a new encode ({exit}); restarting now");
            backoff = MIN_BACKOFF;
            continue;
        }
        if started.elapsed() > HEALTHY_RUN {
            backoff = MIN_BACKOFF;
            corrections = 0;
        }
        lock(&shared.status).restarts += 1;
        metrics::counter!("source_ffmpeg_restarts_total", "channel" => shared.channel.clone())
            .increment(1);
        tracing::error!("ffmpeg exited ({exit}); restarting in {backoff:?} with a new anchor");
        // Sleep, but wake at once for shutdown or a new spec.
        let control = lock(&shared.control);
        let _ = shared
            .wake
            .wait_timeout_while(control, backoff, |c| c.spec.is_some() && !c.restart_now);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How one ffmpeg run ended.
enum RunEnd {
    /// It exited; how, for the log.
    Exited(String),
    /// Stopped on purpose: its media time lagged the anchor by `lag_ms` (or led it: negative).
    Late { lag_ms: i64 },
}

/// `HH:MM:SS.cc` (ffmpeg's `time=`, possibly negative) in milliseconds.
pub fn parse_media_time_ms(time: &str) -> Option<i64> {
    let (sign, time) = match time.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, time),
    };
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let seconds: f64 = s.parse().ok()?;
    let total = h.parse::<i64>().ok()? * 3_600_000 + m.parse::<i64>().ok()? * 60_000;
    Some(sign * (total + (seconds * 1000.0).round() as i64))
}

/// Runs one ffmpeg to its end, or until its media turns out to be off its anchor.
fn run_once(shared: &Shared, spec: &EncodeSpec, anchor_ms: u64, first_check_ms: i64) -> RunEnd {
    match run_and_watch(shared, spec, anchor_ms, first_check_ms) {
        Ok(exit) => RunEnd::Exited(exit),
        Err(lag_ms) => RunEnd::Late { lag_ms },
    }
}

fn run_and_watch(
    shared: &Shared,
    spec: &EncodeSpec,
    anchor_ms: u64,
    first_check_ms: i64,
) -> Result<String, i64> {
    // Read at every start, so a renewed CA bundle applies from the next run on.
    let tls = match streaming_rtmp_publish::client_config(&spec.ca_cert) {
        Ok(tls) => tls,
        Err(e) => return Ok(format!("cannot load the CA to verify the ingests: {e}")),
    };
    let mut command = FfmpegCommand::new_with_path("ffmpeg");
    command.args(spec.ffmpeg_args());
    // Which channel this encode is, for operators' tools (`streamctl kill --ffmpeg`).
    command
        .as_inner_mut()
        .env(streaming_core::process::CHANNEL_ENV, &spec.channel);
    streaming_core::process::die_with_parent(command.as_inner_mut());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return Ok(format!("cannot start ffmpeg: {e}")),
    };
    let pid = child.as_inner().id();
    // Taken before ffmpeg-sidecar's iterator, which would otherwise read it for raw frames.
    let Some(stdout) = child.take_stdout() else {
        let _ = child.as_inner_mut().kill();
        let _ = child.wait();
        return Ok("ffmpeg's stdout is not a pipe".into());
    };
    let stream = Stream {
        label: format!("{} from {} (anchor {anchor_ms})", spec.channel, spec.host),
        publish_name: spec.publish_name(anchor_ms),
    };
    let options = PublishOptions {
        tls,
        app: "live".into(),
        queue_tags: PUBLISH_QUEUE_TAGS,
        backoff: PUBLISH_BACKOFF,
        failures_metric: "source_publish_failures_total",
        bind: Some(spec.address),
    };
    shared.runtime.spawn(publish(
        stdout,
        stream,
        spec.ingests.clone(),
        options,
        shared.lifecycle.clone(),
    ));
    mark_started(shared, spec, pid, anchor_ms);
    let late = match child.iter() {
        Ok(events) => watch_log(shared, events, pid, anchor_ms, first_check_ms),
        Err(e) => {
            tracing::error!("cannot read ffmpeg's log: {e}");
            None
        }
    };
    // The log ended: ffmpeg exited (or closed stderr). Forget the pid before reaping it.
    lock(&shared.control).pid = None;
    let _ = child.as_inner_mut().kill();
    let exit = match child.wait() {
        Ok(status) => format!("{status}"),
        Err(e) => format!("wait failed: {e}"),
    };
    match late {
        Some(lag_ms) => Err(lag_ms),
        None => Ok(exit),
    }
}

/// Records a started run: its pid for stop() and replace() (applying one that came while it
/// started), and the status and gauges `/status` and `/metrics` show.
fn mark_started(shared: &Shared, spec: &EncodeSpec, pid: u32, anchor_ms: u64) {
    {
        let mut control = lock(&shared.control);
        control.pid = Some(pid);
        // A replace() or stop() that came between reading the spec and now must still apply.
        if control.restart_now || control.spec.is_none() {
            terminate(Some(pid));
        }
    }
    {
        let mut status = lock(&shared.status);
        status.running = true;
        status.pid = Some(pid);
        status.anchor_ms = Some(anchor_ms);
        status.frames = 0;
        status.outputs = spec
            .ingests
            .iter()
            .map(|target| format!("{target:?}"))
            .collect();
    }
    let channel = || shared.channel.clone();
    metrics::gauge!("source_ffmpeg_running", "channel" => channel()).set(1.0);
    metrics::gauge!("source_anchor_ms", "channel" => channel()).set(anchor_ms as f64);
    tracing::info!(pid, anchor_ms, ?spec, "ffmpeg encode started");
}

/// Follows ffmpeg's log until it ends: progress feeds the watchdog and the status, warnings and
/// errors are logged (each line at most once per [`REPEAT_LOG_INTERVAL`]). At `first_check_ms`
/// of media, then every [`LAG_RECHECK_MS`], the media time is compared with the wall clock: a
/// run too far off its anchor is ended and its lag returned.
fn watch_log(
    shared: &Shared,
    events: impl Iterator<Item = FfmpegEvent>,
    pid: u32,
    anchor_ms: u64,
    first_check_ms: i64,
) -> Option<i64> {
    let mut next_check_ms = first_check_ms;
    let mut bounds = -MAX_START_LEAD_MS..=MAX_START_LAG_MS;
    let mut last_logged: HashMap<String, Instant> = HashMap::new();
    for event in events {
        match event {
            FfmpegEvent::Progress(p) => {
                shared.last_progress_ms.store(
                    shared.epoch.elapsed().as_millis() as u64 + 1,
                    Ordering::Relaxed,
                );
                lock(&shared.status).frames = u64::from(p.frame);
                metrics::gauge!("source_frames", "channel" => shared.channel.clone())
                    .set(f64::from(p.frame));
                if let Some(media_ms) = parse_media_time_ms(&p.time)
                    && media_ms >= next_check_ms
                {
                    let wall_ms = streaming_hls::timeline::unix_now_ms() as i64;
                    let lag_ms = wall_ms - anchor_ms as i64 - media_ms;
                    metrics::gauge!("source_start_lag_ms", "channel" => shared.channel.clone())
                        .set(lag_ms as f64);
                    if next_check_ms == first_check_ms {
                        tracing::info!(lag_ms, "media time against the anchor");
                    }
                    if !bounds.contains(&lag_ms) {
                        terminate(Some(pid));
                        return Some(lag_ms);
                    }
                    next_check_ms = media_ms + LAG_RECHECK_MS;
                    bounds = -MAX_RUNNING_SKEW_MS..=MAX_RUNNING_SKEW_MS;
                }
            }
            FfmpegEvent::Log(
                level @ (LogLevel::Warning | LogLevel::Error | LogLevel::Fatal),
                line,
            ) => {
                let now = Instant::now();
                let fresh = last_logged
                    .get(&line)
                    .is_none_or(|t| now.duration_since(*t) > REPEAT_LOG_INTERVAL);
                if fresh {
                    if last_logged.len() > 256 {
                        last_logged.clear();
                    }
                    last_logged.insert(line.clone(), now);
                    if level == LogLevel::Warning {
                        tracing::warn!(target: "ffmpeg", "{line}");
                    } else {
                        tracing::error!(target: "ffmpeg", "{line}");
                    }
                }
            }
            FfmpegEvent::Error(e) => tracing::debug!(target: "ffmpeg", "log parser: {e}"),
            _ => {}
        }
    }
    None
}

/// Reads ffmpeg's FLV from `stdout` and publishes every tag to every ingest until ffmpeg exits.
/// Ending early (unreadable FLV) closes the pipe, which ends ffmpeg and so the run.
async fn publish(
    stdout: std::process::ChildStdout,
    stream: Stream,
    ingests: Vec<Target>,
    options: PublishOptions,
    lifecycle: Lifecycle,
) {
    let stdout = match tokio::process::ChildStdout::from_std(stdout) {
        Ok(stdout) => stdout,
        Err(e) => {
            tracing::error!("cannot read ffmpeg's output: {e}");
            return;
        }
    };
    let mut reader = FlvReader::new(stdout);
    let mut fanout = Fanout::start(&stream, &ingests, &options, &lifecycle);
    loop {
        match reader.next_tag().await {
            Ok(Some(tag)) => fanout.push(&tag),
            Ok(None) => return,
            Err(e) => {
                tracing::error!(stream = %stream.label, "ffmpeg's output: {e}; ending this encode");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn media_times_parse() {
        assert_eq!(super::parse_media_time_ms("00:00:01.23"), Some(1230));
        assert_eq!(super::parse_media_time_ms("01:02:03.50"), Some(3_723_500));
        assert_eq!(super::parse_media_time_ms("-00:00:00.04"), Some(-40));
        assert_eq!(super::parse_media_time_ms("N/A"), None);
        assert_eq!(super::parse_media_time_ms("1:2:3:4"), None);
    }
}
