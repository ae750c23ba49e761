//! What the LB knows about each broadcast: its last `/status`, polled about once a second.
//!
//! No LB state is replicated: each LB polls every broadcast itself. A viewer shows in a
//! broadcast's count only once it has downloaded a segment, a second or two after we sent it
//! there, so a burst of viewers could all land on the broadcast that looked emptiest. Our own
//! recent assignments are therefore subtracted from the free slots it reported, but they are
//! only a guess (anyone can ask for assignments and never watch): they age out after
//! [`PENDING_TTL`] and may take at most half of the reported room, so they spread a burst
//! without ever declaring a broadcast full. Only the broadcast's own measurement does that.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use streaming_core::capacity::BroadcastLoad;
use streaming_core::client::{BodyError, read_limited};
use streaming_core::config::{HostConfig, HostEntry, Role};
use streaming_core::status::{BroadcastStatus, viewer_capacity};

use crate::assign::Candidate;
use streaming_core::sync::{read, write};

/// How often every broadcast is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// A poll that takes longer counts as failed: a hung broadcast must look like a dead one.
/// Also bounds one poll round, so healthy broadcasts are re-polled at least this often.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(800);
/// A broadcast whose last good poll is older than this gets no new viewers. A host that dies or
/// hangs right after answering is excluded this long after its last answer (the target is
/// 2 s); a healthy one answers about twice within it, so one slow answer does not exclude it.
pub const MAX_POLL_AGE: Duration = Duration::from_millis(1500);
/// How long an assignment counts against a broadcast's free slots: long enough for a real
/// player to fetch its first segment and for the next poll to report it, short enough that a
/// burst of assignments nobody uses stops mattering within seconds.
pub const PENDING_TTL: Duration = Duration::from_secs(3);
/// Recent assignments are counted in buckets this wide (bounded memory, whatever the rate).
const PENDING_BUCKET: Duration = Duration::from_millis(250);
/// `/status` answers are a few hundred bytes.
const MAX_STATUS_BYTES: usize = 64 * 1024;

/// One broadcast as seen by this LB.
#[derive(Debug, Clone, Default)]
pub struct BroadcastHealth {
    pub status: Option<BroadcastStatus>,
    pub last_ok: Option<Instant>,
    pub last_error: Option<String>,
    /// Viewers this LB sent there within [`PENDING_TTL`].
    pub recent: RecentAssignments,
}

/// Assignments made within the last [`PENDING_TTL`], in a few time buckets.
#[derive(Debug, Clone, Default)]
pub struct RecentAssignments {
    /// (bucket start, assignments), oldest first; at most TTL / bucket + 1 entries.
    buckets: VecDeque<(Instant, u64)>,
}

impl RecentAssignments {
    pub fn note(&mut self, now: Instant) {
        self.expire(now);
        match self.buckets.back_mut() {
            Some((start, n)) if now.saturating_duration_since(*start) < PENDING_BUCKET => {
                *n = n.saturating_add(1);
            }
            _ => self.buckets.push_back((now, 1)),
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .buckets
            .front()
            .is_some_and(|(start, _)| now.saturating_duration_since(*start) >= PENDING_TTL)
        {
            self.buckets.pop_front();
        }
    }

    /// Assignments still within the TTL at `now`.
    pub fn count(&self, now: Instant) -> u64 {
        self.buckets
            .iter()
            .filter(|(start, _)| now.saturating_duration_since(*start) < PENDING_TTL)
            .fold(0, |sum, (_, n)| sum.saturating_add(*n))
    }
}

/// Shared poll results, by broadcast name.
#[derive(Debug, Default)]
pub struct Health {
    map: RwLock<BTreeMap<String, BroadcastHealth>>,
}

impl Health {
    pub fn snapshot(&self) -> BTreeMap<String, BroadcastHealth> {
        read(&self.map).clone()
    }

    /// Records a poll result.
    pub fn record(&self, name: &str, result: Result<BroadcastStatus, String>, now: Instant) {
        let mut map = write(&self.map);
        let entry = map.entry(name.to_owned()).or_default();
        match result {
            Ok(status) => {
                entry.status = Some(status);
                entry.last_ok = Some(now);
                // Recent assignments stay: this answer may predate their first segment.
                entry.last_error = None;
            }
            Err(e) => entry.last_error = Some(e),
        }
    }

    /// Counts an assignment against a broadcast's free slots for [`PENDING_TTL`].
    pub fn note_assignment(&self, name: &str, now: Instant) {
        let mut map = write(&self.map);
        map.entry(name.to_owned()).or_default().recent.note(now);
    }

