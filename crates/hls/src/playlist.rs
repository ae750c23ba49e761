//! Media playlists as text: the classic one, and the low-latency one (draft-pantos-hls-rfc8216bis
//! sections 4.4.3.7-8, 4.4.4.9, 4.4.5.3-4, 6.2.5.2) with the parts of the newest segments, the
//! one being made, a preload hint for the next part and a report per other rendition.

use crate::names;
use crate::timeline::format_program_date_time;
use crate::window::SegmentInfo;

/// A blocking playlist request may ask for a segment at most this many ahead of the newest
/// (rfc8216bis 6.2.5.2: 400 beyond).
pub const MAX_MSN_AHEAD: u64 = 2;
/// A blocking playlist request is held at most this many target durations, a request for the
/// hinted part this many part targets; then it gets what there is.
pub const HOLD_TARGETS: f64 = 3.0;

/// The segments a playlist lists and the numbers it starts with.
#[derive(Debug, Clone)]
pub struct Listing<'a> {
    pub media_sequence: u64,
    pub discontinuity_sequence: u64,
    pub target_duration_s: u32,
    pub segments: Vec<&'a SegmentInfo>,
}

/// Where another rendition is (`EXT-X-RENDITION-REPORT`), so a player switching to it asks for
/// the right part at once.
#[derive(Debug, Clone, PartialEq)]
pub struct RenditionReport {
    pub uri: String,
    pub last_msn: u64,
    pub last_part: u32,
}

/// What a low-latency playlist adds.
#[derive(Debug, Clone)]
pub struct LowLatency<'a> {
    /// The longest part there can be: PART-TARGET.
    pub part_target_s: f64,
    /// PART-HOLD-BACK: how far from the newest part a player starts.
    pub part_hold_back_s: f64,
    /// The segment being made: its parts so far.
    pub building: Option<&'a SegmentInfo>,
    /// How many of the newest full segments list their parts too (players joining mid-way
    /// start from parts of these).
    pub parts_of_last: usize,
    pub reports: Vec<RenditionReport>,
}

impl LowLatency<'_> {
    /// The next part to be made: what the preload hint names and a blocking request waits for.
    pub fn next_part(&self, listing: &Listing) -> (u64, u32) {
        // A segment being made whose parts already cover its slot (it is decided a moment
        // later) gets no more parts: the next one is the next segment's first.
        let full = f64::from(listing.target_duration_s) - self.part_target_s / 2.0;
        match (self.building, listing.segments.last()) {
            (Some(b), _) if b.duration_s >= full => (b.seq + 1, 0),
            (Some(b), _) => (b.seq, b.parts.len() as u32),
            (None, Some(last)) => (last.seq + 1, 0),
            (None, None) => (0, 0),
        }
    }
}

