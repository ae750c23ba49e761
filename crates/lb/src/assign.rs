//! Choosing a broadcast for a viewer: pure, so the rule is tested without sockets.
//!
//! A viewer with a valid token goes back to the broadcast it names while that one stays
//! eligible (its player's buffer and the broadcast's viewer count stay where they are); anyone
//! else goes to an eligible broadcast drawn at random in proportion to its free viewer slots.
//!
//! In proportion, not "the most free slots": with one big broadcast (10 Gbit/s among 1 Gbit/s
//! ones) the most-free rule sends nearly every viewer there, and its failure then moves nearly
//! the whole audience at once onto hosts with a tenth of the room. Drawn in proportion, each
//! broadcast holds a share of the audience that matches its room, a failure moves that share
//! only, and the draw needs no state shared between the LBs.

/// What the LB knows about one broadcast at the moment of choosing.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Candidate {
    pub name: String,
    pub base_url: String,
    /// Fresh poll, live, not draining, room for one more viewer.
    pub eligible: bool,
    /// Free viewer slots as last reported minus what we assigned recently (at most half of them:
    /// see the health module).
    pub free_viewers: u64,
    /// Why it is not eligible (empty when it is), for `/status` and logs.
    pub reason: String,
    /// The channels live there; `None` from a broadcast too old to say (then every channel
    /// counts as live while it is).
    pub live_channels: Option<Vec<String>>,
}

impl Candidate {
    /// Whether `channel` is live on it.
    pub fn plays(&self, channel: &str) -> bool {
        self.live_channels
            .as_ref()
            .is_none_or(|live| live.iter().any(|c| c == channel))
    }
}

/// The candidates for a viewer of `channel`: a broadcast that is eligible but does not have
/// this channel live (its ingest pull for it failing, say) is not eligible for its viewers.
pub fn for_channel(candidates: Vec<Candidate>, channel: &str) -> Vec<Candidate> {
    candidates
        .into_iter()
        .map(|mut c| {
            if c.eligible && !c.plays(channel) {
                c.eligible = false;
                c.reason = format!("{channel} not live");
            }
            c
        })
        .collect()
}

/// Picks a broadcast: the sticky one if eligible and not excluded, else one of the eligible
/// ones drawn with a probability proportional to its free viewers.
pub fn choose<'a>(
    candidates: &'a [Candidate],
    sticky: Option<&str>,
    exclude: &[String],
    rng: &mut impl rand::Rng,
) -> Option<&'a Candidate> {
    let allowed = |c: &&Candidate| c.eligible && !exclude.iter().any(|e| e == &c.name);
    if let Some(name) = sticky
        && let Some(c) = candidates.iter().filter(allowed).find(|c| c.name == name)
    {
        return Some(c);
    }
    let allowed: Vec<&Candidate> = candidates.iter().filter(allowed).collect();
    draw_by_free_viewers(&allowed, rng).map(|i| allowed[i])
}

/// An index into `candidates`, each drawn with probability `free_viewers / total`. An eligible
/// broadcast always weighs at least 1, so one reported full a moment ago can still be drawn
/// (its eligibility already says whether it has room).
pub fn draw_by_free_viewers(candidates: &[&Candidate], rng: &mut impl rand::Rng) -> Option<usize> {
    let weight = |c: &Candidate| c.free_viewers.max(1);
    let total: u64 = candidates.iter().map(|c| weight(c)).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.random_range(0..total);
    candidates.iter().position(|c| {
        let w = weight(c);
        if ticket < w {
            true
        } else {
            ticket -= w;
            false
        }
    })
}

