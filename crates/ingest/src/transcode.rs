//! The ffmpeg ladder: one child per *run* (a run = one continuous FLV input from one publisher),
//! fed FLV on stdin, writing one MPEG-TS on stdout: every rendition's video with keyframes forced
//! on slot boundaries, and one shared audio stream, all with the publish's timestamps.
//!
//! Each run has a supervisor thread that spawns the child (so `die_with_parent` ties the child
//! to a thread that lives exactly as long as it), a writer thread that copies FLV tags to stdin,
//! and a reader thread that cuts stdout into fragmented MP4 parts and segments on the shared
//! timeline (streaming-media) and hands them to the channel.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use streaming_core::config::ChannelConfig;
use streaming_hls::PartInfo;
use streaming_media::{InitSegment, Part, PartClock};
use tokio::sync::mpsc;

use crate::cut::RunCutter;
use streaming_core::sync::lock;

/// FLV tags buffered towards a run's stdin: about 20 s of a 25 fps stream with audio. More means
/// ffmpeg stalled; the run is then restarted rather than buffering without bound.
pub const INPUT_QUEUE_TAGS: usize = 1024;
/// stderr lines kept for the crash report.
const STDERR_TAIL: usize = 12;

/// x264 settings shared by the ladder and its slate, so a slate segment decodes with the same
/// codec parameters as the live ones: Main profile level 4.0 with CABAC (ultrafast would
/// otherwise signal Constrained Baseline while the master playlist announces Main,
/// streaming_hls::master::CODECS), constant bitrate, and no keyframes but the forced ones.
/// `bitrates` holds one video bitrate per output video stream, in order.
///
/// At most one B-frame (the presets above ultrafast default to three): a part waits for the
/// frames reordered before it, and one B-frame keeps most of their gain for about 7 % fewer
/// cores (docs/benchmarks.md, "Ingest"). ultrafast keeps its none.
pub fn x264_args(preset: &str, bitrates: &[u32]) -> Vec<String> {
    let mut args: Vec<String> = ["-c:v", "libx264", "-preset", preset]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if preset != "ultrafast" {
        args.extend(["-bf".to_owned(), "1".to_owned()]);
    }
    args.extend(
        [
            "-profile:v",
            "main",
            "-level:v",
            "4.0",
            "-coder",
            "1",
            "-g",
            "9999",
            "-sc_threshold",
            "0",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    for (i, kbps) in bitrates.iter().enumerate() {
        let vb = format!("{kbps}k");
        for option in ["-b", "-maxrate", "-bufsize"] {
            args.push(format!("{option}:v:{i}"));
            args.push(vb.clone());
        }
    }
    args
}

/// Encoder timing and audio format shared by the ladder and its slate. With the same x264
/// settings they make the same SPS (its timing info follows the encoder's time base) and the
/// same AAC configuration whatever the publisher sends, so the slate's init segment is the live
/// one's and a slate part can follow live parts inside one segment (`channel::emit`).
pub fn shared_format_args(audio_kbps: u32) -> Vec<String> {
    [
        "-fps_mode",
        "passthrough",
        "-enc_time_base",
        "1:1000",
        "-c:a",
        "aac",
        "-b:a",
        &format!("{audio_kbps}k"),
        "-ar",
        "48000",
        "-ac",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// MPEG-TS as streaming-media reads it, sent as soon as it is made: no mux delay, every PES
/// with its length (a picture is complete when its bytes are in, not when the next begins),
/// one AAC frame per PES, and a flush per packet.
pub const TS_OUTPUT_ARGS: [&str; 12] = [
    "-muxdelay",
    "0",
    "-muxpreload",
    "0",
    "-omit_video_pes_length",
    "0",
    "-pes_payload_size",
    "0",
    "-flush_packets",
    "1",
    "-f",
    "mpegts",
];

/// The largest picture rate (pixels per second) one x264 thread encodes per rendition: 720p30.
/// At superfast one thread of the 2-core test machine encodes 720p at about 90 fps, three times
/// real time (docs/benchmarks.md, "Ingest").
const ONE_THREAD_MAX_PIXEL_RATE: u64 = 1280 * 720 * 30;

/// One x264 thread per rendition up to 720p30. Left to itself, each encoder starts frame
/// threads per core and a lookahead thread: the ladder's encoders then take about 5 % more
/// cores between them, and each frame thread delays every picture by one frame. Larger
/// renditions keep the frame threads, which a 1080p60 rung needs to keep up.
fn encoder_threads_args(channel: &ChannelConfig) -> Vec<String> {
    let mut args = Vec::new();
    for (i, r) in channel.ladder.iter().enumerate() {
        let pixel_rate = u64::from(r.width) * u64::from(r.height) * u64::from(channel.fps);
        if pixel_rate <= ONE_THREAD_MAX_PIXEL_RATE {
            args.extend([format!("-threads:v:{i}"), "1".to_owned()]);
        }
    }
    args
}

/// The ffmpeg arguments of a ladder run. `first_frame_s` is C: the time of the first frame
/// fed, so forced keyframes land on absolute multiples of `segment_s`. Output streams: the
/// renditions' video in ladder order, then the audio they share.
pub fn ladder_args(channel: &ChannelConfig, segment_s: u32, first_frame_s: f64) -> Vec<String> {
    let n = channel.ladder.len();
    let mut filter = format!("[0:v]split={n}");
    for i in 0..n {
        filter.push_str(&format!("[s{i}]"));
    }
    for (i, r) in channel.ladder.iter().enumerate() {
        // Square pixels, as the slate has: 16:9 scaled to 426x240 would otherwise signal a
        // sample aspect ratio and make a different SPS.
        filter.push_str(&format!(
            ";[s{i}]scale={}:{},setsar=1[v{i}]",
            r.width, r.height
        ));
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
    for i in 0..n {
        args.extend(["-map".to_owned(), format!("[v{i}]")]);
    }
    args.extend(["-map".to_owned(), "0:a".to_owned()]);
    let bitrates: Vec<u32> = channel.ladder.iter().map(|r| r.video_kbps).collect();
    args.extend(x264_args(&channel.preset, &bitrates));
    args.extend(encoder_threads_args(channel));
    args.extend([
        "-forced-idr".to_owned(),
        "1".to_owned(),
        "-force_key_frames".to_owned(),
        force,
    ]);
    args.extend(shared_format_args(channel.audio_kbps));
    args.extend(TS_OUTPUT_ARGS.iter().map(|s| s.to_string()));
    args.push("pipe:1".to_owned());
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
    pub clock: PartClock,
    /// The publish's epoch: FLV (and so MPEG-TS) time 0 is this Unix time in ms.
    pub epoch_ms: u64,
    /// C, ms after the epoch.
    pub first_frame_ms: f64,
}

/// A segment as the origin serves it: its bytes (its parts one after the other), its parts and
/// the init segment they need.
#[derive(Debug, Clone)]
pub struct SegmentMedia {
    pub init: Arc<InitSegment>,
    pub data: Bytes,
    pub parts: Vec<PartInfo>,
}

impl SegmentMedia {
    /// The segment made of these parts (`None` without parts).
    pub fn from_parts(parts: &[Part]) -> Option<Self> {
        let init = parts.last()?.init.clone();
        let mut data = BytesMut::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for part in parts {
            data.extend_from_slice(&part.data);
        }
        Some(Self {
            init,
            data: data.freeze(),
            parts: parts.iter().map(crate::channel::part_info).collect(),
        })
    }
}

/// What a run reports to whoever started it. Its own type, so the transcoder knows nothing of
/// the channel task that consumes it (the channel wraps it in its message type).
#[derive(Debug)]
pub enum RunEvent {
    /// A part, placed on the shared timeline, as soon as it is made.
    Part {
        run_id: u64,
        rendition: usize,
        part: Part,
    },
    /// Every part of this slot's segment was sent; `complete` when they cover the slot.
    SegmentEnd {
        run_id: u64,
        rendition: usize,
        slot: u64,
        complete: bool,
    },
    /// The run ended; no segment of it follows.
    Exited { run_id: u64, exit: RunExit },
}

/// Starts a run: a supervisor thread (child, stdin writer, stdout cutter) that reports on
/// `events`, the exit last.
pub fn start_run<M>(spec: RunSpec, events: mpsc::Sender<M>) -> std::io::Result<RunHandle>
where
    M: From<RunEvent> + Send + 'static,
{
    let args = ladder_args(
        &spec.config,
        (spec.clock.segment_ms / 1000) as u32,
        spec.first_frame_ms / 1000.0,
    );
    let (input_tx, input_rx) = std::sync::mpsc::sync_channel::<Bytes>(INPUT_QUEUE_TAGS);
    let pid = Arc::new(Mutex::new(None));
    let run_id = spec.run_id;
    {
        let pid = pid.clone();
        let name = format!("ffmpeg-{}-{run_id}", spec.channel_name);
        let channel = spec.channel_name.clone();
        std::thread::Builder::new().name(name).spawn(move || {
            let cutter = RunCutter::new(&spec);
            let exit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                supervise(&args, &channel, input_rx, &pid, cutter, &events)
            }))
            .unwrap_or_else(|_| RunExit {
                status: "supervisor panicked".into(),
                success: false,
                stderr_tail: Vec::new(),
            });
            let _ = events.blocking_send(RunEvent::Exited { run_id, exit }.into());
        })?;
    }
    Ok(RunHandle {
        run_id,
        input: Some(input_tx),
        pid,
        started: std::time::Instant::now(),
    })
}

/// Body of the supervisor thread: runs the child to its end; every segment its output made has
/// been handed over when this returns.
fn supervise<M: From<RunEvent> + Send + 'static>(
    args: &[String],
    channel: &str,
    input: std::sync::mpsc::Receiver<Bytes>,
    pid_slot: &Mutex<Option<u32>>,
    cutter: RunCutter,
    events: &mpsc::Sender<M>,
) -> RunExit {
    let mut command = ffmpeg_sidecar::command::FfmpegCommand::new();
    command.args(args);
    // Which channel this transcoder is, for operators' tools (`streamctl kill --ffmpeg`).
    command
        .as_inner_mut()
        .env(streaming_core::process::CHANNEL_ENV, channel);
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
    let reader = child.take_stdout().and_then(|stdout| {
        let events = events.clone();
        std::thread::Builder::new()
            .name("ffmpeg-stdout".into())
            .spawn(move || cutter.run(stdout, &events))
            .ok()
    });
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
    if let Some(reader) = reader {
        let _ = reader.join();
    }
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

#[cfg(test)]
pub(crate) mod tests {
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
    fn ladder_args_write_one_transport_stream() {
        let args = ladder_args(&channel(), 2, 13.37);
        let joined = args.join(" ");
        assert!(joined.starts_with(
            "-hide_banner -nostdin -loglevel warning -copyts -f flv -i pipe:0 -filter_complex "
        ));
        assert!(args.contains(
            &"[0:v]split=3[s0][s1][s2];[s0]scale=640:360,setsar=1[v0];[s1]scale=426:240,setsar=1[v1];[s2]scale=256:144,setsar=1[v2]".to_string()
        ));
        assert!(args.contains(
            &"expr:if(isnan(prev_forced_t),1,gte(floor((t+13.370)/2),floor((prev_forced_t+13.370)/2)+1))".to_string()
        ));
        // Video in ladder order, then the one audio stream every rendition shares.
        assert!(joined.contains("-map [v0] -map [v1] -map [v2] -map 0:a -c:v libx264 -preset ultrafast -profile:v main -level:v 4.0 -coder 1"));
        assert!(joined.contains("-b:v:1 400k -maxrate:v:1 400k -bufsize:v:1 400k"));
        assert_eq!(args.iter().filter(|a| *a == "-c:a").count(), 1);
        assert!(joined.ends_with(
            "-omit_video_pes_length 0 -pes_payload_size 0 -flush_packets 1 -f mpegts pipe:1"
        ));
        // Small renditions: one encoder thread each; ultrafast keeps its zero B-frames.
        assert!(joined.contains("-threads:v:0 1 -threads:v:1 1 -threads:v:2 1"));
        assert!(!args.contains(&"-bf".to_string()));
    }

    #[test]
    fn large_renditions_keep_frame_threads_and_b_frames_stay_at_one() {
        let mut channel = channel();
        channel.preset = "superfast".into();
        channel.fps = 30;
        channel.ladder[0] = Rendition {
            name: "1080p".into(),
            width: 1920,
            height: 1080,
            video_kbps: 5000,
        };
        channel.ladder[1] = Rendition {
            name: "720p".into(),
            width: 1280,
            height: 720,
            video_kbps: 2800,
        };
        let joined = ladder_args(&channel, 2, 0.0).join(" ");
        assert!(joined.contains("-preset superfast -bf 1 -profile:v main"));
        assert!(!joined.contains("-threads:v:0"));
        assert!(joined.contains("-threads:v:1 1 -threads:v:2 1"));
        channel.fps = 60;
        let joined = ladder_args(&channel, 2, 0.0).join(" ");
        assert!(
            !joined.contains("-threads:v:1"),
            "720p60 keeps its frame threads"
        );
    }
}
