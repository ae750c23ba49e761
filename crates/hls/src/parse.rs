//! Reading playlists (a broadcast reads an ingest's, `streamctl watch` reads a broadcast's), with
//! hls_m3u8 doing the parsing and this module keeping only what our code needs.

use hls_m3u8::tags::VariantStream;
use hls_m3u8::{MasterPlaylist, MediaPlaylist};

use crate::timeline::parse_program_date_time;

/// Playlists bigger than this are refused before parsing: ours are a few KiB.
pub const MAX_PLAYLIST_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("playlist larger than {MAX_PLAYLIST_BYTES} bytes")]
    TooLarge,
    #[error("invalid playlist: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParsedSegment {
    pub seq: u64,
    pub duration_s: f64,
    pub discontinuity: bool,
    /// This segment's discontinuity sequence number: the playlist's EXT-X-DISCONTINUITY-SEQUENCE
    /// plus the discontinuity tags after the first listed segment up to this one.
    pub discontinuity_sequence: u64,
    pub program_date_time_ms: Option<u64>,
    pub uri: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParsedMedia {
    pub target_duration_s: f64,
    pub media_sequence: u64,
    pub discontinuity_sequence: u64,
    pub segments: Vec<ParsedSegment>,
    pub ended: bool,
}

impl ParsedMedia {
    pub fn last_seq(&self) -> Option<u64> {
        self.segments.last().map(|s| s.seq)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParsedVariant {
    pub uri: String,
    pub bandwidth: u64,
    pub resolution: Option<(u32, u32)>,
}

pub fn parse_media(text: &str) -> Result<ParsedMedia, ParseError> {
    if text.len() > MAX_PLAYLIST_BYTES {
        return Err(ParseError::TooLarge);
    }
    let playlist = MediaPlaylist::try_from(text).map_err(|e| ParseError::Invalid(e.to_string()))?;
    let media_sequence = playlist.media_sequence as u64;
    let mut discontinuity_sequence = playlist.discontinuity_sequence as u64;
    let segments = playlist
        .segments
        .iter()
        .enumerate()
        .map(|(index, (_, segment))| ParsedSegment {
            seq: media_sequence + index as u64,
            duration_s: segment.duration.duration().as_secs_f64(),
            discontinuity: segment.has_discontinuity,
            discontinuity_sequence: {
                if index > 0 && segment.has_discontinuity {
                    discontinuity_sequence += 1;
                }
                discontinuity_sequence
            },
            program_date_time_ms: segment
                .program_date_time
                .as_ref()
                .and_then(|p| parse_program_date_time(&p.date_time)),
            uri: segment.uri().to_string(),
        })
        .collect();
    Ok(ParsedMedia {
        target_duration_s: playlist.target_duration.as_secs_f64(),
        media_sequence,
        discontinuity_sequence: playlist.discontinuity_sequence as u64,
        segments,
        ended: playlist.has_end_list,
    })
}

pub fn parse_master(text: &str) -> Result<Vec<ParsedVariant>, ParseError> {
    if text.len() > MAX_PLAYLIST_BYTES {
        return Err(ParseError::TooLarge);
    }
    let playlist =
        MasterPlaylist::try_from(text).map_err(|e| ParseError::Invalid(e.to_string()))?;
    Ok(playlist
        .variant_streams
        .iter()
        .filter_map(|v| match v {
            VariantStream::ExtXStreamInf {
                uri, stream_data, ..
            } => Some(ParsedVariant {
                uri: uri.to_string(),
                bandwidth: stream_data.bandwidth(),
                resolution: stream_data
                    .resolution()
                    .map(|r| (r.width() as u32, r.height() as u32)),
            }),
            VariantStream::ExtXIFrame { .. } => None,
        })
        .collect())
}
