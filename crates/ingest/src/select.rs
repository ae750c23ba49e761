//! Which source of a channel feeds the transcoder, decided once per slot by a rule both ingests
//! compute alike (docs/architecture.md).
//!
//! The only facts used are media timestamps mapped to wall clock with the publish's anchor, which
//! every ingest receives identically (from the source, or from the relaying peer). A source
//! *delivered slot k* when its media covers [k·D, (k+1)·D) without a gap. At the start of slot
//! k+1 (plus a short delay for the last frames to arrive) every ingest asks [`Selector::decide`]:
//! - the active source keeps the slot if it delivered slot k, unless a higher-priority source has
//!   delivered [`RETURN_AFTER_SLOTS`] whole slots in a row (stable again: go back to it);
//! - otherwise (it missed slot k: killed, hung, network gone) the highest-priority source that
//!   delivered slot k takes over, so a failover costs at most one slot plus the pipeline;
//! - when none did, the highest-priority source that *starts* slot k+1 (its media began before
//!   the boundary and has reached it) takes it: a publisher that just (re)connected, the only
//!   source left, goes live at its first whole slot rather than one slot later;
//! - between two decisions, an active source from which nothing arrived for longer than a media
//!   gap ([`MAX_MEDIA_GAP_MS`]: hung, its connection still open; arrival time is the one fact not
//!   taken from timestamps, and both ingests see the same silence of a hung source) hands the slot decided last to the
//!   best source that delivered the slot before ([`Selector::replace_active`]); waiting for the
//!   next decision cost that slot and often the previous one (the silent run could not finish
//!   it) as two slates published late.

use std::collections::HashMap;
use std::hash::Hash;

use streaming_hls::SlotClock;

/// Whole consecutive slots a higher-priority source must deliver before the ingests go back to
/// it, unless the cluster says otherwise (`timeline.primaryReturnSeconds` in cluster.nix).
pub const RETURN_AFTER_SLOTS: u32 = 3;
/// A silence longer than this between two media tags breaks a source's coverage.
pub const MAX_MEDIA_GAP_MS: u64 = 1000;
/// Slack at a slot's edges: the first and last frames of a slot sit up to one frame (plus
/// audio/video interleaving) inside it.
pub const SLOT_EDGE_TOLERANCE_MS: u64 = 100;

/// Rank of a publisher: position of its `source` in the channel's source list, unknown or absent
/// sources after every configured one.
pub fn rank_of(source: Option<&str>, ranked_sources: &[String]) -> u32 {
    source
        .and_then(|s| ranked_sources.iter().position(|r| r == s))
        .map_or(ranked_sources.len() as u32, |p| p as u32)
}

/// The wall-clock span one publisher's media covered without a gap, by its own timestamps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    start_ms: Option<u64>,
    last_ms: u64,
}

impl Coverage {
    /// Notes a media tag whose timestamp maps to wall-clock `wall_ms` (anchor + timestamp).
    /// A gap, or a jump back (the encoder restarted its clock), starts a new span.
    pub fn observe(&mut self, wall_ms: u64) {
        let continues = self.start_ms.is_some()
            && wall_ms <= self.last_ms + MAX_MEDIA_GAP_MS
            && wall_ms + MAX_MEDIA_GAP_MS >= self.last_ms;
        if continues {
            self.last_ms = self.last_ms.max(wall_ms);
        } else {
            self.start_ms = Some(wall_ms);
            self.last_ms = wall_ms;
        }
    }

    /// True when the current span began by `slot`'s start and has reached it: the source can
    /// feed `slot` from its boundary on, if it keeps sending.
    pub fn starts(&self, clock: SlotClock, slot: u64) -> bool {
        self.start_ms.is_some_and(|start| {
            start <= clock.slot_start_ms(slot) + SLOT_EDGE_TOLERANCE_MS
                && self.last_ms >= clock.slot_start_ms(slot)
        })
    }

