//! The "NO SIGNAL" slate: encoded once per rendition at start, then cut for each slot it stands
//! in for, with that slot's times, into the same kind of parts as live media (shown part by part
//! at the clock's pace, so low-latency viewers see it as soon as live parts stop). It has a
//! keyframe on every part boundary and the live ladder's codec configuration, so it can also
//! take over in the middle of a slot, after the live parts that came.

use std::path::Path;

use anyhow::Context;
use streaming_core::config::ChannelConfig;
use streaming_media::avc::access_unit;
use streaming_media::ts::{Demuxer, Pes, StreamKind};
use streaming_media::{Cutter, Part, PartClock, aac};

use crate::transcode::{SegmentMedia, TS_OUTPUT_ARGS, shared_format_args, x264_args};

/// Font for the slate's text (Debian `fonts-dejavu-core`); without it the slate is plain.
pub const SLATE_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One rendition's slate: D seconds of pictures and silence as PES packets, times from 0.
pub struct Slate {
    packets: Vec<Pes>,
    clock: PartClock,
    width: u16,
    height: u16,
    /// Decode time of the first picture, and one picture's duration (90 kHz).
    first_dts: u64,
    frame_ticks: u64,
    /// The name of its init segment: live parts with the same one can be followed by slate
    /// parts inside a segment.
    init_name: String,
    /// Every part starts with a keyframe (forced by `encode`; an ffmpeg that placed them
    /// elsewhere makes a slate that only stands in for whole slots).
    every_part_independent: bool,
}

