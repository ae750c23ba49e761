//! A run's MPEG-TS output cut into fragmented MP4 parts for the channel (streaming-media does
//! the cutting; this file routes the streams and reports each part as soon as it is made).

use std::io::Read;

use streaming_media::avc::access_unit;
use streaming_media::ts::{Demuxer, Pes, StreamKind};
use streaming_media::{Cut, Cutter, aac};
use tokio::sync::mpsc;

use crate::transcode::{RunEvent, RunSpec};

/// Bytes read from ffmpeg's stdout at a time.
const READ_BUFFER: usize = 64 * 1024;

/// The cutters of one run, one per rendition.
pub struct RunCutter {
    channel: String,
    run_id: u64,
    /// The publish epoch in 90 kHz ticks: MPEG-TS time 0.
    epoch_ticks: u64,
    cutters: Vec<Cutter>,
    /// Where each rendition's parts are, to tell a segment with a gap.
    tracks: Vec<PartTrack>,
}

#[derive(Debug, Clone, Copy, Default)]
struct PartTrack {
    slot: u64,
    next: u32,
    gap: bool,
}

impl RunCutter {
    pub fn new(spec: &RunSpec) -> Self {
        let cutters = spec
            .config
            .ladder
            .iter()
            .map(|r| Cutter::new(spec.clock, r.width as u16, r.height as u16))
            .collect::<Vec<_>>();
        Self {
            channel: spec.channel_name.clone(),
            run_id: spec.run_id,
            epoch_ticks: spec.epoch_ms * 90,
            tracks: vec![PartTrack::default(); cutters.len()],
            cutters,
        }
    }

    /// Reads the run's output to its end. Unreadable output ends the reading, and with it the
    /// run: ffmpeg then fails to write and exits, and the channel restarts it.
    pub fn run<M: From<RunEvent>>(mut self, stdout: impl Read, events: &mpsc::Sender<M>) {
        let mut demuxer = Demuxer::new(std::io::BufReader::with_capacity(READ_BUFFER, stdout));
        loop {
            let pes = match demuxer.next_pes() {
                Ok(Some(pes)) => pes,
                Ok(None) => {
                    self.flush(events);
                    return;
                }
                Err(e) => {
                    tracing::error!(channel = %self.channel, run = self.run_id, "transcoder output: {e}");
                    return;
                }
            };
            let cuts = match self.cut(&pes) {
                Ok(cuts) => cuts,
                Err(e) => {
                    tracing::error!(channel = %self.channel, run = self.run_id, "cannot cut the transcoder output: {e}");
                    return;
                }
            };
            for (rendition, cut) in cuts {
                let event = self.event(rendition, cut);
                if events.blocking_send(event.into()).is_err() {
                    return;
                }
            }
        }
    }

    /// The end of ffmpeg's output: the last part of every rendition goes out too.
    fn flush<M: From<RunEvent>>(&mut self, events: &mpsc::Sender<M>) {
        for rendition in 0..self.cutters.len() {
            let cuts = match self.cutters[rendition].flush() {
                Ok(cuts) => cuts,
                Err(e) => {
                    tracing::warn!(channel = %self.channel, run = self.run_id, "cannot cut the last part: {e}");
                    continue;
                }
            };
            for cut in cuts {
                let event = self.event(rendition, cut);
                if events.blocking_send(event.into()).is_err() {
                    return;
                }
            }
        }
    }

    /// Hands a PES to the cutters it concerns: video to its rendition, audio to all.
    fn cut(&mut self, pes: &Pes) -> Result<Vec<(usize, Cut)>, Box<dyn std::error::Error>> {
        let (pts, dts) = (self.epoch_ticks + pes.pts, self.epoch_ticks + pes.dts);
        let mut out = Vec::new();
        match pes.kind {
            StreamKind::H264 => {
                if let Some(cutter) = self.cutters.get_mut(pes.stream) {
                    let cuts = cutter.push_video(dts, pts, access_unit(&pes.data))?;
                    out.extend(cuts.into_iter().map(|c| (pes.stream, c)));
                }
            }
            StreamKind::Aac => {
                let frames = aac::frames(&pes.data)?;
                for (rendition, cutter) in self.cutters.iter_mut().enumerate() {
                    let cuts = cutter.push_audio(pts, &frames)?;
                    out.extend(cuts.into_iter().map(|c| (rendition, c)));
                }
            }
        }
        Ok(out)
    }

    /// The event a cut becomes: parts go out as they are made; a segment's end says whether
    /// its parts cover the slot (a run that starts late or ends early makes partial ones).
    fn event(&mut self, rendition: usize, cut: Cut) -> RunEvent {
        match cut {
            Cut::Part(part) => {
                let track = &mut self.tracks[rendition];
                if part.index == 0 {
                    *track = PartTrack {
                        slot: part.slot,
                        next: 1,
                        gap: false,
                    };
                } else if track.slot == part.slot && track.next == part.index {
                    track.next += 1;
                } else {
                    // Pictures missing inside a segment: its end will not count.
                    track.gap = true;
                }
                RunEvent::Part {
                    run_id: self.run_id,
                    rendition,
                    part,
                }
            }
            Cut::Segment {
                slot,
                complete,
                duration_s,
            } => {
                let track = self.tracks[rendition];
                let contiguous = track.slot == slot && !track.gap;
                if !complete || !contiguous {
                    tracing::debug!(channel = %self.channel, run = self.run_id, rendition, slot, duration_s,
                        "segment incomplete: it does not cover its slot");
                }
                RunEvent::SegmentEnd {
                    run_id: self.run_id,
                    rendition,
                    slot,
                    complete: complete && contiguous,
                }
            }
        }
    }
}