    /// Forgets broadcasts that left the config.
    pub fn retain(&self, names: &[String]) {
        let mut map = write(&self.map);
        map.retain(|name, _| names.contains(name));
    }
}

/// Judges one broadcast; pure.
pub fn judge(host: &HostEntry, health: Option<&BroadcastHealth>, now: Instant) -> Candidate {
    let mut candidate = Candidate {
        name: host.name.clone(),
        base_url: host.url.trim_end_matches('/').to_owned(),
        eligible: false,
        free_viewers: 0,
        reason: String::new(),
        live_channels: None,
    };
    let fresh = health
        .and_then(|h| h.last_ok.map(|t| (h, t)))
        .filter(|(_, t)| now.saturating_duration_since(*t) < MAX_POLL_AGE);
    let reason = match (fresh, health.and_then(|h| h.status.as_ref())) {
        _ if host.drain => "draining (config)".to_owned(),
        (None, _) | (_, None) => match health.and_then(|h| h.last_error.clone()) {
            Some(e) => format!("no fresh status: {e}"),
            None => "no fresh status".to_owned(),
        },
        (Some((h, _)), Some(status)) => {
            let reported = status.free_viewers;
            if !status.live_channels.is_empty() {
                candidate.live_channels = Some(status.live_channels.clone());
            }
            candidate.free_viewers = reported - h.recent.count(now).min(reported / 2);
            if status.name != host.name {
                format!("answers as {:?}", status.name)
            } else if status.draining {
                "draining".to_owned()
            } else if !status.live {
                "not live".to_owned()
            } else if candidate.free_viewers == 0 {
                "full".to_owned()
            } else {
                String::new()
            }
        }
    };
    candidate.eligible = reason.is_empty();
    candidate.reason = reason;
    candidate
}

/// The configured broadcasts that answered within `MAX_POLL_AGE`, as counted for headroom:
/// their viewers, and the viewers of the costliest top rendition their uplink holds.
pub fn loads(
    config: &HostConfig,
    health: &BTreeMap<String, BroadcastHealth>,
    now: Instant,
) -> Vec<BroadcastLoad> {
    let top = config.cluster.costliest_top_bandwidth_bps();
    config
        .cluster
        .hosts_with_role(Role::Broadcast)
        .filter_map(|h| Some((h, health.get(&h.name)?)))
        .filter(|(_, b)| {
            b.last_ok
                .is_some_and(|t| now.saturating_duration_since(t) < MAX_POLL_AGE)
        })
        .filter_map(|(h, b)| Some((h, b.status.as_ref()?)))
        .map(|(h, s)| BroadcastLoad {
            name: h.name.clone(),
            capacity: viewer_capacity(s.uplink_mbps, top),
            viewers: s.viewers,
            serving: !(h.drain || s.draining),
        })
        .collect()
}

/// Every configured broadcast, judged.
pub fn candidates(
    config: &HostConfig,
    health: &BTreeMap<String, BroadcastHealth>,
    now: Instant,
) -> Vec<Candidate> {
    config
        .cluster
        .hosts_with_role(Role::Broadcast)
        .map(|h| judge(h, health.get(&h.name), now))
        .collect()
}

/// `GET <url>/status` within [`POLL_TIMEOUT`], at most [`MAX_STATUS_BYTES`], parsed as `T`:
/// the one way the LB asks a host how it is (broadcasts, and ingests for the publish front).
pub(crate) async fn fetch_status<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    let response = client
        .get(format!("{}/status", url.trim_end_matches('/')))
        .timeout(POLL_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body = read_limited(response, MAX_STATUS_BYTES)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge(_) => "status larger than 64 KiB".to_owned(),
            BodyError::Read(e) => format!("body: {e}"),
        })?;
    serde_json::from_slice(&body).map_err(|e| format!("bad status JSON: {e}"))
}

/// The poll clock shared by the broadcast and ingest pollers: one round per [`POLL_INTERVAL`],
/// a late round delaying the next rather than bunching them.
pub(crate) struct PollTicks(tokio::time::Interval);

impl PollTicks {
    pub(crate) fn new() -> Self {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self(tick)
    }

    /// Waits for the next round; false at shutdown.
    pub(crate) async fn next(&mut self, lifecycle: &streaming_core::lifecycle::Lifecycle) -> bool {
        tokio::select! {
            _ = lifecycle.shutdown() => false,
            _ = self.0.tick() => true,
        }
    }
}

/// The hosts of one role a poll round asks: (name, base URL) in config order.
pub(crate) struct PollTargets(Vec<(String, String)>);

