//! Which publisher of a channel feeds the transcoder: the best-ranked live one.
//!
//! Both sources publish to every ingest; ranks come from the cluster config (`sources_of`), so
//! every ingest picks the same one. A publisher is live once it sent its AVC sequence header and
//! while media keeps arriving (silence for more than [`STALE_AFTER`] demotes it).

use std::time::{Duration, Instant};

/// A publisher silent for longer than this is no longer a candidate.
pub const STALE_AFTER: Duration = Duration::from_secs(2);

/// Rank of a publisher: position of its `source` in the channel's source list, unknown or absent
/// sources after every configured one; ties go to the earlier connection.
pub fn rank_of(source: Option<&str>, ranked_sources: &[String]) -> u32 {
    source
        .and_then(|s| ranked_sources.iter().position(|r| r == s))
        .map_or(ranked_sources.len() as u32, |p| p as u32)
}

/// What selection needs to know about one publisher.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: u64,
    pub rank: u32,
    pub has_video_header: bool,
    pub last_media: Option<Instant>,
}

impl Candidate {
    pub fn is_live(&self, now: Instant) -> bool {
        self.has_video_header
            && self
                .last_media
                .is_some_and(|t| now.saturating_duration_since(t) <= STALE_AFTER)
    }
}

/// The best live candidate (lowest rank, then lowest connection id).
pub fn choose<'a>(
    candidates: impl IntoIterator<Item = &'a Candidate>,
    now: Instant,
) -> Option<u64> {
    candidates
        .into_iter()
        .filter(|c| c.is_live(now))
        .min_by_key(|c| (c.rank, c.id))
        .map(|c| c.id)
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
    fn best_live_wins_and_falls_back_and_returns() {
        let t0 = Instant::now();
        let mut a = Candidate {
            id: 1,
            rank: 0,
            has_video_header: true,
            last_media: Some(t0),
        };
        let b = Candidate {
            id: 2,
            rank: 1,
            has_video_header: true,
            last_media: Some(t0 + Duration::from_secs(3)),
        };
        // Both live: the better rank.
        assert_eq!(choose([&a, &b], t0 + Duration::from_millis(500)), Some(1));
        // a silent for > 2 s: fall back to b.
        assert_eq!(choose([&a, &b], t0 + Duration::from_millis(3500)), Some(2));
        // a sends again: back to a.
        a.last_media = Some(t0 + Duration::from_millis(3600));
        assert_eq!(choose([&a, &b], t0 + Duration::from_millis(3700)), Some(1));
        // Without a sequence header a publisher is not usable yet.
        a.has_video_header = false;
        assert_eq!(choose([&a, &b], t0 + Duration::from_millis(3700)), Some(2));
        assert_eq!(choose([], t0), None);
    }
}
