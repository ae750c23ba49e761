//! The ffmpeg ladder: one child per *run* (a run = one continuous FLV input from one publisher),
//! fed FLV on stdin, writing MPEG-TS segments cut at forced keyframes on slot boundaries.
//!
//! Each run has a supervisor thread that spawns the child (so `die_with_parent` ties the child
//! to a thread that lives exactly as long as it), a writer thread that copies FLV tags to stdin,
//! and a tokio task (`poll_segments`) that reads ffmpeg's CSV segment lists and hands finished
//! segments to the channel as `Bytes`, deleting the files.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use streaming_core::config::ChannelConfig;
use tokio::sync::mpsc;

use crate::segments::{RunTimeline, parse_csv_line};
use streaming_core::sync::lock;

/// FLV tags buffered towards a run's stdin: about 20 s of a 25 fps stream with audio. More means
/// ffmpeg stalled; the run is then restarted rather than buffering without bound.
pub const INPUT_QUEUE_TAGS: usize = 1024;
/// How often the CSV segment lists are read.
pub const POLL_EVERY: Duration = Duration::from_millis(100);
/// stderr lines kept for the crash report.
const STDERR_TAIL: usize = 12;

/// x264 settings shared by the ladder and its slate, so a slate segment decodes with the same
/// codec parameters as the live ones: Main profile level 4.0 with CABAC (ultrafast would
/// otherwise signal Constrained Baseline while the master playlist announces Main,
/// streaming_hls::master::CODECS), constant bitrate, and no keyframes but the forced ones.
fn x264_args(preset: &str, video_kbps: u32) -> Vec<String> {
    let vb = format!("{video_kbps}k");
    [
        "-c:v",
        "libx264",
        "-preset",
        preset,
        "-profile:v",
        "main",
        "-level:v",
        "4.0",
        "-coder",
        "1",
        "-b:v",
        &vb,
        "-maxrate",
        &vb,
        "-bufsize",
        &vb,
        "-g",
        "9999",
        "-sc_threshold",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The ffmpeg arguments of a ladder run (exactly the flags the timeline spike measured).
/// `first_frame_s` is C: the time of the first frame fed, so forced keyframes land on absolute
/// multiples of `segment_s`.
pub fn ladder_args(
    channel: &ChannelConfig,
    segment_s: u32,
    first_frame_s: f64,
    dir: &Path,
) -> Vec<String> {
    let n = channel.ladder.len();
    let mut filter = format!("[0:v]split={n}");
    for i in 0..n {
        filter.push_str(&format!("[s{i}]"));
    }
    for (i, r) in channel.ladder.iter().enumerate() {
        filter.push_str(&format!(";[s{i}]scale={}:{}[v{i}]", r.width, r.height));
    }
    let c = format!("{first_frame_s:.3}");
    let d = segment_s;
    let force = format!(
        "expr:if(isnan(prev_forced_t),1,gte(floor((t+{c})/{d}),floor((prev_forced_t+{c})/{d})+1))"
    );
    let mut args: Vec<String> = [
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "warning",
        "-copyts",
        "-f",
        "flv",
        "-i",
        "pipe:0",
        "-filter_complex",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(filter);
    for (i, r) in channel.ladder.iter().enumerate() {
        let list = dir.join(format!("r{i}.csv")).display().to_string();
        let pattern = dir.join(format!("r{i}_%05d.ts")).display().to_string();
        let map_v = format!("[v{i}]");
        let ab = format!("{}k", channel.audio_kbps);
        args.extend(
            ["-map", &map_v, "-map", "0:a"]
                .iter()
                .map(|s| s.to_string()),
        );
        args.extend(x264_args(&channel.preset, r.video_kbps));
        let part: &[&str] = &[
            "-forced-idr",
            "1",
            "-force_key_frames",
            &force,
            "-fps_mode",
            "passthrough",
            "-enc_time_base",
            "1:1000",
            "-c:a",
            "aac",
            "-b:a",
            &ab,
            "-muxdelay",
            "0",
            "-muxpreload",
            "0",
            "-f",
            "segment",
            "-segment_time",
            "0.1",
            "-segment_format",
            "mpegts",
            "-reset_timestamps",
            "0",
            "-segment_list",
            &list,
            "-segment_list_type",
            "csv",
            "-segment_list_flags",
            "live",
            &pattern,
        ];
        args.extend(part.iter().map(|s| s.to_string()));
    }
    args
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunExit {
    /// `exit status: 0`, `signal: 9`, or a spawn error.
    pub status: String,
    pub success: bool,
    pub stderr_tail: Vec<String>,
}

/// The channel's side of a running ffmpeg child.
pub struct RunHandle {
    pub run_id: u64,
    input: Option<SyncSender<Bytes>>,
    pid: Arc<Mutex<Option<u32>>>,
    pub started: std::time::Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub enum FeedError {
    /// ffmpeg does not keep up (or hangs).
    Stalled,
    /// The child's stdin is gone: it exited; `RunExited` follows.
    Gone,
}

impl RunHandle {
    /// Queues one FLV chunk for the child's stdin without blocking the async runtime.
    pub fn feed(&self, bytes: Bytes) -> Result<(), FeedError> {
        let Some(input) = &self.input else {
            return Err(FeedError::Gone);
        };
        input.try_send(bytes).map_err(|e| match e {
            TrySendError::Full(_) => FeedError::Stalled,
            TrySendError::Disconnected(_) => FeedError::Gone,
        })
    }

    /// Ends the input: ffmpeg flushes its last segments and exits by itself.
    pub fn finish(&mut self) {
        self.input = None;
    }

    /// Hard stop for a stalled child.
    pub fn kill(&mut self) {
        self.input = None;
        if let Some(pid) = *lock(&self.pid) {
            // SAFETY: plain syscall; the pid is our own child, still unreaped while the
            // supervisor thread waits for it.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

/// Everything a run needs to start.
pub struct RunSpec {
    pub channel_name: String,
    pub run_id: u64,
    pub config: ChannelConfig,
    pub segment_s: u32,
    pub timeline: RunTimeline,
    pub dir: PathBuf,
}

/// What a run reports to whoever started it. Its own type, so the transcoder knows nothing of
/// the channel task that consumes it (the channel wraps it in its message type).
#[derive(Debug)]
pub enum RunEvent {
    /// A finished segment, placed on the shared timeline.
    Segment {
        run_id: u64,
        rendition: usize,
        slot: u64,
        data: Bytes,
    },
    /// The run ended; no segment of it follows.
    Exited { run_id: u64, exit: RunExit },
}

/// Starts a run: work dir, supervisor thread (child + stdin writer), segment poller, which
/// reports on `events`.
pub fn start_run<M>(spec: RunSpec, events: mpsc::Sender<M>) -> std::io::Result<RunHandle>
where
    M: From<RunEvent> + Send + 'static,
{
    std::fs::create_dir_all(&spec.dir)?;
    let args = ladder_args(
        &spec.config,
        spec.segment_s,
        spec.timeline.first_frame_ms / 1000.0,
        &spec.dir,
    );
    let (input_tx, input_rx) = std::sync::mpsc::sync_channel::<Bytes>(INPUT_QUEUE_TAGS);
    let pid = Arc::new(Mutex::new(None));
    let exit: Arc<Mutex<Option<RunExit>>> = Arc::new(Mutex::new(None));
    {
        let (pid, exit, channel, run_id) = (
            pid.clone(),
            exit.clone(),
            spec.channel_name.clone(),
            spec.run_id,
        );
        std::thread::Builder::new()
            .name(format!("ffmpeg-{channel}-{run_id}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    supervise(&args, input_rx, &pid)
                }))
                .unwrap_or_else(|_| RunExit {
                    status: "supervisor panicked".into(),
                    success: false,
                    stderr_tail: Vec::new(),
                });
                *lock(&exit) = Some(result);
            })?;
    }
    let run_id = spec.run_id;
    tokio::spawn(poll_segments(spec, exit, events));
    Ok(RunHandle {
        run_id,
        input: Some(input_tx),
        pid,
        started: std::time::Instant::now(),
    })
}

/// Body of the supervisor thread: runs the child to its end.
fn supervise(
    args: &[String],
    input: std::sync::mpsc::Receiver<Bytes>,
    pid_slot: &Mutex<Option<u32>>,
) -> RunExit {
    let mut command = ffmpeg_sidecar::command::FfmpegCommand::new();
    command.args(args);
    streaming_core::process::die_with_parent(command.as_inner_mut());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return RunExit {
                status: format!("spawn failed: {e}"),
                success: false,
                stderr_tail: Vec::new(),
            };
        }
    };
    *lock(pid_slot) = Some(child.as_inner().id());
    // ffmpeg-sidecar insists on a piped stdout; our outputs are files, so just drain it.
    if let Some(mut stdout) = child.take_stdout() {
        let _ = std::thread::Builder::new()
            .name("ffmpeg-stdout".into())
            .spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    }
    if let Some(mut stdin) = child.take_stdin() {
        let _ = std::thread::Builder::new()
            .name("ffmpeg-stdin".into())
            .spawn(move || {
                while let Ok(chunk) = input.recv() {
                    if stdin.write_all(&chunk).is_err() {
                        break;
                    }
                }
                // Dropping stdin is ffmpeg's end of input.
            });
    }
    let mut tail: VecDeque<String> = VecDeque::with_capacity(STDERR_TAIL);
    if let Some(stderr) = child.take_stderr() {
        let mut reader = std::io::BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            // Lines are bounded by ffmpeg itself; a runaway line is cut when kept.
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text: String = String::from_utf8_lossy(&line)
                        .trim_end()
                        .chars()
                        .take(400)
                        .collect();
                    tracing::debug!(target: "ffmpeg", "{text}");
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(text);
                }
            }
        }
    }
    let status = child.wait();
    *lock(pid_slot) = None;
    match status {
        Ok(s) => RunExit {
            status: s.to_string(),
            success: s.success(),
            stderr_tail: tail.into(),
        },
        Err(e) => RunExit {
            status: format!("wait failed: {e}"),
            success: false,
            stderr_tail: tail.into(),
        },
    }
}