    /// True when the current span covers the whole of `slot`.
    pub fn covers(&self, clock: SlotClock, slot: u64) -> bool {
        self.start_ms.is_some_and(|start| {
            start <= clock.slot_start_ms(slot) + SLOT_EDGE_TOLERANCE_MS
                && self.last_ms + SLOT_EDGE_TOLERANCE_MS >= clock.slot_start_ms(slot + 1)
        })
    }
}

/// What the rule knows about one source for the slot that just ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFact<K> {
    pub key: K,
    /// Lower is preferred; ties go to the smaller key (identical on every ingest).
    pub rank: u32,
    pub delivered: bool,
    /// Its media reaches into the slot being decided from before its start (see
    /// [`Coverage::starts`]); used only when no source delivered the previous slot.
    pub starts: bool,
}

/// The per-channel source choice: pure, fed once per slot.
#[derive(Debug, Clone)]
pub struct Selector<K> {
    active: Option<K>,
    streaks: HashMap<K, u32>,
    return_after: u32,
}

impl<K> Default for Selector<K> {
    fn default() -> Self {
        Self::new(RETURN_AFTER_SLOTS)
    }
}

impl<K> Selector<K> {
    /// A selector that goes back to a better source after `return_after` whole slots.
    pub fn new(return_after: u32) -> Self {
        Self {
            active: None,
            streaks: HashMap::new(),
            return_after: return_after.max(1),
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> Selector<K> {
    pub fn active(&self) -> Option<&K> {
        self.active.as_ref()
    }

    /// Whole slots in a row `key` has delivered, as of the last decision.
    pub fn streak(&self, key: &K) -> u32 {
        self.streaks.get(key).copied().unwrap_or(0)
    }

    /// Decides the source of slot k+1 from the facts about slot k (one fact per source present;
    /// absent sources count as not delivered). `None` means the slate.
    pub fn decide(&mut self, facts: &[SlotFact<K>]) -> Option<K> {
        let streaks: HashMap<K, u32> = facts
            .iter()
            .map(|f| {
                let s = if f.delivered {
                    self.streak(&f.key) + 1
                } else {
                    0
                };
                (f.key.clone(), s)
            })
            .collect();
        let best = |min_streak: u32, better_than: Option<u32>| {
            facts
                .iter()
                .filter(|f| streaks[&f.key] >= min_streak && better_than.is_none_or(|r| f.rank < r))
                .min_by(|a, b| (a.rank, &a.key).cmp(&(b.rank, &b.key)))
                .map(|f| f.key.clone())
        };
        let current = self
            .active
            .as_ref()
            .and_then(|a| facts.iter().find(|f| &f.key == a))
            .filter(|f| f.delivered);
        self.active = match current {
            Some(cur) => best(self.return_after, Some(cur.rank)).or_else(|| Some(cur.key.clone())),
            None => best(1, None).or_else(|| {
                facts
                    .iter()
                    .filter(|f| f.starts)
                    .min_by(|a, b| (a.rank, &a.key).cmp(&(b.rank, &b.key)))
                    .map(|f| f.key.clone())
            }),
        };
        self.streaks = streaks;
        self.active.clone()
    }

    /// The active source went silent during a slot already decided for it (hung: its
    /// connection stays open and nothing arrives). Hands that slot to the best other source
    /// that delivered the previous one (the facts of that same decision), else to one that
    /// starts it; the silent source's streak is broken. Returns `None` and changes nothing
    /// when no other source could take it: a late source may still catch up, a slate cannot.
    pub fn replace_active(&mut self, facts: &[SlotFact<K>]) -> Option<K> {
        let gone = self.active.clone()?;
        let others = || facts.iter().filter(|f| f.key != gone);
        let rank = |f: &&SlotFact<K>| (f.rank, f.key.clone());
        let next = others()
            .filter(|f| f.delivered)
            .min_by_key(rank)
            .or_else(|| others().filter(|f| f.starts).min_by_key(rank))?
            .key
            .clone();
        self.streaks.insert(gone, 0);
        self.active = Some(next.clone());
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_follow_config_and_unknown_goes_last() {
        let ranked = vec!["source1".to_string(), "source2".to_string()];
        assert_eq!(rank_of(Some("source1"), &ranked), 0);
        assert_eq!(rank_of(Some("source2"), &ranked), 1);
        assert_eq!(rank_of(Some("obs"), &ranked), 2);
        assert_eq!(rank_of(None, &ranked), 2);
    }

    #[test]
    fn coverage_needs_the_whole_slot_without_gaps() {
        let clock = SlotClock::new(2);
        let k = 882_000_000u64; // slot start 1_764_000_000_000
        let start = clock.slot_start_ms(k);
        let mut c = Coverage::default();
        assert!(!c.covers(clock, k));
        // Publisher starts 500 ms into slot k: k is not whole, k+1 will be.
        for t in (start + 500..start + 4_020).step_by(40) {
            c.observe(t);
        }
        assert!(!c.covers(clock, k));
        assert!(c.covers(clock, k + 1));
        // Frames 20 ms after the boundary still count as covering from the boundary.
        let mut c = Coverage::default();
        for t in (start + 20..start + 2_000).step_by(40) {
            c.observe(t);
        }
        assert!(c.covers(clock, k));
        // A 1.5 s hole in slot k+1 breaks it (and k+2 starts a new span late).
        for t in (start + 3_500..start + 6_100).step_by(40) {
            c.observe(t);
        }
        assert!(!c.covers(clock, k + 1));
        assert!(c.covers(clock, k + 2));
        // Timestamps jumping back (encoder restart) start over.
        c.observe(start);
        assert!(!c.covers(clock, k + 2));
    }

    fn fact(key: &'static str, rank: u32, delivered: bool) -> SlotFact<&'static str> {
        SlotFact {
            key,
            rank,
            delivered,
            starts: delivered,
        }
    }

    fn starting(key: &'static str, rank: u32) -> SlotFact<&'static str> {
        SlotFact {
            key,
            rank,
            delivered: false,
            starts: true,
        }
    }

    #[test]
    fn a_source_that_starts_the_slot_takes_it_only_when_none_delivered_the_last_one() {
        let mut s = Selector::default();
        // A publisher joined during the last slot and reaches the boundary: live at once.
        assert_eq!(s.decide(&[starting("new", 2)]), Some("new"));
        // It did not deliver a whole slot yet, so a better source that did still goes first...
        let mut s = Selector::default();
        assert_eq!(s.decide(&[starting("a", 0), fact("b", 1, true)]), Some("b"));
        // ...and an active source that delivered keeps its slot against a starting one.
        assert_eq!(s.decide(&[starting("a", 0), fact("b", 1, true)]), Some("b"));
        // Among starting sources only, the best rank.
        let mut s = Selector::default();
        assert_eq!(s.decide(&[starting("b", 1), starting("a", 0)]), Some("a"));
        // Nothing reaches the boundary: slate.
        let mut s = Selector::default();
        assert_eq!(s.decide(&[fact("a", 0, false)]), None);
    }

    #[test]
    fn starts_needs_media_from_before_the_boundary_up_to_it() {
        let clock = SlotClock::new(2);
        let k = 882_000_000u64;
        let start = clock.slot_start_ms(k);
        let mut c = Coverage::default();
        // Joined 1.2 s into slot k-1, sending up to 300 ms into slot k.
        for t in (start - 800..start + 300).step_by(40) {
            c.observe(t);
        }
        assert!(c.starts(clock, k));
        assert!(!c.covers(clock, k - 1));
        // Joined after the boundary: it starts only the next slot.
        let mut late = Coverage::default();
        for t in (start + 400..start + 700).step_by(40) {
            late.observe(t);
        }
        assert!(!late.starts(clock, k));
        // Not yet at the boundary.
        let mut early = Coverage::default();
        for t in (start - 800..start - 200).step_by(40) {
            early.observe(t);
        }
        assert!(!early.starts(clock, k));
    }

    #[test]
    fn fails_over_at_once_and_returns_after_a_stable_run() {
        let mut s = Selector::default();
        // Nothing delivered yet: slate.
        assert_eq!(s.decide(&[fact("a", 0, false), fact("b", 1, false)]), None);
        // Both deliver: the primary.
        assert_eq!(
            s.decide(&[fact("a", 0, true), fact("b", 1, true)]),
            Some("a")
        );
        // The primary misses one slot: the backup takes the next one.
        assert_eq!(
            s.decide(&[fact("a", 0, false), fact("b", 1, true)]),
            Some("b")
        );
        // The primary is back: the backup keeps it until the primary delivered 3 whole slots.
        assert_eq!(
            s.decide(&[fact("a", 0, true), fact("b", 1, true)]),
            Some("b")
        );
        assert_eq!(
            s.decide(&[fact("a", 0, true), fact("b", 1, true)]),
            Some("b")
        );
        // A flap resets the count.
        assert_eq!(
            s.decide(&[fact("a", 0, false), fact("b", 1, true)]),
            Some("b")
        );
        for _ in 0..RETURN_AFTER_SLOTS - 1 {
            assert_eq!(
                s.decide(&[fact("a", 0, true), fact("b", 1, true)]),
                Some("b")
            );
        }
        assert_eq!(s.streak(&"a"), RETURN_AFTER_SLOTS - 1);
        assert_eq!(
            s.decide(&[fact("a", 0, true), fact("b", 1, true)]),
            Some("a")
        );
        // Both gone (b's connection closed: no fact at all): slate.
        assert_eq!(s.decide(&[fact("a", 0, false)]), None);
        // The backup alone comes back: taken after one whole slot.
        assert_eq!(s.decide(&[fact("b", 1, true)]), Some("b"));
    }

    #[test]
    fn a_silent_active_source_hands_its_slot_to_one_that_delivered() {
        let mut s = Selector::default();
        assert_eq!(
            s.decide(&[fact("a", 0, true), fact("b", 1, true)]),
            Some("a")
        );
        // `a` hung right after delivering: the slot decided for it goes to `b`...
        assert_eq!(
            s.replace_active(&[fact("a", 0, true), fact("b", 1, true)]),
            Some("b")
        );
        assert_eq!(s.active(), Some(&"b"));
        assert_eq!(s.streak(&"a"), 0);
        // ...which keeps it while `a` has not delivered whole slots again.
        assert_eq!(
            s.decide(&[fact("a", 0, false), fact("b", 1, true)]),
            Some("b")
        );
        // No other source to take it: nothing changes (the silent one may still catch up).
        let mut s = Selector::default();
        assert_eq!(s.decide(&[fact("a", 0, true)]), Some("a"));
        assert_eq!(s.replace_active(&[fact("a", 0, true)]), None);
        assert_eq!(
            s.replace_active(&[fact("a", 0, true), fact("b", 1, false)]),
            None
        );
        assert_eq!(s.active(), Some(&"a"));
        // Only a source that starts the slot: it takes it.
        assert_eq!(
            s.replace_active(&[fact("a", 0, true), starting("c", 2)]),
            Some("c")
        );
        // Nothing active: nothing to replace.
        let mut s: Selector<&str> = Selector::default();
        assert_eq!(s.replace_active(&[fact("b", 1, true)]), None);
    }

    #[test]
    fn two_ingests_with_the_same_facts_choose_alike() {
        // Same facts, offered in a different order (different connection order per ingest).
        let slots = [
            vec![fact("a", 0, true), fact("c", 0, true), fact("b", 1, true)],
            vec![fact("a", 0, false), fact("c", 0, true), fact("b", 1, true)],
            vec![fact("a", 0, true), fact("c", 0, false), fact("b", 1, true)],
            vec![fact("a", 0, true), fact("c", 0, false), fact("b", 1, false)],
        ];
        let (mut one, mut two) = (Selector::default(), Selector::default());
        let mut chosen = Vec::new();
        for facts in &slots {
            let mut reversed = facts.clone();
            reversed.reverse();
            let x = one.decide(facts);
            assert_eq!(x, two.decide(&reversed));
            chosen.push(x);
        }
        assert_eq!(chosen, [Some("a"), Some("c"), Some("a"), Some("a")]);
    }
}
