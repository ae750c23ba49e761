//! The "NO SIGNAL" slate: encoded once per rendition at start, then cut for each slot it stands
//! in for, with that slot's times, into the same kind of parts as live media (shown part by part
//! at the clock's pace, so low-latency viewers see it as soon as live parts stop).

use std::path::Path;

use anyhow::Context;
use streaming_core::config::ChannelConfig;
use streaming_media::avc::access_unit;
use streaming_media::ts::{Demuxer, Pes, StreamKind};
use streaming_media::{Cutter, Part, PartClock, aac};

use crate::transcode::{SegmentMedia, TS_OUTPUT_ARGS, x264_args};

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
            .args(["-c:a", "aac", "-b:a", &format!("{}k", channel.audio_kbps)])
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
        let slate = Self {
            first_dts: first.dts,
            frame_ticks: 90_000 / u64::from(channel.fps.max(1)),
            clock,
            width: r.width as u16,
            height: r.height as u16,
            packets,
        };
        // Cut once now, so a slate that cannot be cut stops the start instead of a slot.
        slate.segment(1 << 20)?;
        Ok(slate)
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
