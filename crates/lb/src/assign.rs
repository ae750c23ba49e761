//! Choosing a broadcast for a viewer: pure, so the rule is tested without sockets.
//!
//! A viewer with a valid token goes back to the broadcast it names while that one stays
//! eligible (its player's buffer and the broadcast's viewer count stay where they are); anyone
//! else goes to the eligible broadcast with the most free viewer slots.

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
}

/// Picks a broadcast: the sticky one if eligible and not excluded, else the eligible one with
/// the most free viewers (ties by name, so every LB breaks them alike).
pub fn choose<'a>(
    candidates: &'a [Candidate],
    sticky: Option<&str>,
    exclude: &[String],
) -> Option<&'a Candidate> {
    let allowed = |c: &&Candidate| c.eligible && !exclude.iter().any(|e| e == &c.name);
    if let Some(name) = sticky
        && let Some(c) = candidates.iter().filter(allowed).find(|c| c.name == name)
    {
        return Some(c);
    }
    candidates.iter().filter(allowed).max_by(|a, b| {
        a.free_viewers
            .cmp(&b.free_viewers)
            .then_with(|| b.name.cmp(&a.name))
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
    use super::*;

    /// A candidate named `name` at `https://<name>`; also used by the routes' tests.
    pub(crate) fn c(name: &str, eligible: bool, free: u64) -> Candidate {
        Candidate {
            name: name.into(),
            base_url: format!("https://{name}"),
            eligible,
            free_viewers: free,
            reason: String::new(),
        }
    }

    fn pick(cands: &[Candidate], sticky: Option<&str>, exclude: &[&str]) -> Option<String> {
        let exclude: Vec<String> = exclude.iter().map(|s| s.to_string()).collect();
        choose(cands, sticky, &exclude).map(|c| c.name.clone())
    }

    #[test]
    fn most_free_capacity_wins() {
        let cands = [
            c("broadcast1", true, 10),
            c("broadcast2", true, 500),
            c("broadcast3", true, 40),
        ];
        assert_eq!(pick(&cands, None, &[]).as_deref(), Some("broadcast2"));
    }

    #[test]
    fn ties_go_to_the_first_name() {
        let cands = [c("broadcast2", true, 10), c("broadcast1", true, 10)];
        assert_eq!(pick(&cands, None, &[]).as_deref(), Some("broadcast1"));
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