/// Reads the CSV lists of a run until the child exited, forwarding placed segments.
async fn poll_segments<M: From<RunEvent>>(
    spec: RunSpec,
    exit: Arc<Mutex<Option<RunExit>>>,
    events: mpsc::Sender<M>,
) {
    let n = spec.config.ladder.len();
    let mut consumed = vec![0usize; n];
    loop {
        let finished = lock(&exit).clone();
        for (rendition, done) in consumed.iter_mut().enumerate() {
            let list = spec.dir.join(format!("r{rendition}.csv"));
            let Ok(text) = tokio::fs::read_to_string(&list).await else {
                continue;
            };
            // Only complete lines: ffmpeg may be mid-write.
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            for (index, line) in complete.lines().enumerate().skip(*done) {
                *done = index + 1;
                let Some(entry) = parse_csv_line(line) else {
                    tracing::warn!(channel = %spec.channel_name, run = spec.run_id, "unreadable segment list line {line:?}");
                    continue;
                };
                let path = spec.dir.join(&entry.file);
                match spec.timeline.place(index, &entry) {
                    Ok(slot) => match tokio::fs::read(&path).await {
                        Ok(data) => {
                            let msg = RunEvent::Segment {
                                run_id: spec.run_id,
                                rendition,
                                slot,
                                data: Bytes::from(data),
                            };
                            if events.send(msg.into()).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(channel = %spec.channel_name, file = %path.display(), "cannot read segment: {e}")
                        }
                    },
                    Err(why) => {
                        tracing::debug!(channel = %spec.channel_name, run = spec.run_id, file = %entry.file, "segment dropped: {why:?}")
                    }
                }
                let _ = tokio::fs::remove_file(&path).await;
            }
        }
        if let Some(result) = finished {
            let _ = tokio::fs::remove_dir_all(&spec.dir).await;
            let exited = RunEvent::Exited {
                run_id: spec.run_id,
                exit: result,
            };
            let _ = events.send(exited.into()).await;
            return;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Font for the slate's text (Debian `fonts-dejavu-core`); without it the slate is plain.
pub const SLATE_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Encodes the "NO SIGNAL" slate of one rendition: D seconds of video with silence, the same
/// codec parameters as the ladder, as one MPEG-TS segment starting with a keyframe.
/// Blocking: call from `spawn_blocking`.
pub fn encode_slate(
    channel: &ChannelConfig,
    rendition: usize,
    segment_s: u32,
    dir: &Path,
) -> anyhow::Result<Bytes> {
    use anyhow::Context;
    let r = &channel.ladder[rendition];
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let out = dir.join(format!("slate-{}.ts", r.name));
    let mut vf = String::from("format=yuv420p");
    if Path::new(SLATE_FONT).exists() {
        vf.push_str(&format!(
            ",drawtext=fontfile={SLATE_FONT}:text='NO SIGNAL':fontcolor=white:fontsize=h/8:x=(w-text_w)/2:y=(h-text_h)/2"
        ));
    }
    let mut command = std::process::Command::new("ffmpeg");
    command
        .args([
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg(format!(
            "color=c=0x202030:s={}x{}:r={}:d={segment_s}",
            r.width, r.height, channel.fps
        ))
        .args([
            "-f",
            "lavfi",
            "-i",
            "anullsrc=r=48000:cl=stereo",
            "-t",
            &segment_s.to_string(),
            "-vf",
            &vf,
        ])
        .args(x264_args(&channel.preset, r.video_kbps))
        .args([
            "-c:a",
            "aac",
            "-b:a",
            &format!("{}k", channel.audio_kbps),
            "-muxdelay",
            "0",
            "-muxpreload",
            "0",
        ])
        .args(["-f", "mpegts"])
        .arg(&out)
        .stdin(std::process::Stdio::null());
    streaming_core::process::die_with_parent(&mut command);
    let output = command
        .output()
        .context("cannot run ffmpeg for the slate")?;
    if !output.status.success() {
        anyhow::bail!(
            "ffmpeg slate for {} failed ({}): {}",
            r.name,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let data = std::fs::read(&out).with_context(|| format!("cannot read {}", out.display()))?;
    let _ = std::fs::remove_file(&out);
    Ok(Bytes::from(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use streaming_core::config::Rendition;

    pub(crate) fn channel() -> ChannelConfig {
        ChannelConfig {
            name: "test".into(),
            fps: 25,
            preset: "ultrafast".into(),
            audio_kbps: 96,
            ladder: vec![
                Rendition {
                    name: "360p".into(),
                    width: 640,
                    height: 360,
                    video_kbps: 800,
                },
                Rendition {
                    name: "240p".into(),
                    width: 426,
                    height: 240,
                    video_kbps: 400,
                },
                Rendition {
                    name: "144p".into(),
                    width: 256,
                    height: 144,
                    video_kbps: 200,
                },
            ],
        }
    }

    #[test]
    fn ladder_args_follow_the_measured_command() {
        let args = ladder_args(&channel(), 2, 13.37, Path::new("/w"));
        let joined = args.join(" ");
        assert!(joined.starts_with(
            "-hide_banner -nostdin -loglevel warning -copyts -f flv -i pipe:0 -filter_complex "
        ));
        assert!(args.contains(
            &"[0:v]split=3[s0][s1][s2];[s0]scale=640:360[v0];[s1]scale=426:240[v1];[s2]scale=256:144[v2]".to_string()
        ));
        assert!(args.contains(
            &"expr:if(isnan(prev_forced_t),1,gte(floor((t+13.370)/2),floor((prev_forced_t+13.370)/2)+1))".to_string()
        ));
        assert_eq!(args.iter().filter(|a| *a == "-segment_list").count(), 3);
        assert!(joined.contains("-map [v1] -map 0:a -c:v libx264 -preset ultrafast -profile:v main -level:v 4.0 -coder 1 -b:v 400k -maxrate 400k -bufsize 400k"));
        assert!(joined.contains(
            "-segment_list /w/r2.csv -segment_list_type csv -segment_list_flags live /w/r2_%05d.ts"
        ));
    }
}
