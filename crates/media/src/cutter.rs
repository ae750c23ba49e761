//! Samples into parts and segments whose bounds come from the slot clock.
//!
//! Segment k starts with the keyframe the transcoder forced at the start of slot k (the first
//! frame at or after k·D). Inside it, part j holds the pictures whose decode position falls in
//! [k·D + j·P, k·D + (j+1)·P), where the decode position is the decode time plus the delay the
//! segment's keyframe has between decode and presentation (B-frames): so the grid starts at the
//! keyframe and never depends on when bytes arrived. Audio frames go to the part their
//! presentation time falls in. Two ingests fed the same publish therefore cut the same media
//! into the same part numbers, and a broadcast may take part j from one and part j+1 from the
//! other.
//!
//! A part is handed over once the first picture after it has arrived (its last picture's
//! duration is then known) and audio has passed its end (ffmpeg interleaves by decode time, so
//! audio of a part can follow the next part's first picture by the B-frame delay).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::aac::{AudioConfig, SAMPLES_PER_FRAME};
use crate::avc::AccessUnit;
use crate::fmp4::{self, AUDIO_TRACK, Fmp4Error, InitSegment, Sample, Tracks, VIDEO_TRACK};

/// 90 kHz ticks per millisecond.
const TICKS_PER_MS: u64 = 90;
/// A part waits at most this long (of video after its end) for audio, then goes without.
const AUDIO_WAIT_TICKS: u64 = 90_000;

/// Segment and part durations of the shared timeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartClock {
    pub segment_ms: u64,
    pub part_ms: u64,
    /// Duration of one picture: the tolerance of a keyframe forced "at" a slot boundary.
    pub frame_ms: f64,
}

impl PartClock {
    pub fn parts_per_segment(&self) -> u32 {
        self.segment_ms.div_ceil(self.part_ms.max(1)) as u32
    }

    /// The longest part this clock can make: the part duration rounded up to whole pictures.
    pub fn part_target_s(&self) -> f64 {
        let frame = self.frame_ms.max(1.0);
        ((self.part_ms as f64 / frame).ceil() * frame / 1000.0).min(self.segment_ms as f64 / 1000.0)
    }

    /// Whether a part at `index` of its segment lasts what the clock gives it, within one
    /// picture. A run that ended inside a part (its input stopped) makes a shorter one, and a
    /// hole in the input a longer one (its last picture lasts until the next).
    pub fn fits(&self, index: u32, duration_s: f64) -> bool {
        let start = u64::from(index) * self.part_ms;
        let nominal = self.part_ms.min(self.segment_ms.saturating_sub(start)) as f64;
        (duration_s * 1000.0 - nominal).abs() <= self.frame_ms + 1.0
    }

    /// The slot whose start this presentation time is, within one picture; `None` off a
    /// boundary.
    fn slot_starting_at(&self, pts: u64) -> Option<u64> {
        let ms = pts as f64 / TICKS_PER_MS as f64;
        let slot = (ms / self.segment_ms as f64).round();
        ((ms - slot * self.segment_ms as f64).abs() <= self.frame_ms + 1.0).then_some(slot as u64)
    }

    fn segment_start(&self, slot: u64) -> u64 {
        slot * self.segment_ms * TICKS_PER_MS
    }
}

/// One part, ready to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub slot: u64,
    pub index: u32,
    /// Starts with a keyframe (the first part of a segment).
    pub independent: bool,
    pub duration_s: f64,
    pub init: Arc<InitSegment>,
    /// One movie fragment per track.
    pub data: Bytes,
}

