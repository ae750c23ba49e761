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
    /// URI of the init segment in force (the last `EXT-X-MAP` before this segment).
    pub map: Option<String>,
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

/// hls_m3u8 panics on some malformed input (found by fuzzing: `#EXTINF:1e20,`, a lone `"` in
/// an attribute list). Playlists come from other hosts, so such a panic must be a parse error.
fn without_panic<T>(parse: impl FnOnce() -> Result<T, ParseError>) -> Result<T, ParseError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse))
        .unwrap_or_else(|_| Err(ParseError::Invalid("the playlist parser gave up".into())))
}

pub fn parse_media(text: &str) -> Result<ParsedMedia, ParseError> {
    if text.len() > MAX_PLAYLIST_BYTES {
        return Err(ParseError::TooLarge);
    }
    without_panic(|| media_of(text))
}

fn media_of(text: &str) -> Result<ParsedMedia, ParseError> {
    let playlist = MediaPlaylist::try_from(text).map_err(|e| ParseError::Invalid(e.to_string()))?;
    let media_sequence = playlist.media_sequence as u64;
    let mut discontinuity_sequence = playlist.discontinuity_sequence as u64;
    let out_of_range = || ParseError::Invalid("sequence number out of range".into());
    let mut map: Option<String> = None;
    let segments = playlist
        .segments
        .iter()
        .enumerate()
        .map(|(index, (_, segment))| {
            if index > 0 && segment.has_discontinuity {
                discontinuity_sequence = discontinuity_sequence
                    .checked_add(1)
                    .ok_or_else(out_of_range)?;
            }
            if let Some(m) = &segment.map {
                map = Some(m.uri().to_string());
            }
            Ok(ParsedSegment {
                seq: media_sequence
                    .checked_add(index as u64)
                    .ok_or_else(out_of_range)?,
                duration_s: segment.duration.duration().as_secs_f64(),
                discontinuity: segment.has_discontinuity,
                discontinuity_sequence,
                program_date_time_ms: segment
                    .program_date_time
                    .as_ref()
                    .and_then(|p| parse_program_date_time(&p.date_time)),
                uri: segment.uri().to_string(),
                map: map.clone(),
            })
        })
        .collect::<Result<_, ParseError>>()?;
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
    without_panic(|| variants_of(text))
}

fn variants_of(text: &str) -> Result<Vec<ParsedVariant>, ParseError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs on which hls_m3u8 0.7 panics (found by the fuzz targets `m3u8_media` and
    /// `m3u8_master`): each must be a clean error.
    #[test]
    fn parser_panics_become_errors() {
        let media = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1e20,\nseg.ts\n";
        assert!(matches!(parse_media(media), Err(ParseError::Invalid(_))));
        let master = "#EXTM3U\n#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"\n";
        assert!(matches!(parse_master(master), Err(ParseError::Invalid(_))));
    }

    #[test]
    fn sequence_numbers_past_u64_are_refused() {
        let media = format!(
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:{}\n#EXTINF:2,\na.ts\n#EXTINF:2,\nb.ts\n",
            u64::MAX
        );
        // hls_m3u8 may refuse the number itself; either way no panic and no wrapped sequence.
        match parse_media(&media) {
            Ok(parsed) => panic!("wrapped sequence accepted: {:?}", parsed.segments),
            Err(ParseError::Invalid(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}
