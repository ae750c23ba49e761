//! What a broadcast reports on `/status`, and what LBs and `streamctl status` read.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BroadcastStatus {
    pub name: String,
    /// Distinct viewer tokens seen in the last 2·D.
    pub viewers: u64,
    /// Bytes sent to viewers per second over the last few seconds, in Mbit/s.
    pub egress_mbps: f64,
    pub uplink_mbps: u32,
    /// How many more viewers of the top rendition fit under 80 % of the uplink.
    pub free_viewers: u64,
    /// True when at least one channel has a fresh playlist.
    pub live: bool,
    pub draining: bool,
    /// Ingest each channel is currently pulled from.
    pub origins: std::collections::BTreeMap<String, String>,
}

/// Share of the uplink we allow to fill (DESIGN.md section 8).
pub const UPLINK_FILL: f64 = 0.8;

/// The seed's capacity rule: viewers × top rendition bandwidth stays under 80 % of the uplink.
pub fn viewer_capacity(uplink_mbps: u32, top_bandwidth_bps: u64) -> u64 {
    if top_bandwidth_bps == 0 {
        return 0;
    }
    ((f64::from(uplink_mbps) * 1e6 * UPLINK_FILL) / top_bandwidth_bps as f64).floor() as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn capacity_rule() {
        // 100 Mbit/s, 5 Mbit/s top rendition: 80 Mbit/s usable, 16 viewers.
        assert_eq!(super::viewer_capacity(100, 5_000_000), 16);
        assert_eq!(super::viewer_capacity(100, 0), 0);
    }
}