impl PollTargets {
    pub(crate) fn of(config: &HostConfig, role: Role) -> Self {
        Self(
            config
                .cluster
                .hosts_with_role(role)
                .map(|h| (h.name.clone(), h.url.clone()))
                .collect(),
        )
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.0.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Asks every target's `/status` at once ([`fetch_status`]); answers come as they arrive.
    pub(crate) fn poll<T>(self, client: &reqwest::Client) -> PollAnswers<T>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        let mut polls = tokio::task::JoinSet::new();
        for (name, url) in self.0 {
            let client = client.clone();
            polls.spawn(async move { (name, fetch_status(&client, &url).await) });
        }
        PollAnswers(polls)
    }
}

/// The answers of one poll round, by host name.
pub(crate) struct PollAnswers<T>(tokio::task::JoinSet<(String, Result<T, String>)>);

impl<T: 'static> PollAnswers<T> {
    pub(crate) async fn next(&mut self) -> Option<(String, Result<T, String>)> {
        loop {
            match self.0.join_next().await? {
                Ok(answer) => return Some(answer),
                Err(_) => continue,
            }
        }
    }
}

/// Polls every broadcast of the current config, in parallel, once per [`POLL_INTERVAL`].
pub async fn poll_loop(
    health: Arc<Health>,
    config: impl Fn() -> (Arc<HostConfig>, reqwest::Client),
    lifecycle: streaming_core::lifecycle::Lifecycle,
) {
    let mut ticks = PollTicks::new();
    let mut was_eligible: BTreeMap<String, bool> = BTreeMap::new();
    while ticks.next(&lifecycle).await {
        let (config, client) = config();
        let targets = PollTargets::of(&config, Role::Broadcast);
        health.retain(&targets.names());
        let mut polls = targets.poll::<BroadcastStatus>(&client);
        while let Some((name, result)) = polls.next().await {
            let outcome = if result.is_ok() { "ok" } else { "failed" };
            metrics::counter!("lb_polls_total", "broadcast" => name.clone(), "result" => outcome)
                .increment(1);
            health.record(&name, result, Instant::now());
        }
        // Log eligibility changes once, not every second.
        let snapshot = health.snapshot();
        let now = Instant::now();
        for c in candidates(&config, &snapshot, now) {
            metrics::gauge!("lb_broadcast_eligible", "broadcast" => c.name.clone())
                .set(if c.eligible { 1.0 } else { 0.0 });
            metrics::gauge!("lb_broadcast_free_viewers", "broadcast" => c.name.clone())
                .set(c.free_viewers as f64);
            if was_eligible.insert(c.name.clone(), c.eligible) != Some(c.eligible) {
                if c.eligible {
                    tracing::info!(broadcast = %c.name, free = c.free_viewers, "broadcast eligible");
                } else {
                    tracing::warn!(broadcast = %c.name, reason = %c.reason, "broadcast not eligible");
                }
            }
        }
        was_eligible.retain(|name, _| snapshot.contains_key(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, drain: bool) -> HostEntry {
        let mut json = streaming_core::fixture::host(name, "broadcast", "127.79.2.1");
        json["uplink_mbps"] = 100.into();
        json["drain"] = drain.into();
        serde_json::from_value(json).unwrap()
    }

    fn status(name: &str, live: bool, draining: bool, free: u64) -> BroadcastStatus {
        BroadcastStatus {
            name: name.into(),
            viewers: 3,
            egress_mbps: 1.0,
            segment_egress_mbps: 1.0,
            uplink_mbps: 100,
            free_viewers: free,
            live,
            draining,
            channel_viewers: Default::default(),
            live_channels: Vec::new(),
            origins: Default::default(),
        }
    }

    fn polled(s: BroadcastStatus, at: Instant) -> BroadcastHealth {
        BroadcastHealth {
            status: Some(s),
            last_ok: Some(at),
            last_error: None,
            recent: RecentAssignments::default(),
        }
    }

    #[test]
    fn eligibility_rules() {
        let now = Instant::now();
        let h = host("broadcast1", false);
        let ok = judge(
            &h,
            Some(&polled(status("broadcast1", true, false, 10), now)),
            now,
        );
        assert!(ok.eligible, "{ok:?}");
        assert_eq!(ok.base_url, "https://127.79.2.1:8443");
        assert_eq!(ok.free_viewers, 10);
        let cases = [
            (judge(&h, None, now), "no fresh status"),
            (
                judge(
                    &h,
                    Some(&polled(status("broadcast1", true, false, 10), now)),
                    now + Duration::from_secs(3),
                ),
                "no fresh status",
            ),
            (
                judge(
                    &h,
                    Some(&polled(status("broadcast1", false, false, 10), now)),
                    now,
                ),
                "not live",
            ),
            (
                judge(
                    &h,
                    Some(&polled(status("broadcast1", true, true, 10), now)),
                    now,
                ),
                "draining",
            ),
            (
                judge(
                    &h,
                    Some(&polled(status("broadcast1", true, false, 0), now)),
                    now,
                ),
                "full",
            ),
            (
                judge(
                    &h,
                    Some(&polled(status("broadcast2", true, false, 9), now)),
                    now,
                ),
                "answers as",
            ),
            (
                judge(
                    &host("broadcast1", true),
                    Some(&polled(status("broadcast1", true, false, 9), now)),
                    now,
                ),
                "draining (config)",
            ),
        ];
        for (c, reason) in cases {
            assert!(
                !c.eligible && c.reason.contains(reason),
                "{c:?} vs {reason}"
            );
        }
    }

    #[test]
    fn a_hung_broadcast_is_excluded_within_two_seconds() {
        assert!(POLL_TIMEOUT < MAX_POLL_AGE && MAX_POLL_AGE <= Duration::from_secs(2));
        // Polls start at least every max(interval, timeout): a healthy one stays eligible.
        assert!(POLL_INTERVAL.max(POLL_TIMEOUT) * 3 / 2 < MAX_POLL_AGE);
        let health = Health::default();
        let t0 = Instant::now();
        let h = host("broadcast1", false);
        health.record("broadcast1", Ok(status("broadcast1", true, false, 9)), t0);
        // It hangs right after answering: every later poll times out.
        let mut t = t0;
        while t < t0 + Duration::from_secs(2) {
            t += POLL_TIMEOUT;
            health.record("broadcast1", Err("timed out".into()), t);
        }
        let judged = |at: Instant| judge(&h, health.snapshot().get("broadcast1"), at);
        assert!(judged(t0 + POLL_TIMEOUT).eligible);
        let late = judged(t0 + Duration::from_secs(2));
        assert!(
            !late.eligible && late.reason.contains("timed out"),
            "{late:?}"
        );
    }

    #[test]
    fn recent_assignments_spread_a_burst_but_never_mark_a_broadcast_full() {
        let health = Health::default();
        let now = Instant::now();
        let h = host("broadcast1", false);
        let judged = |at: Instant| judge(&h, health.snapshot().get("broadcast1"), at);
        health.record("broadcast1", Ok(status("broadcast1", true, false, 10)), now);
        health.note_assignment("broadcast1", now);
        health.note_assignment("broadcast1", now);
        assert_eq!((judged(now).eligible, judged(now).free_viewers), (true, 8));
        // A poll that does not show them yet (no segment downloaded) does not forget them.
        health.record("broadcast1", Ok(status("broadcast1", true, false, 10)), now);
        assert_eq!(judged(now).free_viewers, 8);
        // One address asking for a thousand assignments takes at most half the room...
        for _ in 0..1000 {
            health.note_assignment("broadcast1", now);
        }
        let c = judged(now);
        assert_eq!((c.eligible, c.free_viewers), (true, 5), "{c:?}");
        // ...and only for a few seconds.
        let later = now + PENDING_TTL;
        health.record(
            "broadcast1",
            Ok(status("broadcast1", true, false, 10)),
            later,
        );
        assert_eq!(judged(later).free_viewers, 10);
        assert_eq!(
            health.snapshot()["broadcast1"]
                .recent
                .count(later + PENDING_BUCKET),
            0
        );
        // Full is what the broadcast itself reports.
        health.record(
            "broadcast1",
            Ok(status("broadcast1", true, false, 0)),
            later,
        );
        assert_eq!(judged(later).reason, "full");
        // A failed poll keeps the last status until it ages out.
        health.record(
            "broadcast1",
            Ok(status("broadcast1", true, false, 5)),
            later,
        );
        health.record("broadcast1", Err("timeout".into()), later);
        assert!(judged(later).eligible);
        let late = judged(later + MAX_POLL_AGE);
        assert!(
            !late.eligible && late.reason.contains("timeout"),
            "{late:?}"
        );
    }

    #[test]
    fn recent_assignments_use_bounded_memory() {
        let mut recent = RecentAssignments::default();
        let t0 = Instant::now();
        // 100,000 assignments spread over a minute.
        for i in 0..100_000u64 {
            recent.note(t0 + Duration::from_micros(i * 600));
        }
        let end = t0 + Duration::from_secs(60);
        assert!(
            recent.buckets.len() as u128
                <= PENDING_TTL.as_millis() / PENDING_BUCKET.as_millis() + 1
        );
        // About 3 s worth of the 1,667 per second are still counted.
        let n = recent.count(end);
        assert!((4_500..=5_100).contains(&n), "{n}");
    }
}
