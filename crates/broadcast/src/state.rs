//! The broadcast's shared state: current config and secrets (swapped on SIGHUP), the segment
//! windows per channel and rendition, and the viewer/egress accounting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use streaming_core::config::{HostConfig, Rendition};
use streaming_core::news::News;
use streaming_core::status::{BroadcastStatus, free_viewers, viewer_capacity};
use streaming_core::token::TokenSigner;
use streaming_hls::RenditionMedia;

use crate::viewers::{EgressMeter, ViewerTracker};

/// The poison-tolerant lock helpers every module of the edge takes from here.
pub(crate) use streaming_core::sync::{lock, read, write};

/// One rendition's pulled media.
#[derive(Debug)]
pub struct RenditionState {
    pub name: String,
    pub media: RwLock<RenditionMedia>,
    /// PART-TARGET as the origin announces it: our low-latency playlists repeat it (`None`
    /// until an origin announced parts: then our playlists are classic).
    pub part_target_s: Mutex<Option<f64>>,
    /// When the newest segment arrived (liveness and staleness are judged on our own clock, so
    /// a skewed origin clock cannot make us look live or dead).
    pub last_new: Mutex<Option<Instant>>,
}

impl RenditionState {
    pub fn new(name: &str, capacity: usize) -> Self {
        Self {
            name: name.to_owned(),
            media: RwLock::new(RenditionMedia::new(capacity)),
            part_target_s: Mutex::new(None),
            last_new: Mutex::new(None),
        }
    }

    pub fn newest_age(&self, now: Instant) -> Option<Duration> {
        lock(&self.last_new).map(|t| now.saturating_duration_since(t))
    }
}

/// One channel: its renditions and the ingest it is currently pulled from.
#[derive(Debug, Default)]
pub struct ChannelState {
    pub renditions: RwLock<BTreeMap<String, Arc<RenditionState>>>,
    pub origin: Mutex<Option<String>>,
    /// Announced whenever a segment or part arrives: blocking playlist and part requests wait
    /// on it.
    pub published: News,
}

impl ChannelState {
    pub fn rendition(&self, name: &str) -> Option<Arc<RenditionState>> {
        read(&self.renditions).get(name).cloned()
    }

    /// Age of the freshest segment over all renditions.
    pub fn newest_age(&self, now: Instant) -> Option<Duration> {
        read(&self.renditions)
            .values()
            .filter_map(|r| r.newest_age(now))
            .min()
    }
}

/// Everything the pullers and the HTTP handlers share.
pub struct Broadcast {
    pub name: String,
    config: RwLock<Arc<HostConfig>>,
    signer: RwLock<TokenSigner>,
    cluster_key: RwLock<String>,
    client: RwLock<reqwest::Client>,
    pub channels: RwLock<BTreeMap<String, Arc<ChannelState>>>,
    pub viewers: Mutex<ViewerTracker>,
    /// Every body handed to viewers, playlists included.
    pub egress: Mutex<EgressMeter>,
    /// Segment bodies only: what capacity is planned on. Playlist floods are the rate limits'
    /// business; counting them here would let a few hundred small requests a second shrink the
    /// capacity the LBs see, which is the attack this accounting exists to stop.
    pub segment_egress: Mutex<EgressMeter>,
}

impl Broadcast {
    pub fn new(
        config: HostConfig,
        signer: TokenSigner,
        cluster_key: String,
        client: reqwest::Client,
    ) -> Self {
        let window = viewer_window(&config);
        let cap = tracked_viewers_cap(&config);
        let start = Instant::now();
        Self {
            name: config.name.clone(),
            config: RwLock::new(Arc::new(config)),
            signer: RwLock::new(signer),
            cluster_key: RwLock::new(cluster_key),
            client: RwLock::new(client),
            channels: RwLock::new(BTreeMap::new()),
            viewers: Mutex::new(ViewerTracker::new(window, cap)),
            egress: Mutex::new(EgressMeter::new(start)),
            segment_egress: Mutex::new(EgressMeter::new(start)),
        }
    }

