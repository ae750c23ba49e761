//! What the viewers felt: per viewer and for all of them.

use std::collections::BTreeSet;

use serde::Serialize;

/// What viewers experienced, one viewer's or everyone's: the same figures either way (a
/// sum, a maximum or, for startup and latency, a mean over viewers).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Experience {
    pub startup_s: f64,
    pub stalls: u64,
    pub stall_s: f64,
    /// Segments that could not be had from any broadcast (a hole the viewer saw or skipped);
    /// for everyone, viewers that could not start at all count too.
    pub errors: u64,
    /// Requests that failed or timed out (each one triggered a failover).
    pub request_failures: u64,
    pub failovers: u64,
    /// LBs that failed to answer within [`LB_ATTEMPT`](super::LB_ATTEMPT) (entry or
    /// `/api/assign`).
    pub lb_failures: u64,
    /// Longest time from a failed request to the next broadcast (asking the LBs in turn).
    pub reassign_max_s: f64,
    /// Rendition changes after the first choice.
    pub switches: u64,
    pub segments: u64,
    /// Parts played (low-latency mode; a part-less segment counts in `segments`).
    #[serde(default)]
    pub parts: u64,
    /// Segments played that began with EXT-X-DISCONTINUITY (a source switch or a slate): a
    /// picture change the viewer sees, though not a stall.
    pub discontinuities: u64,
    /// Mean of now − PROGRAM-DATE-TIME at the play head, sampled at every segment.
    pub latency_s: f64,
    pub latency_max_s: f64,
    pub renditions: BTreeSet<String>,
    pub broadcasts: BTreeSet<String>,
}

/// What one viewer experienced.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ViewerReport {
    pub viewer: usize,
    #[serde(flatten)]
    pub felt: Experience,
    /// Set when the viewer could not start at all.
    pub fatal: Option<String>,
    /// Seconds each segment took from request to last byte (load benches read percentiles).
    #[serde(skip)]
    pub segment_fetch_s: Vec<f32>,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchReport {
    pub viewers: usize,
    pub seconds: u64,
    #[serde(flatten)]
    pub felt: Experience,
    /// Segment fetch time over every viewer's segments: median and 99th percentile.
    pub segment_fetch_p50_s: f64,
    pub segment_fetch_p99_s: f64,
    pub per_viewer: Vec<ViewerReport>,
}

impl WatchReport {
    pub(super) fn from_viewers(seconds: u64, per_viewer: Vec<ViewerReport>) -> Self {
        let n = per_viewer.len().max(1) as f64;
        let mut all = Experience::default();
        for v in &per_viewer {
            let one = &v.felt;
            all.startup_s += one.startup_s / n;
            all.latency_s += one.latency_s / n;
            all.latency_max_s = all.latency_max_s.max(one.latency_max_s);
            all.stalls += one.stalls;
            all.stall_s += one.stall_s;
            all.errors += one.errors + u64::from(v.fatal.is_some());
            all.request_failures += one.request_failures;
            all.failovers += one.failovers;
            all.lb_failures += one.lb_failures;
            all.reassign_max_s = all.reassign_max_s.max(one.reassign_max_s);
            all.switches += one.switches;
            all.segments += one.segments;
            all.parts += one.parts;
            all.discontinuities += one.discontinuities;
            all.renditions.extend(one.renditions.iter().cloned());
            all.broadcasts.extend(one.broadcasts.iter().cloned());
        }
        let mut fetches: Vec<f32> = per_viewer
            .iter()
            .flat_map(|v| v.segment_fetch_s.iter().copied())
            .collect();
        fetches.sort_by(f32::total_cmp);
        let percentile = |p: f64| -> f64 {
            match fetches.len() {
                0 => 0.0,
                n => f64::from(fetches[((n - 1) as f64 * p).round() as usize]),
            }
        };
        WatchReport {
            viewers: per_viewer.len(),
            seconds,
            felt: all,
            segment_fetch_p50_s: percentile(0.5),
            segment_fetch_p99_s: percentile(0.99),
            per_viewer,
        }
    }
}
