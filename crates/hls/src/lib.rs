//! The HLS side shared by ingests, broadcasts and the viewer simulator: the slot timeline, the
//! segment window with its media playlist, the master playlist, and playlist parsing.

pub mod master;
pub mod media;
pub mod names;
pub mod parse;
pub mod playlist;
pub mod timeline;
pub mod window;

pub use master::{Variant, render_master};
pub use media::{Building, PlaylistShape, RenditionMedia};
pub use parse::{ParsedMedia, ParsedSegment, ParsedVariant, parse_master, parse_media};
pub use playlist::{Listing, LowLatency, RenditionReport};
pub use timeline::{SlotClock, unix_now_ms};
pub use window::{PartInfo, SegmentInfo, SegmentWindow, WindowError};
