//! A sliding window of segments, numbered by slot, and what its media playlist lists.
//!
//! Ingests keep one per rendition for the segments they made; broadcasts keep one per rendition
//! for the segments they pulled. Both render their own playlists from it, so the discontinuity
//! sequence and media sequence are always consistent with what the window holds.

use std::collections::VecDeque;

use crate::playlist::{Listing, render};

/// One part of a segment (low-latency HLS): the segment's bytes are its parts in order.
#[derive(Debug, Clone, PartialEq)]
pub struct PartInfo {
    pub duration_s: f64,
    /// Starts with a keyframe.
    pub independent: bool,
    pub len: usize,
}

/// What a playlist says about one segment.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentInfo {
    /// Media sequence number = time slot.
    pub seq: u64,
    pub duration_s: f64,
    /// EXT-X-DISCONTINUITY before this segment (input switch, slate, gap).
    pub discontinuity: bool,
    pub program_date_time_ms: u64,
    /// File name of the init segment (`EXT-X-MAP`) this segment needs.
    pub map: Option<String>,
    /// Its parts, when it was made of parts (empty otherwise).
    pub parts: Vec<PartInfo>,
}

impl SegmentInfo {
    /// Byte range of part `index` in the segment's bytes.
    pub fn part_range(&self, index: u32) -> Option<std::ops::Range<usize>> {
        let index = index as usize;
        let start: usize = self.parts.get(..index)?.iter().map(|p| p.len).sum();
        Some(start..start + self.parts.get(index)?.len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("segment {got} is not after the last one ({last}): the timeline never goes backwards")]
    NotAfterLast { got: u64, last: u64 },
}

/// The newest `capacity` segments, each with a payload (bytes, or `()` for bookkeeping).
#[derive(Debug, Clone)]
pub struct SegmentWindow<T> {
    capacity: usize,
    segments: VecDeque<(SegmentInfo, T)>,
    /// Discontinuities of segments that already left the window (plus the starting number).
    dropped_discontinuities: u64,
    /// Discontinuity sequence number the first segment pushed into an empty window takes.
    start_discontinuity_sequence: u64,
}

impl<T> SegmentWindow<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            segments: VecDeque::new(),
            dropped_discontinuities: 0,
            start_discontinuity_sequence: 0,
        }
    }

    /// Numbers discontinuities like the playlist this window is filled from, so that every
    /// broadcast pulling the same timeline serves the same EXT-X-DISCONTINUITY-SEQUENCE (players
    /// moving between broadcasts reject a mismatch). Takes effect on the first segment pushed
    /// into an empty window; later calls change nothing.
    pub fn start_discontinuity_sequence(&mut self, number: u64) {
        if self.segments.is_empty() {
            self.start_discontinuity_sequence = number;
        }
    }

    /// Appends a segment. A gap in sequence numbers is marked as a discontinuity, so a player
    /// never splices across missing media without being told.
    pub fn push(&mut self, mut info: SegmentInfo, payload: T) -> Result<(), WindowError> {
        if let Some(last) = self.last_seq() {
            if info.seq <= last {
                return Err(WindowError::NotAfterLast {
                    got: info.seq,
                    last,
                });
            }
            if info.seq != last + 1 {
                info.discontinuity = true;
            }
        } else {
            // The first segment's own discontinuity is part of its starting number.
            self.dropped_discontinuities = self
                .start_discontinuity_sequence
                .saturating_sub(u64::from(info.discontinuity));
        }
        self.segments.push_back((info, payload));
        while self.segments.len() > self.capacity {
            if let Some((old, _)) = self.segments.pop_front()
                && old.discontinuity
            {
                self.dropped_discontinuities += 1;
            }
        }
        Ok(())
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.segments.back().map(|(i, _)| i.seq)
    }

    pub fn first_seq(&self) -> Option<u64> {
        self.segments.front().map(|(i, _)| i.seq)
    }

    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn get(&self, seq: u64) -> Option<(&SegmentInfo, &T)> {
        let first = self.first_seq()?;
        if seq < first {
            return None;
        }
        // Sequence numbers may have gaps, so search from the computed position backwards.
        let guess = usize::try_from(seq - first)
            .unwrap_or(usize::MAX)
            .min(self.segments.len().saturating_sub(1));
        self.segments
            .range(..=guess)
            .rev()
            .find(|(i, _)| i.seq == seq)
            .map(|(i, p)| (i, p))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SegmentInfo, &T)> {
        self.segments.iter().map(|(i, p)| (i, p))
    }

    /// What the media playlist of the newest `list_len` segments lists.
    pub fn listing(&self, list_len: usize, target_duration_s: u32) -> Listing<'_> {
        // Media sequence numbers are implicit in a playlist (first + index), so only the newest
        // gap-free run can be listed; older segments stay fetchable by URI.
        let run_start = self
            .segments
            .iter()
            .zip(self.segments.iter().skip(1))
            .enumerate()
            .filter(|(_, ((a, _), (b, _)))| b.seq != a.seq + 1)
            .map(|(index, _)| index + 1)
            .last()
            .unwrap_or(0);
        let skip = self.segments.len().saturating_sub(list_len).max(run_start);
        let segments: Vec<&SegmentInfo> = self.segments.iter().skip(skip).map(|(i, _)| i).collect();
        // A discontinuity before the first listed segment is not written as a tag (nothing
        // precedes it in this playlist) but counted in its discontinuity sequence number.
        let discontinuity_sequence = self.dropped_discontinuities
            + self
                .segments
                .iter()
                .take(skip)
                .filter(|(i, _)| i.discontinuity)
                .count() as u64
            + u64::from(segments.first().is_some_and(|i| i.discontinuity));
        Listing {
            media_sequence: segments.first().map_or(0, |i| i.seq),
            discontinuity_sequence,
            target_duration_s,
            segments,
        }
    }

    /// Renders the media playlist of the newest `list_len` segments. `uri` turns a file name
    /// ([`crate::names`]) into the URI written (the broadcast appends the viewer token there).
    pub fn render(
        &self,
        list_len: usize,
        target_duration_s: u32,
        uri: impl Fn(&str) -> String,
    ) -> String {
        render(&self.listing(list_len, target_duration_s), None, uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_media;

    fn info(seq: u64, discontinuity: bool) -> SegmentInfo {
        SegmentInfo {
            seq,
            duration_s: 2.0,
            discontinuity,
            program_date_time_ms: seq * 2000,
            map: Some(format!("init-{:016x}.mp4", seq / 3)),
            parts: Vec::new(),
        }
    }

    #[test]
    fn keeps_the_newest_and_never_goes_back() {
        let mut w = SegmentWindow::new(3);
        for seq in 10..15 {
            w.push(info(seq, false), seq).unwrap();
        }
        assert_eq!((w.first_seq(), w.last_seq()), (Some(12), Some(14)));
        assert_eq!(w.get(13).map(|(_, p)| *p), Some(13));
        assert_eq!(w.get(11), None);
        assert_eq!(
            w.push(info(14, false), 0),
            Err(WindowError::NotAfterLast { got: 14, last: 14 })
        );
    }

    #[test]
    fn gaps_become_discontinuities_and_are_counted_when_dropped() {
        let mut w = SegmentWindow::new(4);
        w.push(info(1, false), ()).unwrap();
        w.push(info(2, false), ()).unwrap();
        w.push(info(5, false), ()).unwrap(); // gap: 3 and 4 missing
        w.push(info(6, true), ()).unwrap();
        let text = w.render(3, 2, |name| name.to_owned());
        let parsed = parse_media(&text).unwrap();
        // Only the run after the gap is listed, so sequence numbers stay true.
        assert_eq!(parsed.media_sequence, 5);
        assert_eq!(parsed.discontinuity_sequence, 1);
        let listed: Vec<(u64, String)> = parsed
            .segments
            .iter()
            .map(|s| (s.seq, s.uri.clone()))
            .collect();
        assert_eq!(
            listed,
            vec![(5, "5.m4s".to_owned()), (6, "6.m4s".to_owned())]
        );
        assert!(parsed.segments[1].discontinuity);
        // Once segment 5 (a discontinuity) leaves the listed part, the sequence counts it.
        w.push(info(7, false), ()).unwrap();
        w.push(info(8, false), ()).unwrap();
        let parsed = parse_media(&w.render(2, 2, |name| name.to_owned())).unwrap();
        assert_eq!(parsed.media_sequence, 7);
        assert_eq!(parsed.discontinuity_sequence, 2);
        assert_eq!(w.get(2).map(|(i, _)| i.seq), None);
        assert_eq!(w.get(4).map(|(i, _)| i.seq), None);
        assert_eq!(w.get(5).map(|(i, _)| i.seq), Some(5));
    }

    #[test]
    fn a_window_filled_from_a_playlist_keeps_its_discontinuity_numbers() {
        let mut origin = SegmentWindow::new(10);
        for (seq, d) in [
            (1, false),
            (2, true),
            (3, true),
            (4, false),
            (5, true),
            (6, false),
        ] {
            origin.push(info(seq, d), ()).unwrap();
        }
        let parsed = parse_media(&origin.render(4, 2, |name| name.to_owned())).unwrap();
        let numbers: Vec<(u64, u64)> = parsed
            .segments
            .iter()
            .map(|s| (s.seq, s.discontinuity_sequence))
            .collect();
        assert_eq!(numbers, vec![(3, 2), (4, 2), (5, 3), (6, 3)]);
        // A second window joining late, from segment 4 on, serves the same numbers.
        let mut edge = SegmentWindow::new(10);
        edge.start_discontinuity_sequence(parsed.segments[1].discontinuity_sequence);
        for s in &parsed.segments[1..] {
            edge.push(info(s.seq, s.discontinuity), ()).unwrap();
        }
        let theirs = parse_media(&origin.render(2, 2, |name| name.to_owned())).unwrap();
        let ours = parse_media(&edge.render(2, 2, |name| name.to_owned())).unwrap();
        assert_eq!(ours.discontinuity_sequence, theirs.discontinuity_sequence);
        assert_eq!(ours.media_sequence, theirs.media_sequence);
    }

    #[test]
    fn playlist_carries_date_times_and_uris() {
        let mut w = SegmentWindow::new(6);
        for seq in 882_000_000..882_000_004 {
            w.push(info(seq, false), ()).unwrap();
        }
        let text = w.render(6, 2, |name| format!("{name}?t=abc"));
        let parsed = parse_media(&text).unwrap();
        assert_eq!(parsed.target_duration_s, 2.0);
        assert_eq!(parsed.segments.len(), 4);
        assert_eq!(parsed.segments[0].uri, "882000000.m4s?t=abc");
        // The init segment is named where it changes, and applies to what follows.
        assert_eq!(text.matches("#EXT-X-MAP:").count(), 2);
        assert_eq!(
            parsed.segments[0].map.as_deref(),
            Some("init-0000000011861580.mp4?t=abc")
        );
        assert_eq!(parsed.segments[2].map, parsed.segments[0].map);
        assert_eq!(
            parsed.segments[3].map.as_deref(),
            Some("init-0000000011861581.mp4?t=abc")
        );
        assert_eq!(parsed.segments[0].seq, 882_000_000);
        assert_eq!(
            parsed.segments[3].program_date_time_ms,
            Some(882_000_003 * 2000)
        );
    }
}
