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
    /// Low-latency HLS: what the playlist adds (empty or `None` in a classic playlist).
    pub low_latency: LowLatencyInfo,
}

/// One `EXT-X-PART`, placed: part `index` of segment `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedPart {
    pub seq: u64,
    pub index: u32,
    pub duration_s: f64,
    pub independent: bool,
    pub uri: String,
}

/// The segment whose parts follow the last full segment.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedBuilding {
    pub seq: u64,
    pub discontinuity: bool,
    pub program_date_time_ms: Option<u64>,
    pub map: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct LowLatencyInfo {
    pub part_target_s: Option<f64>,
    pub part_hold_back_s: Option<f64>,
    pub can_block_reload: bool,
    /// Every listed part, in order.
    pub parts: Vec<ParsedPart>,
    pub building: Option<ParsedBuilding>,
    pub preload_hint: Option<String>,
}

impl LowLatencyInfo {
    /// The parts of segment `seq`.
    pub fn parts_of(&self, seq: u64) -> impl Iterator<Item = &ParsedPart> {
        self.parts.iter().filter(move |p| p.seq == seq)
    }
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

/// Tags that belong to a segment or part: a playlist without any full segment yet ends its
/// classic part before the first of them.
const SEGMENT_TAGS: [&str; 6] = [
    "#EXT-X-PROGRAM-DATE-TIME",
    "#EXT-X-PART:",
    "#EXT-X-MAP",
    "#EXT-X-DISCONTINUITY\n",
    "#EXT-X-PRELOAD-HINT",
    "#EXT-X-RENDITION-REPORT",
];

fn media_of(text: &str) -> Result<ParsedMedia, ParseError> {
    // hls_m3u8 0.7 knows no low-latency tags after the last segment (the parts of the segment
    // being made): it reads up to the last URI, and `low_latency` reads the rest.
    let mut classic_end = None;
    let mut first_segment_tag = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            classic_end = Some(offset + line.len());
        } else if SEGMENT_TAGS.iter().any(|t| trimmed.starts_with(t)) {
            first_segment_tag.get_or_insert(offset);
        }
        offset += line.len();
    }
    let classic_end = classic_end.or(first_segment_tag).unwrap_or(text.len());
    let playlist = MediaPlaylist::try_from(&text[..classic_end])
        .map_err(|e| ParseError::Invalid(e.to_string()))?;
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
        low_latency: low_latency(text, media_sequence)?,
    })
}

/// The low-latency tags of a media playlist, each part placed in its segment.
fn low_latency(text: &str, media_sequence: u64) -> Result<LowLatencyInfo, ParseError> {
    let invalid = |what: &str| ParseError::Invalid(format!("low-latency tag: {what}"));
    let mut info = LowLatencyInfo::default();
    let mut seq = media_sequence;
    let mut index = 0u32;
    let mut map = None;
    let mut head = ParsedBuilding {
        seq,
        discontinuity: false,
        program_date_time_ms: None,
        map: None,
    };
    for line in text.lines().map(str::trim) {
        let (tag, value) = line.split_once(':').unwrap_or((line, ""));
        match tag {
            "#EXT-X-PART-INF" => {
                info.part_target_s = attribute(value, "PART-TARGET").and_then(|v| v.parse().ok())
            }
            "#EXT-X-SERVER-CONTROL" => {
                info.part_hold_back_s =
                    attribute(value, "PART-HOLD-BACK").and_then(|v| v.parse().ok());
                info.can_block_reload = attribute(value, "CAN-BLOCK-RELOAD") == Some("YES");
            }
            "#EXT-X-DISCONTINUITY" => head.discontinuity = true,
            "#EXT-X-PROGRAM-DATE-TIME" => {
                head.program_date_time_ms = parse_program_date_time(value)
            }
            "#EXT-X-MAP" => map = attribute(value, "URI").map(str::to_owned),
            "#EXT-X-PART" => {
                let duration_s = attribute(value, "DURATION")
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|d| d.is_finite() && *d >= 0.0)
                    .ok_or_else(|| invalid("EXT-X-PART without a valid DURATION"))?;
                let uri =
                    attribute(value, "URI").ok_or_else(|| invalid("EXT-X-PART without URI"))?;
                info.parts.push(ParsedPart {
                    seq,
                    index,
                    duration_s,
                    independent: attribute(value, "INDEPENDENT") == Some("YES"),
                    uri: uri.to_owned(),
                });
                index += 1;
            }
            "#EXT-X-PRELOAD-HINT" if attribute(value, "TYPE") == Some("PART") => {
                info.preload_hint = attribute(value, "URI").map(str::to_owned)
            }
            _ if !line.is_empty() && !line.starts_with('#') => {
                seq = seq
                    .checked_add(1)
                    .ok_or_else(|| invalid("sequence out of range"))?;
                index = 0;
                head = ParsedBuilding {
                    seq,
                    discontinuity: false,
                    program_date_time_ms: None,
                    map: None,
                };
            }
            _ => {}
        }
    }
    if index > 0 {
        head.map = map;
        info.building = Some(head);
    }
    Ok(info)
}

/// The value of `key` in an attribute list (quotes removed). Our values hold no commas.
fn attribute<'a>(list: &'a str, key: &str) -> Option<&'a str> {
    list.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
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