/// What the cutter hands over, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Cut {
    Part(Part),
    /// Every part of this slot's segment has been handed over. `complete` when they cover the
    /// slot (within a picture): a run that starts late or ends early makes incomplete ones.
    Segment {
        slot: u64,
        duration_s: f64,
        complete: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CutError {
    #[error(transparent)]
    Fmp4(#[from] Fmp4Error),
    #[error("a keyframe came without SPS and PPS: cannot describe the video")]
    NoParameterSets,
}

struct Picture {
    dts: u64,
    pts: u64,
    au: AccessUnit,
}

struct AudioFrame {
    pts: u64,
    data: Bytes,
}

struct OpenSegment {
    slot: u64,
    start: u64,
    /// Presentation minus decode time of the segment's keyframe.
    delay: u64,
}

struct OpenPart {
    slot: u64,
    index: u32,
    start: u64,
    end: u64,
    pictures: Vec<Picture>,
}

/// A part whose pictures are all in, waiting for audio to pass its end.
struct Waiting {
    slot: u64,
    index: u32,
    start: u64,
    end: u64,
    video: Vec<Sample>,
    ends_segment: bool,
}

/// Cuts one rendition.
pub struct Cutter {
    clock: PartClock,
    width: u16,
    height: u16,
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    audio_config: Option<AudioConfig>,
    init: Option<Arc<InitSegment>>,
    segment: Option<OpenSegment>,
    part: Option<OpenPart>,
    waiting: VecDeque<Waiting>,
    audio: VecDeque<AudioFrame>,
    /// Presentation time of the newest audio frame and newest picture.
    audio_until: Option<u64>,
    video_until: u64,
    /// Decode time of the newest picture.
    last_dts: Option<u64>,
    /// Video ticks handed over per slot, for the completeness check.
    segment_ticks: u64,
}

impl Cutter {
    pub fn new(clock: PartClock, width: u16, height: u16) -> Self {
        Self {
            clock,
            width,
            height,
            sps: None,
            pps: None,
            audio_config: None,
            init: None,
            segment: None,
            part: None,
            waiting: VecDeque::new(),
            audio: VecDeque::new(),
            audio_until: None,
            video_until: 0,
            last_dts: None,
            segment_ticks: 0,
        }
    }

    /// Takes one picture (90 kHz times on the shared timeline).
    pub fn push_video(&mut self, dts: u64, pts: u64, au: AccessUnit) -> Result<Vec<Cut>, CutError> {
        if au.sps.is_some() {
            self.sps = au.sps.clone();
        }
        if au.pps.is_some() {
            self.pps = au.pps.clone();
        }
        self.video_until = self.video_until.max(pts);
        self.last_dts = Some(dts);
        let starts = au
            .keyframe
            .then(|| self.clock.slot_starting_at(pts))
            .flatten()
            .filter(|slot| self.segment.as_ref().is_none_or(|s| *slot > s.slot));
        if let Some(slot) = starts {
            if self.sps.is_none() || self.pps.is_none() {
                return Err(CutError::NoParameterSets);
            }
            self.close_part(dts, true);
            let start = self.clock.segment_start(slot);
            self.segment = Some(OpenSegment {
                slot,
                start,
                delay: pts.saturating_sub(dts),
            });
            self.open_part(slot, 0, start, Picture { dts, pts, au });
            return self.release();
        }
        let Some(segment) = &self.segment else {
            // Before the first boundary keyframe of a run: a partial slot, never published.
            return Ok(Vec::new());
        };
        let position = dts + segment.delay;
        let index = (position.saturating_sub(segment.start) / (self.clock.part_ms * TICKS_PER_MS))
            .min(u64::from(self.clock.parts_per_segment() - 1)) as u32;
        let (slot, start) = (segment.slot, segment.start);
        match &mut self.part {
            Some(part) if part.index == index => part.pictures.push(Picture { dts, pts, au }),
            Some(part) if index < part.index => part.pictures.push(Picture { dts, pts, au }),
            _ => {
                self.close_part(dts, false);
                self.open_part(slot, index, start, Picture { dts, pts, au });
            }
        }
        self.release()
    }

    /// Takes the audio frames of one PES (90 kHz presentation time of the first).
    pub fn push_audio(
        &mut self,
        pts: u64,
        frames: &[(AudioConfig, &[u8])],
    ) -> Result<Vec<Cut>, CutError> {
        for (n, (config, data)) in frames.iter().enumerate() {
            self.audio_config = Some(*config);
            let step = u64::from(SAMPLES_PER_FRAME) * 90_000 / u64::from(config.sample_rate());
            let at = pts + n as u64 * step;
            self.audio_until = Some(self.audio_until.map_or(at, |u| u.max(at)));
            if self.segment.is_some() {
                self.audio.push_back(AudioFrame {
                    pts: at,
                    data: Bytes::copy_from_slice(data),
                });
            }
        }
        self.release()
    }

    /// The end of the input (a transcoder that finished its input flushes its last pictures):
    /// the open part closes with its last picture lasting one frame, and everything goes out
    /// with the audio there is. A run that ended on a slot boundary so completes its last slot.
    pub fn flush(&mut self) -> Result<Vec<Cut>, CutError> {
        let Some(last) = self.last_dts else {
            return Ok(Vec::new());
        };
        let frame = (self.clock.frame_ms * TICKS_PER_MS as f64).round() as u64;
        self.finish(last + frame)
    }

    /// Closes the open part as if the next picture were decoded at `next_dts`, and hands over
    /// everything with the audio there is: for a stream whose end is known (the slate).
    pub fn finish(&mut self, next_dts: u64) -> Result<Vec<Cut>, CutError> {
        self.close_part(next_dts, true);
        let mut out = Vec::new();
        while let Some(part) = self.waiting.pop_front() {
            self.hand_over(part, &mut out)?;
        }
        Ok(out)
    }

    fn open_part(&mut self, slot: u64, index: u32, segment_start: u64, first: Picture) {
        let part = self.clock.part_ms * TICKS_PER_MS;
        let start = segment_start + u64::from(index) * part;
        let last = index + 1 == self.clock.parts_per_segment();
        let end = if last {
            segment_start + self.clock.segment_ms * TICKS_PER_MS
        } else {
            start + part
        };
        self.part = Some(OpenPart {
            slot,
            index,
            start,
            end,
            pictures: vec![first],
        });
    }

    /// The open part's pictures are complete: `next_dts` is the decode time of the picture
    /// after them.
    fn close_part(&mut self, next_dts: u64, ends_segment: bool) {
        let Some(part) = self.part.take() else { return };
        let ends_segment = ends_segment || part.index + 1 == self.clock.parts_per_segment();
        let mut video = Vec::with_capacity(part.pictures.len());
        let mut pictures = part.pictures.into_iter().peekable();
        while let Some(p) = pictures.next() {
            let next = pictures.peek().map_or(next_dts, |n| n.dts);
            video.push(Sample {
                decode_time: p.dts,
                duration: next.saturating_sub(p.dts).min(u64::from(u32::MAX)) as u32,
                composition_offset: (p.pts as i64 - p.dts as i64) as i32,
                sync: p.au.keyframe,
                data: Bytes::from(p.au.sample),
            });
        }
        self.waiting.push_back(Waiting {
            slot: part.slot,
            index: part.index,
            start: part.start,
            end: part.end,
            video,
            ends_segment,
        });
    }

    /// Hands over the waiting parts whose audio is in.
    fn release(&mut self) -> Result<Vec<Cut>, CutError> {
        let mut out = Vec::new();
        while let Some(front) = self.waiting.front() {
            let audio_in = self.audio_until.is_some_and(|a| a >= front.end);
            let gave_up = self.video_until >= front.end + AUDIO_WAIT_TICKS;
            if !audio_in && !gave_up {
                break;
            }
            let Some(waiting) = self.waiting.pop_front() else {
                break;
            };
            self.hand_over(waiting, &mut out)?;
        }
        Ok(out)
    }

    fn hand_over(&mut self, part: Waiting, out: &mut Vec<Cut>) -> Result<(), CutError> {
        while self.audio.front().is_some_and(|a| a.pts < part.start) {
            self.audio.pop_front();
        }
        let mut frames = Vec::new();
        while self.audio.front().is_some_and(|a| a.pts < part.end) {
            frames.extend(self.audio.pop_front());
        }
        let init = self.init_for_part()?;
        let mut data = Vec::new();
        let sequence = (part.slot as u32)
            .wrapping_mul(64)
            .wrapping_add(part.index * 2);
        data.extend(fmp4::fragment(sequence, VIDEO_TRACK, &part.video)?);
        if let (Some(config), false) = (self.audio_config, frames.is_empty()) {
            let samples = self.audio_samples(config, &frames);
            data.extend(fmp4::fragment(sequence + 1, AUDIO_TRACK, &samples)?);
        }
        let ticks: u64 = part.video.iter().map(|s| u64::from(s.duration)).sum();
        if part.index == 0 {
            self.segment_ticks = 0;
        }
        self.segment_ticks += ticks;
        out.push(Cut::Part(Part {
            slot: part.slot,
            index: part.index,
            independent: part.video.first().is_some_and(|s| s.sync),
            duration_s: ticks as f64 / 90_000.0,
            init,
            data: Bytes::from(data),
        }));
        if part.ends_segment {
            let full = self.clock.segment_ms as f64 - self.clock.frame_ms - 1.0;
            let covered_ms = self.segment_ticks as f64 / TICKS_PER_MS as f64;
            out.push(Cut::Segment {
                slot: part.slot,
                duration_s: covered_ms / 1000.0,
                complete: covered_ms >= full,
            });
        }
        Ok(())
    }

    fn audio_samples(&self, config: AudioConfig, frames: &[AudioFrame]) -> Vec<Sample> {
        let rate = u128::from(config.sample_rate());
        let to_rate = |pts: u64| (u128::from(pts) * rate / 90_000) as u64;
        frames
            .iter()
            .enumerate()
            .map(|(n, f)| {
                let this = to_rate(f.pts);
                let next = frames
                    .get(n + 1)
                    .or(self.audio.front())
                    .map(|next| to_rate(next.pts));
                Sample {
                    decode_time: this,
                    duration: next.map_or(SAMPLES_PER_FRAME, |n| n.saturating_sub(this) as u32),
                    composition_offset: 0,
                    sync: true,
                    data: f.data.clone(),
                }
            })
            .collect()
    }

    /// The init segment for the codec configuration now in force (a new one when it changed).
    fn init_for_part(&mut self) -> Result<Arc<InitSegment>, CutError> {
        let (Some(sps), Some(pps)) = (&self.sps, &self.pps) else {
            return Err(CutError::NoParameterSets);
        };
        let tracks = Tracks {
            width: self.width,
            height: self.height,
            sps: sps.clone(),
            pps: pps.clone(),
            audio: self.audio_config,
        };
        let init = InitSegment::new(&tracks)?;
        if let Some(current) = &self.init
            && current.name == init.name
        {
            return Ok(current.clone());
        }
        let init = Arc::new(init);
        self.init = Some(init.clone());
        Ok(init)
    }
}

#[cfg(test)]
mod tests {
    use super::PartClock;

    #[test]
    fn a_part_fits_its_place_within_one_picture() {
        let clock = PartClock {
            segment_ms: 2000,
            part_ms: 480,
            frame_ms: 40.0,
        };
        assert!(clock.fits(0, 0.48) && clock.fits(1, 0.44) && clock.fits(2, 0.52));
        // The last part holds what is left of the segment.
        assert!(clock.fits(4, 0.08) && !clock.fits(4, 0.48));
        // Cut short by the end of its run, or stretched over a hole in the input.
        assert!(!clock.fits(2, 0.36) && !clock.fits(2, 1.2));
    }
}
