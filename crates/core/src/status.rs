//! What broadcasts and ingests report on `/status`, defined once for the servers that write it
//! and the LBs and `streamctl status` that read it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What an ingest reports on `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestStatus {
    pub name: String,
    /// Always `ingest`.
    pub role: String,
    pub channels: BTreeMap<String, IngestChannelStatus>,
}

impl IngestStatus {
    /// Outside publishers over all channels: where the LBs' publish front sends the next one.
    pub fn outside_publishers(&self) -> u64 {
        self.channels
            .values()
            .map(|c| c.outside_publishers as u64)
            .sum()
    }
}

/// One channel of an ingest, as operators and the LBs see it. Fields an older (or newer)
/// ingest does not send read as their default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IngestChannelStatus {
    pub active_source: Option<String>,
    pub live: bool,
    pub last_slot: Option<u64>,
    pub ffmpeg_restarts: u64,
    pub publishers_connected: usize,
    /// Outside publishers (OBS: not one of the channel's sources, not a peer's relay)
    /// connected to this ingest itself. The LBs send a new publisher where this is non-zero,
    /// and `streamctl status` shows where the channel's publisher is.
    pub outside_publishers: usize,
    pub segments_live: u64,
    pub segments_slate: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BroadcastStatus {
    pub name: String,
    /// Distinct viewers that downloaded a whole segment in the last 2·D. Holding a token or
    /// asking for playlists does not make one a viewer.
    pub viewers: u64,
    /// Everything sent to viewers (playlists and segments) per second over the last few
    /// seconds, in Mbit/s.
    pub egress_mbps: f64,
    /// The segment part of `egress_mbps`: what [`free_viewers`] is planned on. Absent from
    /// broadcasts older than this field (read as 0).
    #[serde(default)]
    pub segment_egress_mbps: f64,
    pub uplink_mbps: u32,
    /// How many more viewers of the top rendition fit under 80 % of the uplink: see
    /// [`free_viewers`].
    pub free_viewers: u64,
    /// Viewers per channel, adding up to `viewers`. Absent from older broadcasts.
    #[serde(default)]
    pub channel_viewers: BTreeMap<String, u64>,
    /// True when at least one channel has a fresh playlist.
    pub live: bool,
    /// The channels with a fresh playlist: the LBs send a channel's viewers only where it is
    /// live. Absent from older broadcasts (read as empty: then `live` stands for every channel).
    #[serde(default)]
    pub live_channels: Vec<String>,
    pub draining: bool,
    /// Ingest each channel is currently pulled from.
    pub origins: BTreeMap<String, String>,
}

/// Share of the uplink we allow to fill; the rest is headroom for playlists, TLS and TCP
/// overhead, and viewers switching up before the next measurement.
pub const UPLINK_FILL: f64 = 0.8;

/// How many viewers of the top rendition fit in an empty uplink: viewers × top rendition
/// bandwidth stays under 80 % of it.
pub fn viewer_capacity(uplink_mbps: u32, top_bandwidth_bps: u64) -> u64 {
    if top_bandwidth_bps == 0 {
        return 0;
    }
    ((f64::from(uplink_mbps) * 1e6 * UPLINK_FILL) / top_bandwidth_bps as f64).floor() as u64
}