impl Slate {
    /// Encodes the slate of one rendition with the ladder's codec parameters. Blocking: call
    /// from `spawn_blocking`.
    pub fn encode(
        channel: &ChannelConfig,
        rendition: usize,
        clock: PartClock,
    ) -> anyhow::Result<Self> {
        let r = &channel.ladder[rendition];
        let seconds = (clock.segment_ms / 1000).to_string();
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
                "-f",
                "lavfi",
                "-i",
            ])
            .arg(format!(
                "color=c=0x202030:s={}x{}:r={}:d={seconds}",
                r.width, r.height, channel.fps
            ))
            .args(["-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo"])
            .args(["-t", &seconds, "-vf", &vf])
            .args(x264_args(&channel.preset, &[r.video_kbps]))
            // A keyframe at every part boundary: any slate part can start or continue a segment.
            .args(["-forced-idr", "1", "-force_key_frames"])
            // (half a picture early: 3 × 0.4 is a hair above 1.2 in floating point)
            .arg(format!(
                "expr:gte(t,n_forced*{}-{})",
                clock.part_ms as f64 / 1000.0,
                clock.frame_ms / 2000.0
            ))
            .args(shared_format_args(channel.audio_kbps))
            .args(TS_OUTPUT_ARGS)
            .arg("pipe:1")
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
        let mut demuxer = Demuxer::new(&output.stdout[..]);
        let mut packets = Vec::new();
        while let Some(pes) = demuxer.next_pes().context("slate output")? {
            packets.push(pes);
        }
        let first = packets
            .iter()
            .find(|p| p.kind == StreamKind::H264)
            .context("the slate has no picture")?;
        let mut slate = Self {
            first_dts: first.dts,
            frame_ticks: 90_000 / u64::from(channel.fps.max(1)),
            clock,
            width: r.width as u16,
            height: r.height as u16,
            packets,
            init_name: String::new(),
            every_part_independent: false,
        };
        // Cut once now, so a slate that cannot be cut stops the start instead of a slot.
        let parts = slate.parts(1 << 20)?;
        let first = parts.first().context("the slate made no part")?;
        slate.init_name = first.init.name.clone();
        slate.every_part_independent = parts.iter().all(|p| p.independent);
        Ok(slate)
    }

    /// Whether slate parts can follow these live parts inside one segment: they need the same
    /// init segment (see `transcode::shared_format_args`; a publisher's colour description can
    /// still make the ladder's SPS differ).
    pub fn can_follow(&self, live: &Part) -> bool {
        self.every_part_independent && live.init.name == self.init_name
    }

    /// The slate as segment `slot`: its first picture presented at the slot's start.
    pub fn segment(&self, slot: u64) -> anyhow::Result<SegmentMedia> {
        SegmentMedia::from_parts(&self.parts(slot)?).context("the slate made no part")
    }

    /// The parts of the slate as segment `slot`.
    pub fn parts(&self, slot: u64) -> anyhow::Result<Vec<Part>> {
        let first_pts = self
            .packets
            .iter()
            .find(|p| p.kind == StreamKind::H264)
            .map_or(0, |p| p.pts);
        let slot_start = slot * self.clock.segment_ms * 90;
        // Shift so the first picture is presented at the slot's start.
        let shift = |t: u64| t + slot_start - first_pts.min(slot_start);
        let mut cutter = Cutter::new(self.clock, self.width, self.height);
        let mut parts = Vec::new();
        let mut last_dts = self.first_dts;
        for pes in &self.packets {
            let cuts = match pes.kind {
                StreamKind::H264 => {
                    last_dts = pes.dts;
                    cutter.push_video(shift(pes.dts), shift(pes.pts), access_unit(&pes.data))?
                }
                StreamKind::Aac => cutter.push_audio(shift(pes.pts), &aac::frames(&pes.data)?)?,
            };
            parts.extend(cuts);
        }
        parts.extend(cutter.finish(shift(last_dts + self.frame_ticks))?);
        Ok(parts
            .into_iter()
            .filter_map(|c| match c {
                streaming_media::Cut::Part(p) => Some(p),
                streaming_media::Cut::Segment { .. } => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transcode::{RunEvent, RunSpec, start_run, tests::channel};
    use bytes::Bytes;

    const CLOCK: PartClock = PartClock {
        segment_ms: 2000,
        part_ms: 400,
        frame_ms: 40.0,
    };

    /// A publish as a plain encoder sends it: H.264 with its own GOP and AAC at 44.1 kHz mono
    /// (not the ladder's 48 kHz stereo).
    fn publish_flv() -> Vec<u8> {
        let output = std::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
            .arg("testsrc2=s=640x360:r=25:d=5")
            .args(["-f", "lavfi", "-i", "sine=f=440:r=44100:d=5"])
            .args(["-c:v", "libx264", "-preset", "ultrafast", "-g", "50"])
            .args(["-c:a", "aac", "-ac", "1", "-f", "flv", "pipe:1"])
            .output()
            .expect("ffmpeg runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// When the first picture of an FLV file is (ms), as the channel takes it for C.
    fn first_picture_ms(flv: &[u8]) -> u64 {
        let path = std::env::temp_dir().join(format!("slate-test-{}.flv", std::process::id()));
        std::fs::write(&path, flv).expect("temp file");
        let output = std::process::Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-select_streams",
                "v",
                "-read_intervals",
                "%+#1",
            ])
            .args(["-show_entries", "packet=pts", "-of", "csv=p=0"])
            .arg(&path)
            .output()
            .expect("ffprobe runs");
        let _ = std::fs::remove_file(&path);
        let text = String::from_utf8_lossy(&output.stdout);
        text.trim().parse().expect("a picture time")
    }

    /// The parts a live run makes of `flv`, rendition by rendition, its first picture placed
    /// on a slot boundary as a channel places a publish's.
    fn live_parts(flv: Vec<u8>) -> Vec<Vec<Part>> {
        let first_ms = first_picture_ms(&flv);
        let config = channel();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<RunEvent>(4096);
        let spec = RunSpec {
            channel_name: config.name.clone(),
            run_id: 1,
            config: config.clone(),
            clock: CLOCK,
            epoch_ms: 1_800_000_000_000 - first_ms,
            first_frame_ms: first_ms as f64,
        };
        let mut run = start_run(spec, tx).expect("ffmpeg starts");
        run.feed(Bytes::from(flv)).expect("input queued");
        run.finish();
        let mut parts = vec![Vec::new(); config.ladder.len()];
        while let Some(event) = rx.blocking_recv() {
            match event {
                RunEvent::Part {
                    rendition, part, ..
                } => parts[rendition].push(part),
                RunEvent::SegmentEnd { .. } => {}
                RunEvent::Exited { exit, .. } => {
                    assert!(exit.success, "{exit:?}");
                    break;
                }
            }
        }
        parts
    }

    #[test]
    fn slate_parts_splice_into_live_segments() {
        let live = live_parts(publish_flv());
        let config = channel();
        for (rendition, live) in live.iter().enumerate() {
            let slate = Slate::encode(&config, rendition, CLOCK).expect("slate encodes");
            let parts = slate.parts(900_000_000).expect("slate cuts");
            assert_eq!(parts.len(), 5);
            // Every slate part starts with a keyframe, so it can take over at any part...
            assert!(
                parts.iter().all(|p| p.independent),
                "{}",
                config.ladder[rendition].name
            );
            // ...and needs the same init segment as the live parts it follows.
            let first = live.first().expect("the run made parts");
            assert_eq!(
                first.init.name, parts[0].init.name,
                "{}",
                config.ladder[rendition].name
            );
            assert!(slate.can_follow(first));
        }
    }
}
