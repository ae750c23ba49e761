//! What one rendition serves, on an ingest (what it made) and on a broadcast (what it pulled):
//! the window of full segments, the segment being made (its parts so far), and the init
//! segments they name; and the playlists that list them.

use std::collections::HashMap;

use bytes::Bytes;

use crate::playlist::{Listing, LowLatency, RenditionReport, render};
use crate::window::{SegmentInfo, SegmentWindow, WindowError};

/// Newest full segments whose parts a low-latency playlist lists too.
pub const PARTS_OF_LAST: usize = 2;

/// The parts published so far of the segment after the window's last.
#[derive(Debug, Clone)]
pub struct Building {
    /// `parts` describes them; `duration_s` is their sum.
    pub info: SegmentInfo,
    pub parts: Vec<Bytes>,
}

/// How media playlists are shaped (from the timeline config and the part clock).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlaylistShape {
    pub list_len: usize,
    pub target_s: u32,
    pub part_target_s: f64,
    pub part_hold_back_s: f64,
}

impl PlaylistShape {
    /// `list_len` segments of `target_s`; parts of at most `part_target_s` (0: none), players
    /// starting `hold_back_parts` of them behind the newest.
    pub fn new(list_len: usize, target_s: u32, part_target_s: f64, hold_back_parts: u32) -> Self {
        Self {
            list_len,
            target_s,
            part_target_s,
            part_hold_back_s: part_target_s * f64::from(hold_back_parts),
        }
    }
}

#[derive(Debug)]
pub struct RenditionMedia {
    window: SegmentWindow<Bytes>,
    inits: HashMap<String, Bytes>,
    building: Option<Building>,
}

impl RenditionMedia {
    pub fn new(capacity: usize) -> Self {
        Self {
            window: SegmentWindow::new(capacity),
            inits: HashMap::new(),
            building: None,
        }
    }

    pub fn window(&self) -> &SegmentWindow<Bytes> {
        &self.window
    }

    pub fn building(&self) -> Option<&Building> {
        self.building.as_ref()
    }

    pub fn init(&self, name: &str) -> Option<Bytes> {
        self.inits.get(name).cloned()
    }

    /// Keeps an init segment until nothing names it any more.
    pub fn add_init(&mut self, name: &str, bytes: Bytes) {
        self.inits.entry(name.to_owned()).or_insert(bytes);
    }

    /// Numbers discontinuities like the playlist this window is filled from.
    pub fn start_discontinuity_sequence(&mut self, number: u64) {
        self.window.start_discontinuity_sequence(number);
    }

    /// Publishes a full segment (its init added first); it replaces the parts shown for it.
    pub fn push(&mut self, info: SegmentInfo, data: Bytes) -> Result<(), WindowError> {
        let pushed = self.window.push(info, data);
        if self
            .building
            .as_ref()
            .is_some_and(|b| Some(b.info.seq) <= self.window.last_seq())
        {
            self.building = None;
        }
        self.prune_inits();
        pushed
    }

    /// Shows the parts so far of the segment after the window's last (`None` clears them).
    pub fn set_building(&mut self, building: Option<Building>) {
        self.building = building.filter(|b| {
            !b.parts.is_empty() && self.window.last_seq().is_none_or(|last| b.info.seq > last)
        });
        self.prune_inits();
    }

    /// Part `index` of segment `seq`, from a full segment or the one being made.
    pub fn part(&self, seq: u64, index: u32) -> Option<Bytes> {
        if let Some(b) = &self.building
            && b.info.seq == seq
        {
            return b.parts.get(index as usize).cloned();
        }
        let (info, data) = self.window.get(seq)?;
        Some(data.slice(info.part_range(index)?))
    }

    /// The newest part: (segment, part index); a segment without parts counts as part 0.
    pub fn last_part(&self) -> Option<(u64, u32)> {
        if let Some(b) = &self.building {
            return Some((b.info.seq, b.parts.len().saturating_sub(1) as u32));
        }
        self.window
            .iter()
            .last()
            .map(|(i, _)| (i.seq, i.parts.len().saturating_sub(1) as u32))
    }

    /// True once part `index` of segment `seq` (the whole segment when `index` is `None`) is
    /// published, or anything after it. A part index past a full segment's last part means the
    /// next segment's first part (rfc8216bis 6.2.5.2).
    pub fn has(&self, seq: u64, index: Option<u32>) -> bool {
        if let (Some(index), Some((info, _))) = (index, self.window.get(seq))
            && index as usize >= info.parts.len()
            && !info.parts.is_empty()
        {
            return self.has(seq + 1, Some(0));
        }
        if self.window.last_seq().is_some_and(|last| last >= seq) {
            return true;
        }
        match (&self.building, index) {
            (Some(b), Some(index)) => {
                b.info.seq > seq || (b.info.seq == seq && b.parts.len() > index as usize)
            }
            _ => false,
        }
    }