/// The `exclude` query value: comma-separated broadcast names, bounded.
pub fn parse_exclude(value: Option<&str>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| streaming_core::config::is_safe_name(s))
        .take(64)
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use rand::SeedableRng;

    use super::*;

    /// A candidate named `name` at `https://<name>`; also used by the routes' tests.
    pub(crate) fn c(name: &str, eligible: bool, free: u64) -> Candidate {
        Candidate {
            name: name.into(),
            base_url: format!("https://{name}"),
            eligible,
            free_viewers: free,
            reason: String::new(),
            live_channels: None,
        }
    }

    #[test]
    fn viewers_of_a_channel_go_only_where_it_is_live() {
        let mut both = c("broadcast1", true, 10);
        both.live_channels = Some(vec!["main".into(), "side".into()]);
        let mut main_only = c("broadcast2", true, 1000);
        main_only.live_channels = Some(vec!["main".into()]);
        let older = c("broadcast3", true, 10);
        let side = for_channel(vec![both, main_only, older], "side");
        let eligible: Vec<&str> = side
            .iter()
            .filter(|c| c.eligible)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(eligible, ["broadcast1", "broadcast3"]);
        assert_eq!(side[1].reason, "side not live");
        assert_eq!(pick(&side[1..2], Some("broadcast2"), &[]), None);
    }

    fn pick(cands: &[Candidate], sticky: Option<&str>, exclude: &[&str]) -> Option<String> {
        let exclude: Vec<String> = exclude.iter().map(|s| s.to_string()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        choose(cands, sticky, &exclude, &mut rng).map(|c| c.name.clone())
    }

    /// How many of `draws` new viewers each candidate gets.
    fn shares(cands: &[Candidate], draws: usize) -> BTreeMap<String, usize> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut got = BTreeMap::new();
        for _ in 0..draws {
            let c = choose(cands, None, &[], &mut rng).unwrap();
            *got.entry(c.name.clone()).or_default() += 1;
        }
        got
    }

    #[test]
    fn new_viewers_spread_in_proportion_to_free_capacity() {
        // The default list: three 1 Gbit/s broadcasts and one 10 Gbit/s one.
        let cands = [
            c("broadcast1", true, 100),
            c("broadcast2", true, 100),
            c("broadcast3", true, 1000),
            c("broadcast4", true, 100),
        ];
        let got = shares(&cands, 13_000);
        // Expected 1,000 / 10,000 / 1,000 / 1,000: within 10 %.
        for (name, expected) in [
            ("broadcast1", 1000),
            ("broadcast2", 1000),
            ("broadcast3", 10000),
            ("broadcast4", 1000),
        ] {
            let n = got[name];
            assert!(
                n.abs_diff(expected) * 10 <= expected,
                "{name}: {n} of 13000, expected about {expected} ({got:?})"
            );
        }
    }

    #[test]
    fn ineligible_and_excluded_broadcasts_get_nobody() {
        let cands = [
            c("broadcast1", false, 1000),
            c("broadcast2", true, 10),
            c("broadcast3", true, 0),
        ];
        let got = shares(&cands, 1000);
        assert!(!got.contains_key("broadcast1"), "{got:?}");
        // Eligible but reported full a moment ago: weight 1 against 10.
        assert!(got["broadcast3"] < 200, "{got:?}");
        assert_eq!(
            pick(&cands, None, &["broadcast2", "broadcast3"]).as_deref(),
            None
        );
    }

    #[test]
    fn sticky_wins_while_eligible() {
        let cands = [c("broadcast1", true, 1), c("broadcast2", true, 500)];
        assert_eq!(
            pick(&cands, Some("broadcast1"), &[]).as_deref(),
            Some("broadcast1")
        );
        // Sticky but excluded (the player lost it): another one.
        assert_eq!(
            pick(&cands, Some("broadcast1"), &["broadcast1"]).as_deref(),
            Some("broadcast2")
        );
        // Sticky but no longer eligible (dead, draining or full): another one.
        let cands = [c("broadcast1", false, 0), c("broadcast2", true, 500)];
        assert_eq!(
            pick(&cands, Some("broadcast1"), &[]).as_deref(),
            Some("broadcast2")
        );
        // Sticky naming an unknown broadcast (removed from the cluster).
        assert_eq!(
            pick(&cands, Some("broadcast9"), &[]).as_deref(),
            Some("broadcast2")
        );
    }

    #[test]
    fn nothing_eligible_means_none() {
        let cands = [c("broadcast1", false, 100), c("broadcast2", true, 5)];
        assert_eq!(pick(&cands, None, &["broadcast2"]), None);
        assert_eq!(pick(&[], None, &[]), None);
    }

    #[test]
    fn exclude_list_is_sanitised() {
        assert_eq!(
            parse_exclude(Some("broadcast1, broadcast2,,../x,B3")),
            ["broadcast1", "broadcast2"]
        );
        assert!(parse_exclude(None).is_empty());
        assert_eq!(parse_exclude(Some(&"b,".repeat(1000))).len(), 64);
    }
}
