//! The arithmetic of a plan: what an audience costs and whether the host list holds it.
//!
//! The rules are the cluster's own, so that a plan that says "holds" is one the LBs would
//! really admit:
//! - A viewer is counted at the top rendition of the costliest channel: the LBs admit viewers
//!   on that basis (any viewer may switch up at any time), and a broadcast holds
//!   `floor(0.8 · uplink / that bandwidth)` of them ([`viewer_capacity`]).
//! - New viewers spread over the broadcasts in proportion to free capacity, so each one's
//!   share of the audience is its share of the capacity.
//! - Failover needs N-1: with the largest broadcast down, the others must hold everyone
//!   ([`headroom`]). Every ingest transcodes every channel (they are hot standbys of each
//!   other), so one ingest down leaves the same work on the other; every open page asks one
//!   LB for the viewer count every 5 s, so one LB down leaves all of those on the other.

use std::collections::BTreeMap;

use serde::Serialize;
use streaming_core::capacity::{BroadcastLoad, Headroom, headroom};
use streaming_core::config::{ClusterConfig, HostEntry, Role};
use streaming_core::status::{UPLINK_FILL, viewer_capacity};

use crate::figures::Figures;

/// How often an open page asks an LB for `/api/stats` (web/app.js).
pub const PAGE_STATS_INTERVAL_SECS: f64 = 5.0;

