//! A run's MPEG-TS output cut into fragmented MP4 parts and segments for the channel
//! (streaming-media does the cutting; this file routes the streams and gathers segments).

use std::collections::BTreeMap;
use std::io::Read;

use bytes::{Bytes, BytesMut};
use streaming_media::avc::access_unit;
use streaming_media::ts::{Demuxer, Pes, StreamKind};
use streaming_media::{Cut, Cutter, Part, aac};
use tokio::sync::mpsc;

use crate::transcode::{RunEvent, RunSpec, SegmentMedia};

/// Bytes read from ffmpeg's stdout at a time.
const READ_BUFFER: usize = 64 * 1024;

/// The cutters of one run, one per rendition.
pub struct RunCutter {
    channel: String,
    run_id: u64,
    /// The publish epoch in 90 kHz ticks: MPEG-TS time 0.
    epoch_ticks: u64,
    cutters: Vec<Cutter>,
    /// Parts of the segments being made, per rendition and slot.
    gathering: Vec<BTreeMap<u64, Vec<Part>>>,
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
            gathering: vec![BTreeMap::new(); cutters.len()],
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
                Ok(None) => return,
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
                if let Some(event) = self.gather(rendition, cut)
                    && events.blocking_send(event.into()).is_err()
                {
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

    /// Keeps parts until their segment is done; a complete segment becomes an event.
    fn gather(&mut self, rendition: usize, cut: Cut) -> Option<RunEvent> {
        let gathering = &mut self.gathering[rendition];
        match cut {
            Cut::Part(part) => {
                gathering.entry(part.slot).or_default().push(part);
                None
            }
            Cut::Segment {
                slot,
                complete,
                duration_s,
            } => {
                let parts = gathering.remove(&slot).unwrap_or_default();
                // Parts of older slots can only be leftovers of a segment that never ended.
                gathering.retain(|s, _| *s > slot);
                let contiguous = parts.iter().enumerate().all(|(i, p)| p.index as usize == i);
                let media = join(&parts).filter(|_| complete && contiguous);
                if media.is_none() {
                    tracing::debug!(channel = %self.channel, run = self.run_id, rendition, slot, duration_s,
                        "segment dropped: it does not cover its slot");
                }
                Some(RunEvent::Segment {
                    run_id: self.run_id,
                    rendition,
                    slot,
                    media: media?,
                })
            }
        }
    }
}

/// A segment is its parts, one after the other (`None` without parts).
pub fn join(parts: &[Part]) -> Option<SegmentMedia> {
    let init = parts.last()?.init.clone();
    let mut data = BytesMut::with_capacity(parts.iter().map(|p| p.data.len()).sum());
    for part in parts {
        data.extend_from_slice(&part.data);
    }
    Some(SegmentMedia {
        init,
        data: Bytes::from(data),
    })
}