    pub fn config(&self) -> Arc<HostConfig> {
        read(&self.config).clone()
    }

    pub fn signer(&self) -> TokenSigner {
        read(&self.signer).clone()
    }

    pub fn cluster_key(&self) -> String {
        read(&self.cluster_key).clone()
    }

    pub fn client(&self) -> reqwest::Client {
        read(&self.client).clone()
    }

    /// Swaps in a reloaded config and secrets (SIGHUP).
    pub fn replace(
        &self,
        config: HostConfig,
        signer: TokenSigner,
        cluster_key: String,
        client: reqwest::Client,
    ) {
        lock(&self.viewers).set_limits(viewer_window(&config), tracked_viewers_cap(&config));
        *write(&self.config) = Arc::new(config);
        *write(&self.signer) = signer;
        *write(&self.cluster_key) = cluster_key;
        *write(&self.client) = client;
    }

    pub fn channel(&self, name: &str) -> Option<Arc<ChannelState>> {
        read(&self.channels).get(name).cloned()
    }

    pub fn segment_duration(&self) -> Duration {
        Duration::from_secs(u64::from(
            self.config().cluster.timeline.segment_seconds.max(1),
        ))
    }

    /// Counts a playlist body of `channel` towards egress (Prometheus counter and the /status
    /// rate).
    pub fn count_egress(&self, channel: &str, bytes: usize) {
        metrics::counter!("broadcast_egress_bytes_total", "channel" => channel.to_owned())
            .increment(bytes as u64);
        lock(&self.egress).add(bytes as u64, Instant::now());
    }

    /// Counts part of a segment body of `channel` as it is handed to the connection.
    pub fn count_segment_egress(&self, channel: &str, bytes: usize) {
        self.count_egress(channel, bytes);
        lock(&self.segment_egress).add(bytes as u64, Instant::now());
    }

    /// Notes that `viewer` was handed a whole segment of `channel`: this, not a token, makes a
    /// viewer.
    pub fn segment_fetched(&self, channel: &str, viewer: &str) {
        if !lock(&self.viewers).fetched_segment(channel, viewer, Instant::now()) {
            metrics::counter!("broadcast_viewers_untracked_total").increment(1);
        }
    }

    /// Whether a report of `viewer`'s player counts now (see `crate::player`).
    pub fn player_report_counts(&self, channel: &str, viewer: &str) -> bool {
        lock(&self.viewers).report_counts(channel, viewer, Instant::now())
    }

    /// Prunes stale viewers and returns the current count per channel (also published as
    /// gauges, every configured channel included so a channel that lost its viewers reads 0).
    pub fn viewer_count(&self) -> BTreeMap<String, u64> {
        self.viewer_count_at(Instant::now())
    }

    fn viewer_count_at(&self, now: Instant) -> BTreeMap<String, u64> {
        let counts = lock(&self.viewers).prune(now);
        for channel in &self.config().cluster.channels {
            let n = counts.get(&channel.name).copied().unwrap_or(0);
            metrics::gauge!("broadcast_viewers", "channel" => channel.name.clone()).set(n as f64);
        }
        counts
    }

