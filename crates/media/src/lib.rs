//! The media side of low-latency HLS: the ladder's MPEG-TS (as ffmpeg writes it, with the
//! publish's timestamps) becomes fragmented MP4 cut on the shared timeline.
//!
//! ffmpeg 5.1 keeps input timestamps in MPEG-TS (`-copyts`) but rebases every track of an MP4
//! output to zero, each on its own, which loses both the timeline and the audio/video offset
//! (docs/latency.md). So ffmpeg writes MPEG-TS and this crate does the rest:
//! - [`ts`] reads PES packets, with 33-bit timestamps unwrapped;
//! - [`avc`] and [`aac`] turn them into samples and codec configurations;
//! - [`fmp4`] writes the init segment and movie fragments;
//! - [`cutter`] groups samples into parts and segments whose bounds come from the slot clock,
//!   so two ingests cut the same media into the same part numbers.

pub mod aac;
pub mod avc;
pub mod cutter;
pub mod fmp4;
pub mod ts;

pub use cutter::{Cut, Cutter, Part, PartClock};
pub use fmp4::InitSegment;