/// Renders a playlist; `uri` turns a file name ([`crate::names`]) into the URI written.
pub fn render(listing: &Listing, ll: Option<&LowLatency>, uri: impl Fn(&str) -> String) -> String {
    // TARGETDURATION must be >= every EXTINF rounded to the nearest integer (RFC 8216 4.3.3.1).
    let target = listing
        .segments
        .iter()
        .map(|i| i.duration_s.round() as u32)
        .max()
        .unwrap_or(0)
        .max(listing.target_duration_s);
    let building = ll.and_then(|l| l.building);
    let media_sequence = match (listing.segments.first(), building) {
        (None, Some(b)) => b.seq,
        _ => listing.media_sequence,
    };
    let mut out = String::with_capacity(256 + listing.segments.len() * 400);
    out.push_str("#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    out.push_str(&format!("#EXT-X-TARGETDURATION:{target}\n"));
    if let Some(ll) = ll {
        out.push_str(&format!(
            "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={:.3},HOLD-BACK={:.3}\n",
            ll.part_hold_back_s,
            f64::from(target) * 3.0
        ));
        out.push_str(&format!(
            "#EXT-X-PART-INF:PART-TARGET={:.3}\n",
            ll.part_target_s
        ));
    }
    out.push_str(&format!("#EXT-X-MEDIA-SEQUENCE:{media_sequence}\n"));
    out.push_str(&format!(
        "#EXT-X-DISCONTINUITY-SEQUENCE:{}\n",
        listing.discontinuity_sequence
    ));
    let with_parts_from = listing
        .segments
        .len()
        .saturating_sub(ll.map_or(0, |l| l.parts_of_last));
    let mut map: Option<String> = None;
    for (index, info) in listing.segments.iter().enumerate() {
        segment_head(&mut out, info, index > 0, &mut map, &uri);
        if ll.is_some() && index >= with_parts_from {
            parts(&mut out, info, &uri);
        }
        out.push_str(&format!(
            "#EXTINF:{:.3},\n{}\n",
            info.duration_s,
            uri(&names::segment(info.seq))
        ));
    }
    if let Some(ll) = ll {
        if let Some(b) = building {
            segment_head(&mut out, b, !listing.segments.is_empty(), &mut map, &uri);
            parts(&mut out, b, &uri);
        }
        let (seq, part) = ll.next_part(listing);
        if media_sequence <= seq {
            out.push_str(&format!(
                "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"{}\"\n",
                uri(&names::part(seq, part))
            ));
        }
        for r in &ll.reports {
            out.push_str(&format!(
                "#EXT-X-RENDITION-REPORT:URI=\"{}\",LAST-MSN={},LAST-PART={}\n",
                r.uri, r.last_msn, r.last_part
            ));
        }
    }
    out
}

/// The tags that go before a segment's first part or its URI: discontinuity, init segment
/// (when it changes), date and time.
fn segment_head(
    out: &mut String,
    info: &SegmentInfo,
    not_first: bool,
    map: &mut Option<String>,
    uri: &impl Fn(&str) -> String,
) {
    if info.discontinuity && not_first {
        out.push_str("#EXT-X-DISCONTINUITY\n");
    }
    if let Some(name) = info.map.as_deref()
        && map.as_deref() != Some(name)
    {
        out.push_str(&format!("#EXT-X-MAP:URI=\"{}\"\n", uri(name)));
        *map = Some(name.to_owned());
    }
    out.push_str(&format!(
        "#EXT-X-PROGRAM-DATE-TIME:{}\n",
        format_program_date_time(info.program_date_time_ms)
    ));
}

fn parts(out: &mut String, info: &SegmentInfo, uri: &impl Fn(&str) -> String) {
    for (index, part) in info.parts.iter().enumerate() {
        out.push_str(&format!(
            "#EXT-X-PART:DURATION={:.3},URI=\"{}\"{}\n",
            part.duration_s,
            uri(&names::part(info.seq, index as u32)),
            if part.independent {
                ",INDEPENDENT=YES"
            } else {
                ""
            }
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{PartInfo, SegmentWindow};

    fn info(seq: u64, parts: usize) -> SegmentInfo {
        SegmentInfo {
            seq,
            duration_s: 2.0,
            discontinuity: false,
            program_date_time_ms: seq * 2000,
            map: Some("init-00112233aabbccdd.mp4".into()),
            parts: (0..parts)
                .map(|i| PartInfo {
                    duration_s: if i % 2 == 0 { 0.52 } else { 0.48 },
                    independent: i == 0,
                    len: 100 + i,
                })
                .collect(),
        }
    }

    #[test]
    fn hls_m3u8_reads_low_latency_playlists() {
        let mut w = SegmentWindow::new(6);
        for seq in 10..14 {
            w.push(info(seq, 4), ()).unwrap();
        }
        let mut building = info(14, 2);
        building.duration_s = 1.0;
        let ll = LowLatency {
            part_target_s: 0.52,
            part_hold_back_s: 1.56,
            building: Some(&building),
            parts_of_last: 2,
            reports: vec![RenditionReport {
                uri: "../240p/index.m3u8".into(),
                last_msn: 14,
                last_part: 1,
            }],
        };
        let text = render(&w.listing(6, 2), Some(&ll), |n| format!("{n}?t=x"));
        let parsed = crate::parse::parse_media(&text).expect(&text);
        assert_eq!(parsed.segments.len(), 4, "{text}");
        let low = &parsed.low_latency;
        assert_eq!(
            (low.part_target_s, low.part_hold_back_s),
            (Some(0.52), Some(1.56))
        );
        assert!(low.can_block_reload);
        // Parts of the two newest full segments and of the one being made, each placed.
        let placed: Vec<(u64, u32)> = low.parts.iter().map(|p| (p.seq, p.index)).collect();
        assert_eq!(
            placed,
            vec![
                (12, 0),
                (12, 1),
                (12, 2),
                (12, 3),
                (13, 0),
                (13, 1),
                (13, 2),
                (13, 3),
                (14, 0),
                (14, 1)
            ]
        );
        assert_eq!(low.parts[9].uri, "14.1.m4s?t=x");
        assert!(low.parts[8].independent && !low.parts[9].independent);
        let b = low.building.as_ref().unwrap();
        assert_eq!((b.seq, b.program_date_time_ms), (14, Some(28_000)));
        assert_eq!(b.map.as_deref(), Some("init-00112233aabbccdd.mp4?t=x"));
        assert_eq!(low.preload_hint.as_deref(), Some("14.2.m4s?t=x"));
        // Once the segment being made has all its parts, the hint names the next segment's.
        let mut whole = info(14, 4);
        whole.duration_s = 2.0;
        let ll_whole = LowLatency {
            building: Some(&whole),
            ..ll.clone()
        };
        let text_whole = render(&w.listing(6, 2), Some(&ll_whole), str::to_owned);
        assert!(
            text_whole.contains("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"15.0.m4s\""),
            "{text_whole}"
        );
        // Spec rules: every part within PART-TARGET; parts of a segment add up to it;
        // PART-HOLD-BACK at least twice PART-TARGET; HOLD-BACK at least three target durations.
        for seq in [12, 13] {
            let total: f64 = low.parts_of(seq).map(|p| p.duration_s).sum();
            assert!((total - 2.0).abs() < 1e-9);
        }
        assert!(low.parts.iter().all(|p| p.duration_s <= 0.52));
        assert!(text.contains("HOLD-BACK=6.000"));
        // A classic playlist has none of it.
        let classic = crate::parse::parse_media(&w.render(6, 2, str::to_owned)).unwrap();
        assert_eq!(classic.low_latency, Default::default());
    }
}