    /// True when at least one channel has a segment younger than 3·D.
    pub fn live_channels(&self) -> Vec<String> {
        let limit = 3 * self.segment_duration();
        let now = Instant::now();
        read(&self.channels)
            .iter()
            .filter(|(_, c)| c.newest_age(now).is_some_and(|age| age < limit))
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn status(&self) -> BroadcastStatus {
        self.status_at(Instant::now())
    }

    /// The status as of `now` (tests look past the current, partial second of egress).
    pub(crate) fn status_at(&self, now: Instant) -> BroadcastStatus {
        let config = self.config();
        let me = config.me();
        let uplink = me.uplink_mbps.unwrap_or(0);
        let top = config.cluster.costliest_top_bandwidth_bps();
        let channel_viewers = self.viewer_count_at(now);
        // Each viewer may switch up to its own channel's top rendition.
        let committed_bps: u64 = channel_viewers
            .iter()
            .map(|(name, n)| {
                let channel_top = config.cluster.channel(name).map(|c| c.top_bandwidth_bps());
                n.saturating_mul(channel_top.unwrap_or(top))
            })
            .sum();
        let live_channels = self.live_channels();
        let origins = read(&self.channels)
            .iter()
            .filter_map(|(name, c)| lock(&c.origin).clone().map(|o| (name.clone(), o)))
            .collect();
        let segment_egress_mbps = lock(&self.segment_egress).mbps(now);
        BroadcastStatus {
            name: self.name.clone(),
            viewers: channel_viewers.values().sum(),
            egress_mbps: lock(&self.egress).mbps(now),
            segment_egress_mbps,
            uplink_mbps: uplink,
            free_viewers: free_viewers(uplink, top, committed_bps, segment_egress_mbps),
            channel_viewers,
            live: !live_channels.is_empty(),
            live_channels,
            draining: me.drain,
            origins,
        }
    }

    /// Browser origins allowed to call us (CORS) and to be called by our page (CSP connect-src):
    /// every cluster host URL and every site URL.
    pub fn allowed_origins(&self) -> Vec<String> {
        streaming_core::http::cluster_origins(&self.config())
    }
}

/// 2·D, the window in which a playing viewer must have downloaded a segment.
fn viewer_window(config: &HostConfig) -> Duration {
    Duration::from_secs(2 * u64::from(config.cluster.timeline.segment_seconds.max(1)))
}

/// Fewest viewer ids tracked at once, whatever the uplink.
const MIN_TRACKED_VIEWERS: u64 = 4096;

/// How many viewer ids we track at once: twice as many viewers as the uplink could serve on the
/// smallest rendition, so every real viewer fits and a flood of fresh ids has a fixed ceiling
/// (about 100 bytes each).
fn tracked_viewers_cap(config: &HostConfig) -> usize {
    let smallest = config
        .cluster
        .channels
        .iter()
        .flat_map(|c| {
            c.ladder
                .iter()
                .map(Rendition::bandwidth_bps_with(c.audio_kbps))
        })
        .min()
        .unwrap_or(0);
    let uplink = config.me().uplink_mbps.unwrap_or(0);
    let cap = viewer_capacity(uplink, smallest)
        .saturating_mul(2)
        .max(MIN_TRACKED_VIEWERS);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A two-broadcast, one-ingest-pair cluster as the generator would emit it.
    pub fn config() -> HostConfig {
        use serde_json::json;
        use streaming_core::fixture::{host, host_config};
        let broadcast = |name: &str, addr: &str, uplink: u32, preferred: &str| {
            let mut h = host(name, "broadcast", addr);
            h["uplink_mbps"] = uplink.into();
            h["preferred_ingest"] = preferred.into();
            h
        };
        let hosts = vec![
            host("lb1", "lb", "127.79.1.1"),
            host("lb2", "lb", "127.79.1.2"),
            broadcast("broadcast1", "127.79.2.1", 100, "ingest2"),
            broadcast("broadcast2", "127.79.2.2", 1000, "ingest1"),
            host("ingest1", "ingest", "127.79.4.1"),
            host("ingest2", "ingest", "127.79.4.2"),
        ];
        let mut json = host_config("broadcast1", hosts);
        json["cluster"]["site_urls"] =
            json!(["https://127.79.1.1:8443", "https://127.79.1.2:8443"]);
        json["cluster"]["channels"][0]["ladder"] = json!([
            {"name": "360p", "width": 640, "height": 360, "video_kbps": 800},
            {"name": "144p", "width": 256, "height": 144, "video_kbps": 200}
        ]);
        json["paths"]["state_dir"] = "/nonexistent".into();
        let config: HostConfig = serde_json::from_value(json).expect("test config parses");
        config.validate().expect("test config is valid");
        config
    }
}