    /// The classic media playlist.
    pub fn classic_playlist(&self, shape: &PlaylistShape, uri: impl Fn(&str) -> String) -> String {
        render(&self.listing(shape), None, uri)
    }

    /// The low-latency media playlist, with the given reports of the other renditions.
    pub fn low_latency_playlist(
        &self,
        shape: &PlaylistShape,
        reports: Vec<RenditionReport>,
        uri: impl Fn(&str) -> String,
    ) -> String {
        let ll = LowLatency {
            part_target_s: shape.part_target_s,
            part_hold_back_s: shape.part_hold_back_s,
            building: self.building.as_ref().map(|b| &b.info),
            parts_of_last: PARTS_OF_LAST,
            reports,
        };
        render(&self.listing(shape), Some(&ll), uri)
    }

    fn listing(&self, shape: &PlaylistShape) -> Listing<'_> {
        self.window.listing(shape.list_len, shape.target_s)
    }

    /// The report other renditions' playlists give about this one.
    pub fn report(&self, uri: String) -> Option<RenditionReport> {
        let (last_msn, last_part) = self.last_part()?;
        Some(RenditionReport {
            uri,
            last_msn,
            last_part,
        })
    }

    /// Init segments no published segment or part names any more go.
    fn prune_inits(&mut self) {
        let (window, building) = (&self.window, &self.building);
        self.inits.retain(|name, _| {
            window.iter().any(|(i, _)| i.map.as_deref() == Some(name))
                || building
                    .as_ref()
                    .is_some_and(|b| b.info.map.as_deref() == Some(name))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::PartInfo;

    fn info(seq: u64, parts: &[usize]) -> SegmentInfo {
        SegmentInfo {
            seq,
            duration_s: 0.5 * parts.len() as f64,
            discontinuity: false,
            program_date_time_ms: seq * 2000,
            map: Some(format!("init-{seq:016x}.mp4")),
            parts: parts
                .iter()
                .enumerate()
                .map(|(i, len)| PartInfo {
                    duration_s: 0.5,
                    independent: i == 0,
                    len: *len,
                })
                .collect(),
        }
    }

    #[test]
    fn parts_come_from_the_segment_being_made_then_from_the_full_one() {
        let mut m = RenditionMedia::new(4);
        m.add_init("init-0000000000000001.mp4", Bytes::from_static(b"i1"));
        m.push(info(1, &[2, 3]), Bytes::from_static(b"aabbb"))
            .unwrap();
        assert_eq!(m.part(1, 1).as_deref(), Some(&b"bbb"[..]));
        assert_eq!(m.part(1, 2), None);
        assert!(m.has(1, None) && !m.has(2, Some(0)));
        // Past the last part of a full segment: the next segment's first part.
        assert!(m.has(1, Some(1)) && !m.has(1, Some(2)));
        m.add_init("init-0000000000000002.mp4", Bytes::from_static(b"i2"));
        m.set_building(Some(Building {
            info: info(2, &[1]),
            parts: vec![Bytes::from_static(b"c")],
        }));
        assert_eq!(m.part(2, 0).as_deref(), Some(&b"c"[..]));
        assert!(m.has(2, Some(0)) && !m.has(2, Some(1)) && !m.has(2, None));
        assert_eq!(m.last_part(), Some((2, 0)));
        assert!(m.init("init-0000000000000002.mp4").is_some());
        // The full segment replaces the parts shown; a stale building is refused.
        m.push(info(2, &[1, 1]), Bytes::from_static(b"cd")).unwrap();
        assert!(m.building().is_none());
        assert_eq!(m.part(2, 1).as_deref(), Some(&b"d"[..]));
        m.set_building(Some(Building {
            info: info(2, &[1]),
            parts: vec![Bytes::from_static(b"c")],
        }));
        assert!(m.building().is_none());
        // Inits nobody names go once the window moves on.
        for seq in 3..7 {
            m.add_init(&format!("init-{seq:016x}.mp4"), Bytes::from_static(b"i"));
            m.push(info(seq, &[1]), Bytes::from_static(b"x")).unwrap();
        }
        assert!(m.init("init-0000000000000001.mp4").is_none());
        assert!(m.init("init-0000000000000006.mp4").is_some());
    }
}