/// What to plan for.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Viewers per channel.
    pub viewers: BTreeMap<String, u64>,
    /// Bandwidth of one viewer instead of each channel's top rendition (the original README's
    /// "1, 2, 3.5 or 5 Mbps per viewer").
    pub bitrate_bps: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub viewers: u64,
    /// What one viewer is counted at: the costliest channel's top rendition or the override.
    pub per_viewer_bps: u64,
    pub egress_bps: u64,
    pub channels: Vec<ChannelPlan>,
    pub broadcasts: Vec<BroadcastPlan>,
    pub headroom: Headroom,
    /// For each uplink size in the list: broadcasts of that size alone that carry the
    /// audience, and with one of them down.
    pub broadcasts_needed: Vec<BroadcastsNeeded>,
    /// Broadcasts of the most common uplink to add so that the audience still fits with the
    /// largest one down (0 when it already does).
    pub broadcasts_to_add: Option<BroadcastsToAdd>,
    pub ingests: IngestPlan,
    pub lbs: LbPlan,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChannelPlan {
    pub name: String,
    pub viewers: u64,
    pub per_viewer_bps: u64,
    pub egress_bps: u64,
    pub preset: String,
    pub renditions: usize,
    /// Output pixels per second of the ladder, in millions.
    pub output_mpx_s: f64,
    /// Measured cost of transcoding it; `None` without a figure for its preset.
    pub ingest_cores: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BroadcastPlan {
    pub name: String,
    pub uplink_mbps: u32,
    pub capacity: u64,
    /// Its share of the audience under proportional assignment, at most its capacity (the
    /// LBs send no more).
    pub viewers: f64,
    pub egress_bps: f64,
    /// Cores its share needs, and cores it needs to fill 80 % of its uplink: the larger of the
    /// byte cost (serve figure) and the per-viewer cost (viewers figure), each if measured.
    pub cores_at_target: Option<f64>,
    pub cores_when_full: Option<f64>,
    pub cores_declared: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BroadcastsNeeded {
    pub uplink_mbps: u32,
    pub capacity_each: u64,
    pub count: u64,
    pub count_with_one_down: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BroadcastsToAdd {
    pub uplink_mbps: u32,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IngestPlan {
    pub hosts: Vec<String>,
    /// Cores each ingest needs for every channel; `None` if a preset has no figure.
    pub cores_each: Option<f64>,
    /// Ingests whose declared cores are fewer than that.
    pub short_of_cores: Vec<String>,
    /// At least two ingests: one down leaves a whole copy of the work on another.
    pub holds_with_one_down: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LbPlan {
    pub hosts: Vec<String>,
    /// Requests per second one LB takes when it is the only one left.
    pub requests_per_second: f64,
    pub cores_each: Option<f64>,
    pub short_of_cores: Vec<String>,
    pub holds_with_one_down: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("unknown channel {0} (cluster.nix declares {1})")]
    UnknownChannel(String, String),
    #[error("the cluster has no broadcast with an uplink")]
    NoBroadcast,
    #[error("a viewer must cost more than 0 bit/s")]
    FreeViewer,
}

/// The plan for `target` on `cluster`, with the measured costs in `figures`.
pub fn plan(
    cluster: &ClusterConfig,
    target: &Target,
    figures: &Figures,
) -> Result<Plan, PlanError> {
    let channels = target
        .viewers
        .iter()
        .map(|(name, &viewers)| channel_plan(cluster, name, viewers, target, figures))
        .collect::<Result<Vec<_>, _>>()?;
    let viewers: u64 = channels.iter().map(|c| c.viewers).sum();
    let egress_bps: u64 = channels.iter().map(|c| c.egress_bps).sum();
    // Room is counted in viewers of this audience's mix of channels: each viewer commits its
    // own channel's top rendition, as the broadcasts count it.
    let per_viewer_bps = match target.bitrate_bps {
        Some(bps) => bps,
        None if viewers > 0 => egress_bps.div_ceil(viewers),
        None => cluster.costliest_top_bandwidth_bps(),
    };
    if per_viewer_bps == 0 {
        return Err(PlanError::FreeViewer);
    }

    let hosts: Vec<&HostEntry> = cluster
        .hosts_with_role(Role::Broadcast)
        .filter(|h| h.uplink_mbps.unwrap_or(0) > 0)
        .collect();
    if hosts.is_empty() {
        return Err(PlanError::NoBroadcast);
    }
    let loads: Vec<BroadcastLoad> = hosts
        .iter()
        .map(|h| BroadcastLoad {
            name: h.name.clone(),
            capacity: viewer_capacity(h.uplink_mbps.unwrap_or(0), per_viewer_bps),
            viewers: 0,
            serving: !h.drain,
        })
        .collect();
    let mean_viewer_bps = if viewers == 0 {
        per_viewer_bps as f64
    } else {
        egress_bps as f64 / viewers as f64
    };
    let broadcasts = broadcast_plans(
        &hosts,
        &loads,
        viewers,
        mean_viewer_bps,
        per_viewer_bps,
        figures,
    );
    // The audience as if placed: headroom needs viewers somewhere, and where they sit does
    // not change the totals.
    let mut placed = loads.clone();
    if let Some(first) = placed.iter_mut().find(|l| l.serving) {
        first.viewers = viewers;
    }
    let headroom = headroom(&placed);
    let broadcasts_to_add = most_common_uplink(&hosts).map(|uplink| BroadcastsToAdd {
        uplink_mbps: uplink,
        count: to_add(&loads, viewers, viewer_capacity(uplink, per_viewer_bps)),
    });
    Ok(Plan {
        viewers,
        per_viewer_bps,
        egress_bps,
        broadcasts,
        headroom,
        broadcasts_needed: broadcasts_needed(&hosts, viewers, per_viewer_bps),
        broadcasts_to_add,
        ingests: ingest_plan(cluster, &channels),
        lbs: lb_plan(cluster, viewers, figures),
        channels,
    })
}

fn channel_plan(
    cluster: &ClusterConfig,
    name: &str,
    viewers: u64,
    target: &Target,
    figures: &Figures,
) -> Result<ChannelPlan, PlanError> {
    let channel = cluster.channel(name).ok_or_else(|| {
        let known: Vec<&str> = cluster.channels.iter().map(|c| c.name.as_str()).collect();
        PlanError::UnknownChannel(name.to_owned(), known.join(", "))
    })?;
    let per_viewer_bps = target.bitrate_bps.unwrap_or(channel.top_bandwidth_bps());
    let output_mpx_s: f64 = channel
        .ladder
        .iter()
        .map(|r| f64::from(r.width) * f64::from(r.height) * f64::from(channel.fps) / 1e6)
        .sum();
    let ingest_cores = figures
        .ingest_cores_per_output_mpx_s
        .get(&channel.preset)
        .map(|f| output_mpx_s * f.value);
    Ok(ChannelPlan {
        name: name.to_owned(),
        viewers,
        per_viewer_bps,
        egress_bps: viewers.saturating_mul(per_viewer_bps),
        preset: channel.preset.clone(),
        renditions: channel.ladder.len(),
        output_mpx_s,
        ingest_cores,
    })
}

/// Cores a broadcast needs for `viewers` sending `egress_bps`: the larger of the byte cost
/// and the per-viewer cost, each if measured.
fn broadcast_cores(figures: &Figures, viewers: f64, egress_bps: f64) -> Option<f64> {
    let by_bytes = figures
        .broadcast_serve_gbps_per_core
        .as_ref()
        .map(|f| egress_bps / 1e9 / f.value);
    let by_viewers = figures
        .broadcast_viewers_per_core
        .as_ref()
        .map(|f| viewers / f.value);
    match (by_bytes, by_viewers) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn broadcast_plans(
    hosts: &[&HostEntry],
    loads: &[BroadcastLoad],
    viewers: u64,
    mean_viewer_bps: f64,
    per_viewer_bps: u64,
    figures: &Figures,
) -> Vec<BroadcastPlan> {
    let total_capacity: u64 = loads.iter().filter(|l| l.serving).map(|l| l.capacity).sum();
    hosts
        .iter()
        .zip(loads)
        .map(|(h, l)| {
            let share = if l.serving && total_capacity > 0 {
                (viewers as f64 * l.capacity as f64 / total_capacity as f64).min(l.capacity as f64)
            } else {
                0.0
            };
            let uplink = h.uplink_mbps.unwrap_or(0);
            let full_bps = f64::from(uplink) * 1e6 * UPLINK_FILL;
            BroadcastPlan {
                name: h.name.clone(),
                uplink_mbps: uplink,
                capacity: l.capacity,
                viewers: share,
                egress_bps: share * mean_viewer_bps,
                cores_at_target: broadcast_cores(figures, share, share * mean_viewer_bps),
                cores_when_full: broadcast_cores(
                    figures,
                    full_bps / per_viewer_bps as f64,
                    full_bps,
                ),
                cores_declared: h.cores,
            }
        })
        .collect()
}

/// For each uplink size of the list: how many broadcasts of that size alone carry `viewers`.
fn broadcasts_needed(
    hosts: &[&HostEntry],
    viewers: u64,
    per_viewer_bps: u64,
) -> Vec<BroadcastsNeeded> {
    let mut uplinks: Vec<u32> = hosts.iter().filter_map(|h| h.uplink_mbps).collect();
    uplinks.sort_unstable();
    uplinks.dedup();
    uplinks
        .iter()
        .map(|&uplink| {
            let capacity_each = viewer_capacity(uplink, per_viewer_bps);
            let count = if capacity_each == 0 {
                u64::MAX
            } else {
                viewers.div_ceil(capacity_each).max(1)
            };
            BroadcastsNeeded {
                uplink_mbps: uplink,
                capacity_each,
                count,
                count_with_one_down: count.saturating_add(1),
            }
        })
        .collect()
}

fn ingest_plan(cluster: &ClusterConfig, channels: &[ChannelPlan]) -> IngestPlan {
    let hosts: Vec<&HostEntry> = cluster.hosts_with_role(Role::Ingest).collect();
    let cores: Option<f64> = channels.iter().map(|c| c.ingest_cores).sum();
    IngestPlan {
        hosts: hosts.iter().map(|h| h.name.clone()).collect(),
        cores_each: cores,
        short_of_cores: short_of(&hosts, cores),
        holds_with_one_down: hosts.len() >= 2,
    }
}

fn lb_plan(cluster: &ClusterConfig, viewers: u64, figures: &Figures) -> LbPlan {
    let hosts: Vec<&HostEntry> = cluster.hosts_with_role(Role::Lb).collect();
    let requests_per_second = viewers as f64 / PAGE_STATS_INTERVAL_SECS;
    let cores = figures
        .lb_requests_per_second_per_core
        .as_ref()
        .map(|f| requests_per_second / f.value);
    LbPlan {
        hosts: hosts.iter().map(|h| h.name.clone()).collect(),
        requests_per_second,
        cores_each: cores,
        short_of_cores: short_of(&hosts, cores),
        holds_with_one_down: hosts.len() >= 2,
    }
}

/// The uplink most broadcasts have (ties: the larger), the natural size of the next one.
fn most_common_uplink(hosts: &[&HostEntry]) -> Option<u32> {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for uplink in hosts.iter().filter_map(|h| h.uplink_mbps) {
        *counts.entry(uplink).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(uplink, n)| (n, uplink))
        .map(|(uplink, _)| uplink)
}

/// How many broadcasts of `capacity_each` to add so that `viewers` fit with the largest
/// (possibly a new one) down. Bounded: a viewer too big for any host gives up at a million.
fn to_add(loads: &[BroadcastLoad], viewers: u64, capacity_each: u64) -> u64 {
    let serving: Vec<u64> = loads
        .iter()
        .filter(|l| l.serving)
        .map(|l| l.capacity)
        .collect();
    let total: u64 = serving.iter().sum();
    let largest = serving.iter().copied().max().unwrap_or(0);
    (0..1_000_000u64)
        .find(|&k| {
            let largest = if k > 0 {
                largest.max(capacity_each)
            } else {
                largest
            };
            let hosts = serving.len() as u64 + k;
            hosts >= 2 && total + k * capacity_each - largest >= viewers
        })
        .unwrap_or(1_000_000)
}

/// The hosts whose declared cores are fewer than `needed`.
fn short_of(hosts: &[&HostEntry], needed: Option<f64>) -> Vec<String> {
    let Some(needed) = needed else {
        return Vec::new();
    };
    hosts
        .iter()
        .filter(|h| h.cores.is_some_and(|c| f64::from(c) < needed))
        .map(|h| h.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use streaming_core::config::HostConfig;

    use super::*;
    use crate::figures::Figure;

    /// The default list's broadcasts (1, 1, 10 and 0.1 Gbit/s), two ingests, two LBs, one
    /// channel with the production ladder.
    fn cluster() -> ClusterConfig {
        let host = |name: &str, role: &str, n: u8, uplink: Option<u32>| {
            let mut h = streaming_core::fixture::host(name, role, &format!("192.0.2.{n}"));
            h["uplink_mbps"] = uplink.into();
            h
        };
        let mut json = streaming_core::fixture::host_config(
            "lb1",
            vec![
                host("lb1", "lb", 11, None),
                host("lb2", "lb", 12, None),
                host("broadcast1", "broadcast", 21, Some(1000)),
                host("broadcast2", "broadcast", 22, Some(1000)),
                host("broadcast3", "broadcast", 23, Some(10000)),
                host("broadcast4", "broadcast", 24, Some(100)),
                host("ingest1", "ingest", 41, None),
                host("ingest2", "ingest", 42, None),
            ],
        );
        json["cluster"]["channels"][0]["preset"] = "veryfast".into();
        json["cluster"]["channels"][0]["ladder"] = serde_json::json!([
            {"name": "1080p", "width": 1920, "height": 1080, "video_kbps": 5000},
            {"name": "720p", "width": 1280, "height": 720, "video_kbps": 2800},
            {"name": "480p", "width": 854, "height": 480, "video_kbps": 1400},
            {"name": "360p", "width": 640, "height": 360, "video_kbps": 800},
        ]);
        serde_json::from_value::<HostConfig>(json).unwrap().cluster
    }

    fn figure(value: f64) -> Figure {
        Figure {
            value,
            command: "test".into(),
            measured: "2026-12-02".into(),
            note: String::new(),
        }
    }

    fn target(viewers: u64, mbps: Option<f64>) -> Target {
        Target {
            viewers: [("test".to_owned(), viewers)].into(),
            bitrate_bps: mbps.map(|m| (m * 1e6) as u64),
        }
    }

    #[test]
    fn the_original_readme_cases() {
        let c = cluster();
        let none = Figures::default();
        // 1,000 viewers at 1 Mbit/s: 1 Gbit/s. Usable: 0.8 × 12.1 Gbit/s = 9,680 viewers;
        // without broadcast3 (8,000) there are 1,680 left, still enough.
        let p = plan(&c, &target(1000, Some(1.0)), &none).unwrap();
        assert_eq!((p.egress_bps, p.headroom.capacity), (1_000_000_000, 9680));
        let w = p.headroom.without_largest.clone().unwrap();
        assert_eq!(
            (w.name.as_str(), w.capacity, w.holds),
            ("broadcast3", 1680, true)
        );
        assert_eq!(p.broadcasts_to_add.as_ref().unwrap().count, 0);
        // 5,000 at 5 Mbit/s: 25 Gbit/s against 9.68 usable: short, and far shorter with
        // broadcast3 down (336 viewers of room).
        let p = plan(&c, &target(5000, Some(5.0)), &none).unwrap();
        assert_eq!(p.egress_bps, 25_000_000_000);
        assert_eq!((p.headroom.capacity, p.headroom.free), (1936, 1936 - 5000));
        let w = p.headroom.without_largest.clone().unwrap();
        assert_eq!((w.capacity, w.free, w.holds), (336, 336 - 5000, false));
        // At 1 Gbit/s (the most common size: 160 viewers each) it takes 30 more to hold 5,000
        // with broadcast3 down: 336 + 30 × 160 = 5,136, and 29 leave 4,976.
        let add = p.broadcasts_to_add.clone().unwrap();
        assert_eq!((add.uplink_mbps, add.count), (1000, 30));
        // Alone, 1 Gbit/s broadcasts: 5,000 / 160 = 32 (33 with one down).
        let gig = p
            .broadcasts_needed
            .iter()
            .find(|n| n.uplink_mbps == 1000)
            .unwrap();
        assert_eq!(
            (gig.capacity_each, gig.count, gig.count_with_one_down),
            (160, 32, 33)
        );
    }

    #[test]
    fn shares_follow_capacity_and_costs_follow_figures() {
        let c = cluster();
        let figures = Figures {
            machine: "test".into(),
            broadcast_serve_gbps_per_core: Some(figure(2.0)),
            broadcast_viewers_per_core: Some(figure(1000.0)),
            ingest_cores_per_output_mpx_s: [("veryfast".to_owned(), figure(0.01))].into(),
            lb_requests_per_second_per_core: Some(figure(10_000.0)),
        };
        let p = plan(&c, &target(1000, Some(1.0)), &figures).unwrap();
        let b3 = p
            .broadcasts
            .iter()
            .find(|b| b.name == "broadcast3")
            .unwrap();
        // 8,000 of 9,680 slots: 826.4 viewers, 0.83 Gbit/s: 0.41 cores by bytes, 0.83 by count.
        assert!((b3.viewers - 1000.0 * 8000.0 / 9680.0).abs() < 1e-6);
        assert!((b3.cores_at_target.unwrap() - b3.viewers / 1000.0).abs() < 1e-9);
        // Full: 8 Gbit/s, 4 cores by bytes; 8,000 viewers, 8 cores by count.
        assert!((b3.cores_when_full.unwrap() - 8.0).abs() < 1e-9);
        // The ladder: (1920·1080 + 1280·720 + 854·480 + 640·360) · 25 = 90.9 Mpx/s.
        let mpx = (1920.0 * 1080.0 + 1280.0 * 720.0 + 854.0 * 480.0 + 640.0 * 360.0) * 25.0 / 1e6;
        assert!((p.channels[0].output_mpx_s - mpx).abs() < 1e-9);
        assert!((p.ingests.cores_each.unwrap() - mpx * 0.01).abs() < 1e-9);
        assert!(p.ingests.holds_with_one_down);
        // 1,000 pages asking every 5 s: 200 requests a second on the one LB left.
        assert!((p.lbs.requests_per_second - 200.0).abs() < 1e-9);
        assert!((p.lbs.cores_each.unwrap() - 0.02).abs() < 1e-9);
    }

    #[test]
    fn declared_cores_are_checked_and_missing_figures_stay_unknown() {
        let mut c = cluster();
        for h in &mut c.hosts {
            if h.name == "ingest1" {
                h.cores = Some(1);
            }
        }
        let figures = Figures {
            ingest_cores_per_output_mpx_s: [("veryfast".to_owned(), figure(0.05))].into(),
            ..Figures::default()
        };
        let p = plan(&c, &target(10, None), &figures).unwrap();
        assert_eq!(p.ingests.short_of_cores, ["ingest1"]);
        assert!(p.broadcasts[0].cores_at_target.is_none());
        assert!(p.lbs.cores_each.is_none());
        // No override: everyone counted at the top rendition, (5000 + 96) kbit/s + 10 %.
        assert_eq!(p.per_viewer_bps, 5096 * 1100);
    }

    #[test]
    fn unknown_channels_and_free_viewers_are_refused() {
        let c = cluster();
        let mut t = target(10, None);
        t.viewers.insert("other".into(), 5);
        assert_eq!(
            plan(&c, &t, &Figures::default()),
            Err(PlanError::UnknownChannel("other".into(), "test".into()))
        );
        assert_eq!(
            plan(&c, &target(10, Some(0.0)), &Figures::default()),
            Err(PlanError::FreeViewer)
        );
    }
}
