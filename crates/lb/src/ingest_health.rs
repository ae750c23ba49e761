//! What the LB knows about each ingest, for the RTMP front: whether it answered `/status`
//! lately, and how many outside publishers (OBS) it holds itself.
//!
//! Polled like the broadcasts (same interval, timeout and freshness), so a dead or hung ingest
//! gets no new publisher within [`MAX_POLL_AGE`] and a publisher forwarded to it is closed then
//! (it reconnects, as OBS does, and lands on a live one).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use streaming_core::config::{HostConfig, HostEntry, Role};
use streaming_core::status::IngestStatus;

use crate::health::{MAX_POLL_AGE, PollTargets, PollTicks};
use streaming_core::sync::{read, write};

/// One ingest as seen by this LB.
#[derive(Debug, Clone, Default)]
pub struct IngestHealth {
    pub last_ok: Option<Instant>,
    /// Outside publishers connected to it directly, summed over its channels.
    pub outside_publishers: u64,
    pub last_error: Option<String>,
}

impl IngestHealth {
    pub fn fresh(&self, now: Instant) -> bool {
        self.last_ok
            .is_some_and(|t| now.saturating_duration_since(t) < MAX_POLL_AGE)
    }
}

/// Shared poll results, by ingest name.
#[derive(Debug, Default)]
pub struct Ingests {
    map: RwLock<BTreeMap<String, IngestHealth>>,
}

impl Ingests {
    pub fn snapshot(&self) -> BTreeMap<String, IngestHealth> {
        read(&self.map).clone()
    }

    pub fn record(&self, name: &str, result: Result<u64, String>, now: Instant) {
        let mut map = write(&self.map);
        let entry = map.entry(name.to_owned()).or_default();
        match result {
            Ok(outside) => {
                entry.last_ok = Some(now);
                entry.outside_publishers = outside;
                entry.last_error = None;
            }
            Err(e) => entry.last_error = Some(e),
        }
    }

    fn retain(&self, names: &[String]) {
        let mut map = write(&self.map);
        map.retain(|name, _| names.contains(name));
    }

    /// True when `name` stopped answering while another ingest still answers: its forwarded
    /// publishers should go elsewhere. When no ingest answers the fault is more likely ours,
    /// and closing every publisher would not help.
    pub fn should_leave(&self, name: &str, now: Instant) -> bool {
        let map = read(&self.map);
        let stale = map.get(name).is_none_or(|h| !h.fresh(now));
        stale && map.iter().any(|(n, h)| n != name && h.fresh(now))
    }
}

/// The ingests to try for a new publisher, best first: those answering `/status`, the ones
/// already holding an outside publisher first (a channel's publishers meet on one ingest and a
/// reconnecting publisher goes back where its channel is), then config order, which every LB
/// shares, so both LBs pick alike. Ingests that did not answer lately come last, in case our
/// polls are what fails; drained ones never.
pub fn ranked(
    config: &HostConfig,
    health: &BTreeMap<String, IngestHealth>,
    now: Instant,
) -> Vec<HostEntry> {
    let mut hosts: Vec<(bool, bool, usize, &HostEntry)> = config
        .cluster
        .hosts_with_role(Role::Ingest)
        .filter(|h| !h.drain)
        .enumerate()
        .map(|(i, h)| {
            let seen = health.get(&h.name);
            let fresh = seen.is_some_and(|s| s.fresh(now));
            let holds = seen.is_some_and(|s| s.outside_publishers > 0);
            (!fresh, !(fresh && holds), i, h)
        })
        .collect();
    hosts.sort_by_key(|(stale, empty, i, _)| (*stale, *empty, *i));
    hosts.into_iter().map(|(_, _, _, h)| h.clone()).collect()
}

/// Polls every ingest of the current config, in parallel, once per [`crate::health::POLL_INTERVAL`].
pub async fn poll_loop(
    ingests: Arc<Ingests>,
    config: impl Fn() -> (Arc<HostConfig>, reqwest::Client),
    lifecycle: streaming_core::lifecycle::Lifecycle,
) {
    let mut ticks = PollTicks::new();
    let mut was_fresh: BTreeMap<String, bool> = BTreeMap::new();
    while ticks.next(&lifecycle).await {
        let (config, client) = config();
        let targets = PollTargets::of(&config, Role::Ingest);
        ingests.retain(&targets.names());
        let mut polls = targets.poll::<IngestStatus>(&client);
        while let Some((name, status)) = polls.next().await {
            let result = status.map(|s| s.outside_publishers());
            let outcome = if result.is_ok() { "ok" } else { "failed" };
            metrics::counter!("lb_ingest_polls_total", "ingest" => name.clone(), "result" => outcome)
                .increment(1);
            ingests.record(&name, result, Instant::now());
        }
        let now = Instant::now();
        for (name, h) in ingests.snapshot() {
            let fresh = h.fresh(now);
            metrics::gauge!("lb_ingest_eligible", "ingest" => name.clone()).set(if fresh {
                1.0
            } else {
                0.0
            });
            if was_fresh.insert(name.clone(), fresh) != Some(fresh) {
                if fresh {
                    tracing::info!(ingest = %name, "ingest answers: publishers may go there");
                } else {
                    let reason = h.last_error.as_deref().unwrap_or("no answer yet");
                    tracing::warn!(ingest = %name, reason, "ingest not answering: no new publishers there");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HostConfig {
        use streaming_core::fixture::{host, host_config};
        let mut hosts = vec![
            host("lb1", "lb", "127.85.4.1"),
            host("ingest1", "ingest", "127.85.4.11"),
            host("ingest2", "ingest", "127.85.4.12"),
            host("ingest3", "ingest", "127.85.4.13"),
        ];
        hosts[3]["drain"] = true.into();
        let mut json = host_config("lb1", hosts);
        json["cluster"]["site_urls"] = serde_json::json!(["https://127.85.1.1:8443"]);
        serde_json::from_value(json).unwrap()
    }

    fn names(hosts: &[HostEntry]) -> Vec<&str> {
        hosts.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn publishers_go_where_their_channel_is_and_never_to_a_silent_ingest_first() {
        let config = config();
        let ingests = Ingests::default();
        let now = Instant::now();
        // Nothing known yet: config order, drained ingest3 never.
        assert_eq!(
            names(&ranked(&config, &ingests.snapshot(), now)),
            ["ingest1", "ingest2"]
        );
        ingests.record("ingest1", Ok(0), now);
        ingests.record("ingest2", Ok(1), now);
        assert_eq!(
            names(&ranked(&config, &ingests.snapshot(), now)),
            ["ingest2", "ingest1"]
        );
        // ingest2 stops answering: last, and its publishers should leave it.
        let later = now + MAX_POLL_AGE;
        ingests.record("ingest1", Ok(0), later);
        ingests.record("ingest2", Err("timed out".into()), later);
        assert_eq!(
            names(&ranked(&config, &ingests.snapshot(), later)),
            ["ingest1", "ingest2"]
        );
        assert!(ingests.should_leave("ingest2", later));
        assert!(!ingests.should_leave("ingest1", later));
        // Nobody answers (our own network?): nobody is left.
        let much_later = later + MAX_POLL_AGE;
        assert!(!ingests.should_leave("ingest2", much_later));
        assert!(!ingests.should_leave("ingest1", much_later));
    }
}
