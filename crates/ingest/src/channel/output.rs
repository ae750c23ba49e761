//! What the origin serves for a channel: per rendition, its media (streaming_hls::media) as
//! the transcoder's parts and the slot decisions fill it.

use std::sync::{Arc, Mutex, RwLock};

use streaming_core::config::{ChannelConfig, TimelineConfig};
use streaming_core::news::News;
use streaming_core::status::IngestChannelStatus;
use streaming_hls::{
    Building, PartInfo, PlaylistShape, RenditionMedia, SegmentInfo, Variant, WindowError,
};
use streaming_media::Part;

use crate::transcode::SegmentMedia;

/// One rendition's published media.
pub struct RenditionOutput {
    pub name: String,
    pub media: RenditionMedia,
}

impl RenditionOutput {
    /// Publishes a full segment; it replaces the parts shown for it.
    pub fn push(
        &mut self,
        mut info: SegmentInfo,
        segment: SegmentMedia,
    ) -> Result<(), WindowError> {
        info.map = Some(segment.init.name.clone());
        info.parts = segment.parts;
        self.media
            .add_init(&segment.init.name, segment.init.bytes.clone());
        self.media.push(info, segment.data)
    }

    /// Shows the parts made so far of segment `info.seq` (the next one after the window).
    pub fn show_building(&mut self, mut info: SegmentInfo, parts: &[Part]) {
        let Some(last) = parts.last() else {
            self.media.set_building(None);
            return;
        };
        self.media
            .add_init(&last.init.name, last.init.bytes.clone());
        info.map = Some(last.init.name.clone());
        info.parts = parts.iter().map(part_info).collect();
        info.duration_s = parts.iter().map(|p| p.duration_s).sum();
        self.media.set_building(Some(Building {
            info,
            parts: parts.iter().map(|p| p.data.clone()).collect(),
        }));
    }
}

/// A part as a playlist describes it.
pub fn part_info(part: &Part) -> PartInfo {
    PartInfo {
        duration_s: part.duration_s,
        independent: part.independent,
        len: part.data.len(),
    }
}

/// What the origin serves for a channel.
pub struct ChannelOutput {
    pub renditions: Vec<RenditionOutput>,
    pub variants: Vec<Variant>,
}

impl ChannelOutput {
    pub fn rendition(&self, name: &str) -> Option<&RenditionOutput> {
        self.renditions.iter().find(|r| r.name == name)
    }

    /// The low-latency media playlist of a rendition, with a report of every other one.
    pub fn media_playlist(&self, name: &str, shape: &PlaylistShape) -> Option<String> {
        let r = self.rendition(name)?;
        let reports = self
            .renditions
            .iter()
            .filter(|o| o.name != name)
            .filter_map(|o| o.media.report(format!("../{}/index.m3u8", o.name)))
            .collect();
        Some(r.media.low_latency_playlist(shape, reports, str::to_owned))
    }
}

/// The part of a channel shared with the origin.
pub struct ChannelShared {
    pub name: String,
    pub shape: PlaylistShape,
    pub output: RwLock<ChannelOutput>,
    /// Announced whenever a segment or part is published: blocking requests wait on it.
    pub published: News,
    pub status: Mutex<IngestChannelStatus>,
}

impl ChannelShared {
    pub fn new(config: &ChannelConfig, timeline: &TimelineConfig) -> Arc<Self> {
        let part_target_s = crate::part_clock(timeline, config.fps).part_target_s();
        let renditions = config
            .ladder
            .iter()
            .map(|r| RenditionOutput {
                name: r.name.clone(),
                media: RenditionMedia::new(timeline.cache_segments as usize),
            })
            .collect();
        let bandwidth = streaming_core::config::Rendition::bandwidth_bps_with(config.audio_kbps);
        let variants = config
            .ladder
            .iter()
            .map(|r| Variant {
                name: r.name.clone(),
                bandwidth_bps: bandwidth(r),
                width: r.width,
                height: r.height,
                fps: config.fps,
            })
            .collect();
        Arc::new(Self {
            name: config.name.clone(),
            shape: PlaylistShape::new(
                timeline.playlist_segments as usize,
                timeline.segment_seconds,
                part_target_s,
                timeline.part_hold_back_parts,
            ),
            output: RwLock::new(ChannelOutput {
                renditions,
                variants,
            }),
            published: News::default(),
            status: Mutex::new(IngestChannelStatus::default()),
        })
    }
}
