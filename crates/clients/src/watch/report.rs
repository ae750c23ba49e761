//! What the viewers felt: per viewer and for all of them.

use std::collections::BTreeSet;

use serde::Serialize;

/// What one viewer experienced.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ViewerReport {
    pub viewer: usize,
    pub startup_s: f64,
    pub stalls: u64,
    pub stall_s: f64,
    /// Segments that could not be had from any broadcast (a hole the viewer saw or skipped).
    pub errors: u64,
    /// Requests that failed or timed out (each one triggered a failover).
    pub request_failures: u64,
    pub failovers: u64,
    /// LBs that failed to answer within [`LB_ATTEMPT`] (entry or `/api/assign`).
    pub lb_failures: u64,
    /// Longest time from a failed request to the next broadcast (asking the LBs in turn).
    pub reassign_max_s: f64,
    /// Rendition changes after the first choice.
    pub switches: u64,
    pub segments: u64,
    /// Segments played that began with EXT-X-DISCONTINUITY (a source switch or a slate): a
    /// picture change the viewer sees, though not a stall.
    pub discontinuities: u64,
    /// Mean of now − PROGRAM-DATE-TIME at the play head, sampled at every segment.
    pub latency_s: f64,
    pub latency_max_s: f64,
    pub renditions: BTreeSet<String>,
    pub broadcasts: BTreeSet<String>,
    /// Set when the viewer could not start at all.
    pub fatal: Option<String>,
}

/// The whole run: sums over viewers, startup and latency averaged.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchReport {
    pub viewers: usize,
    pub seconds: u64,
    pub startup_s: f64,
    pub stalls: u64,
    pub stall_s: f64,
    pub errors: u64,
    pub request_failures: u64,
    pub failovers: u64,
    pub lb_failures: u64,
    pub reassign_max_s: f64,
    pub switches: u64,
    pub segments: u64,
    pub discontinuities: u64,
    pub latency_s: f64,
    pub latency_max_s: f64,
    pub renditions: BTreeSet<String>,
    pub broadcasts: BTreeSet<String>,
    pub per_viewer: Vec<ViewerReport>,
}

impl WatchReport {
    pub(super) fn from_viewers(seconds: u64, per_viewer: Vec<ViewerReport>) -> Self {
        let n = per_viewer.len().max(1) as f64;
        let mut report = WatchReport {
            viewers: per_viewer.len(),
            seconds,
            ..Default::default()
        };
        for v in &per_viewer {
            report.startup_s += v.startup_s / n;
            report.latency_s += v.latency_s / n;
            report.latency_max_s = report.latency_max_s.max(v.latency_max_s);
            report.stalls += v.stalls;
            report.stall_s += v.stall_s;
            report.errors += v.errors + u64::from(v.fatal.is_some());
            report.request_failures += v.request_failures;
            report.failovers += v.failovers;
            report.lb_failures += v.lb_failures;
            report.reassign_max_s = report.reassign_max_s.max(v.reassign_max_s);
            report.switches += v.switches;
            report.segments += v.segments;
            report.discontinuities += v.discontinuities;
            report.renditions.extend(v.renditions.iter().cloned());
            report.broadcasts.extend(v.broadcasts.iter().cloned());
        }
        report.per_viewer = per_viewer;
        report
    }
}