/// Free viewer slots, the number the LBs balance on: the smaller of two estimates, both in
/// viewers of `top_bandwidth_bps` (the costliest channel's top rendition, which a new viewer
/// may pick).
///
/// - By measured egress: `floor((0.8 · uplink − segment egress) / top)`, where the segment
///   egress is what really left over the last few seconds. Someone holding a token who fetches
///   nothing (or only playlists) costs nothing here; a real viewer costs what its rendition
///   costs.
/// - By count: `floor((0.8 · uplink − committed) / top)`, where `committed_bps` is the sum over
///   the counted viewers of their own channel's top rendition, and only those who downloaded
///   a whole segment recently count. This bounds the first estimate from above because a
///   viewer on a small rendition may switch to its channel's top one at any time, and viewers
///   that just started (or paused) send less than they will. A viewer of a cheap channel
///   commits only that channel's top: a broadcast serving several channels holds the sum of
///   what each costs.
///
/// A broadcast that just started has no egress and no viewers, so both estimates are the plain
/// capacity: neither full nor unlimited. With no declared uplink or no ladder it is full.
pub fn free_viewers(
    uplink_mbps: u32,
    top_bandwidth_bps: u64,
    committed_bps: u64,
    segment_egress_mbps: f64,
) -> u64 {
    if top_bandwidth_bps == 0 {
        return 0;
    }
    let budget_bps = f64::from(uplink_mbps) * 1e6 * UPLINK_FILL;
    let room = |used_bps: f64| {
        // `max` also turns a NaN into 0; the cast saturates.
        ((budget_bps - used_bps).max(0.0) / top_bandwidth_bps as f64).floor() as u64
    };
    room(committed_bps as f64).min(room(segment_egress_mbps * 1e6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_rule() {
        // 100 Mbit/s, 5 Mbit/s top rendition: 80 Mbit/s usable, 16 viewers.
        assert_eq!(viewer_capacity(100, 5_000_000), 16);
        assert_eq!(viewer_capacity(100, 0), 0);
    }

    #[test]
    fn free_viewers_follow_measured_egress_and_never_exceed_the_count() {
        const TOP: u64 = 5_000_000;
        // Just started: nothing sent, nobody counted: the plain capacity.
        assert_eq!(free_viewers(100, TOP, 0, 0.0), 16);
        // 4 counted viewers on the top rendition sending 20 Mbit/s: 12 left by either estimate.
        assert_eq!(free_viewers(100, TOP, 4 * TOP, 20.0), 12);
        // 10 viewers on a 1 Mbit/s rendition (10 Mbit/s): egress leaves 14, but any of them may
        // switch to the top rendition, so the count bounds it to 6.
        assert_eq!(free_viewers(100, TOP, 10 * TOP, 10.0), 6);
        // The same 10 viewers watching a channel whose top is 1 Mbit/s commit only that: 14.
        assert_eq!(free_viewers(100, TOP, 10 * 1_000_000, 10.0), 14);
        // Uncounted downloaders (a flood of fresh ids beyond what is tracked) still cost their
        // egress: 60 Mbit/s leaves room for 4.
        assert_eq!(free_viewers(100, TOP, 0, 60.0), 4);
        // Over budget, by egress or by count: full, never wrapped around.
        assert_eq!(free_viewers(100, TOP, 0, 95.0), 0);
        assert_eq!(free_viewers(100, TOP, 40 * TOP, 0.0), 0);
        assert_eq!(free_viewers(100, 5_000_000, 0, f64::NAN), 0);
        assert_eq!(free_viewers(100, 0, 0, 0.0), 0);
        assert_eq!(free_viewers(0, 5_000_000, 0, 0.0), 0);
    }

    #[test]
    fn older_status_without_segment_egress_still_parses() {
        let json = serde_json::json!({
            "name": "broadcast1", "viewers": 3, "egress_mbps": 1.5, "uplink_mbps": 100,
            "free_viewers": 10, "live": true, "draining": false, "origins": {}
        });
        let s: BroadcastStatus = serde_json::from_value(json).unwrap();
        assert_eq!((s.viewers, s.segment_egress_mbps), (3, 0.0));
        assert!(s.live_channels.is_empty() && s.channel_viewers.is_empty());
    }

    #[test]
    fn ingest_status_sums_outside_publishers_and_tolerates_missing_fields() {
        let json = serde_json::json!({"name": "ingest1", "role": "ingest", "channels": {
            "a": {"outside_publishers": 1, "active_source": "plain"},
            "b": {"outside_publishers": 2},
            "c": {}
        }});
        let s: IngestStatus = serde_json::from_value(json).unwrap();
        assert_eq!(s.outside_publishers(), 3);
        assert_eq!(s.channels["a"].active_source.as_deref(), Some("plain"));
        assert!(serde_json::from_value::<IngestStatus>(serde_json::json!({"name": "x"})).is_err());
    }
}
