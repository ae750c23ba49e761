//! What each step of the chaos schedule did to viewers and chat, the totals, and the Markdown
//! page.

use std::fmt::Write as _;

use serde::Serialize;

use super::schedule::{Bounds, Step};
use crate::database::DbCheck;
use streaming_clients::chat::{ChatReport, Outage};
use streaming_clients::watch::WatchReport;

/// One step: its faults and what the viewers and chat clients felt meanwhile.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepRow {
    pub step: usize,
    pub label: String,
    /// What each inject and restore did (operator lines), or why it failed.
    pub actions: Vec<String>,
    /// Injections or restores that failed: the step did not run as scheduled.
    pub fault_errors: Vec<String>,
    pub viewers: usize,
    pub stalls: u64,
    pub stall_s: f64,
    /// Segments no broadcast could give, plus viewers that gave up.
    pub viewer_errors: u64,
    pub failovers: u64,
    pub request_failures: u64,
    pub chat_sent: u64,
    pub chat_acked: u64,
    /// Sent and never acked (allowed: the client gave up on it; never counted as lost).
    pub chat_unacked: u64,
    /// Acked and not in PostgreSQL under the acked seq.
    pub chat_lost: u64,
    /// Acked messages some client never received.
    pub chat_missing: u64,
    /// Stored more than once, delivered twice, or one seq given to two messages.
    pub chat_duplicated: u64,
    pub chat_out_of_order: u64,
    pub write_outages: Vec<Outage>,
    pub longest_write_outage_s: f64,
    /// The most db hosts that answered Patroni's `/primary` at once (more than one: split
    /// brain). A host cut off from everyone cannot be asked, so it is not counted.
    pub max_primaries: usize,
    /// From the last restore (a crash: from the crash) until whole again.
    pub whole_again_s: Option<f64>,
    /// What was still not whole when the bench gave up waiting.
    pub not_whole: Option<String>,
}

impl StepRow {
    pub fn from_parts(
        step: &Step,
        viewers: &WatchReport,
        chat: &ChatReport,
        db: &DbCheck,
    ) -> StepRow {
        StepRow {
            step: step.number,
            label: step.label(),
            viewers: viewers.viewers,
            stalls: viewers.felt.stalls,
            stall_s: viewers.felt.stall_s,
            viewer_errors: viewers.felt.errors,
            failovers: viewers.felt.failovers,
            request_failures: viewers.felt.request_failures,
            chat_sent: chat.sent,
            chat_acked: chat.acked,
            chat_unacked: chat.unacked,
            chat_lost: db.lost + db.wrong_seq,
            chat_missing: chat.missing,
            chat_duplicated: db.duplicates
                + db.seq_duplicates
                + chat.duplicates
                + chat.seq_conflicts,
            chat_out_of_order: chat.out_of_order,
            longest_write_outage_s: chat
                .write_outages
                .iter()
                .map(|o| o.duration_s)
                .fold(0.0, f64::max),
            write_outages: chat.write_outages.clone(),
            ..StepRow::default()
        }
    }

    /// The bar a run must meet: no stall, no viewer error, no acked message lost, missed or doubled,
    /// and the cluster whole again.
    pub fn clean(&self) -> bool {
        self.stalls == 0
            && self.viewer_errors == 0
            && self.chat_lost == 0
            && self.chat_missing == 0
            && self.chat_duplicated == 0
            && self.max_primaries <= 1
            && self.fault_errors.is_empty()
            && self.not_whole.is_none()
    }
}

/// Sums over the steps (longest outage and slowest "whole again": maxima).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub steps: usize,
    pub faults: usize,
    pub stalls: u64,
    pub stall_s: f64,
    pub viewer_errors: u64,
    pub failovers: u64,
    pub chat_sent: u64,
    pub chat_acked: u64,
    pub chat_unacked: u64,
    pub chat_lost: u64,
    pub chat_missing: u64,
    pub chat_duplicated: u64,
    pub chat_out_of_order: u64,
    pub write_outages: usize,
    pub write_outage_s: f64,
    pub longest_write_outage_s: f64,
    pub max_whole_again_s: f64,
    pub max_primaries: usize,
    pub fault_errors: usize,
    pub not_whole: usize,
}

impl Totals {
    pub fn of(schedule: &[Step], rows: &[StepRow]) -> Totals {
        let mut t = Totals {
            steps: rows.len(),
            faults: schedule
                .iter()
                .take(rows.len())
                .map(|s| s.faults.len())
                .sum(),
            ..Totals::default()
        };
        for r in rows {
            t.stalls += r.stalls;
            t.stall_s += r.stall_s;
            t.viewer_errors += r.viewer_errors;
            t.failovers += r.failovers;
            t.chat_sent += r.chat_sent;
            t.chat_acked += r.chat_acked;
            t.chat_unacked += r.chat_unacked;
            t.chat_lost += r.chat_lost;
            t.chat_missing += r.chat_missing;
            t.chat_duplicated += r.chat_duplicated;
            t.chat_out_of_order += r.chat_out_of_order;
            t.write_outages += r.write_outages.len();
            t.write_outage_s += r.write_outages.iter().map(|o| o.duration_s).sum::<f64>();
            t.longest_write_outage_s = t.longest_write_outage_s.max(r.longest_write_outage_s);
            t.max_whole_again_s = t.max_whole_again_s.max(r.whole_again_s.unwrap_or(0.0));
            t.max_primaries = t.max_primaries.max(r.max_primaries);
            t.fault_errors += r.fault_errors.len();
            t.not_whole += usize::from(r.not_whole.is_some());
        }
        t
    }
}

/// The whole run, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    /// The command line that replays this run.
    pub command: String,
    pub bounds: Bounds,
    pub viewers: usize,
    pub chat_clients: usize,
    pub chat_rate: f64,
    pub schedule: Vec<Step>,
    pub steps: Vec<StepRow>,
    pub totals: Totals,
    /// Every step ran, and every step was clean.
    pub passed: bool,
    /// Why the run stopped before the end of the schedule.
    pub stopped: Option<String>,
}

fn opt_s(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |s| format!("{s:.1}"))
}

/// The schedule as lines, printed before the run and in the page.
pub fn schedule_lines(schedule: &[Step]) -> String {
    let mut out = String::new();
    for s in schedule {
        let faults: Vec<String> = s.faults.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "{:>3}. {}", s.number, faults.join(" + "));
    }
    out
}

/// The Markdown page (docs/chaos.md).
pub fn markdown(report: &ChaosReport) -> String {
    let t = &report.totals;
    let b = &report.bounds;
    let mut out = String::from("# Chaos: a random fault schedule\n\n");
    let _ = writeln!(
        out,
        "Made by `{}` against a local cluster started with `streamctl up` (2-core machine). \
         Seed {}: {} faults in {} steps (a pair is two hosts of different roles at once), \
         each restored after {:.0}-{:.0} s (a crashed service is restarted by the runner). \
         During each step {} viewers spread over every broadcast (failing over through the LBs) \
         watch and {} chat clients send {} msg/s; \
         the next step starts once the cluster is whole again (every host up and healthy, the \
         database primary streaming to its replica). Lost and duplicated chat messages are \
         checked in PostgreSQL after each step.\n",
        report.command,
        report.seed,
        t.faults,
        t.steps,
        b.min_fault_s,
        b.max_fault_s,
        report.viewers,
        report.chat_clients,
        report.chat_rate,
    );
    let _ = writeln!(
        out,
        "Totals: {} stalls ({:.2} s), {} viewer errors, {} failovers; chat {} sent, {} acked, \
         {} never acked, {} lost, {} missed by a client, {} duplicated, {} out of order; {} \
         write outages ({:.1} s in all, longest {:.1} s); at most {} writable database \
         primary at once; whole again at most {:.1} s after a restore.{}\n",
        t.stalls,
        t.stall_s,
        t.viewer_errors,
        t.failovers,
        t.chat_sent,
        t.chat_acked,
        t.chat_unacked,
        t.chat_lost,
        t.chat_missing,
        t.chat_duplicated,
        t.chat_out_of_order,
        t.write_outages,
        t.write_outage_s,
        t.longest_write_outage_s,
        t.max_primaries,
        t.max_whole_again_s,
        match &report.stopped {
            Some(why) => format!(" Stopped early: {why}."),
            None => String::new(),
        }
    );
    out.push_str(
        "| step | faults | stalls | stall s | viewer errors | failovers | chat sent | acked | \
         lost | missed | duplicated | out of order | longest write outage s | db primaries at \
         once | whole again s |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &report.steps {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            r.step,
            r.label,
            r.stalls,
            r.stall_s,
            r.viewer_errors,
            r.failovers,
            r.chat_sent,
            r.chat_acked,
            r.chat_lost,
            r.chat_missing,
            r.chat_duplicated,
            r.chat_out_of_order,
            r.longest_write_outage_s,
            r.max_primaries,
            r.not_whole
                .as_ref()
                .map_or_else(|| opt_s(r.whole_again_s), |w| format!("not whole: {w}")),
        );
    }
    let _ = writeln!(
        out,
        "\nResult: {}.\n\nThe schedule (start offsets within a step, durations until the restore; a crashed \
         service is restarted by the runner):\n\n```\n{}```",
        if report.passed {
            "PASSED (0 stalls, 0 viewer errors, 0 acked messages lost, missed or duplicated, \
             never two database primaries)"
        } else {
            "FAILED"
        },
        schedule_lines(&report.schedule)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::schedule::{Fault, Kind};
    use streaming_core::config::Role;

    #[test]
    fn totals_sum_the_steps_and_a_dirty_step_is_seen() {
        let step = |n| Step {
            number: n,
            faults: vec![Fault {
                host: "lb1".into(),
                role: Role::Lb,
                kind: Kind::Hang,
                shape: None,
                start_s: 0.0,
                restore_after_s: 5.0,
            }],
        };
        let schedule = vec![step(1), step(2), step(3)];
        let chat = ChatReport {
            sent: 100,
            acked: 99,
            unacked: 1,
            write_outages: vec![Outage {
                start_s: 3.0,
                duration_s: 2.5,
            }],
            ..ChatReport::default()
        };
        let viewers = WatchReport {
            viewers: 20,
            ..WatchReport::default()
        };
        let mut a = StepRow::from_parts(&schedule[0], &viewers, &chat, &DbCheck::default());
        a.whole_again_s = Some(1.5);
        assert!(a.clean());
        let mut b = a.clone();
        b.step = 2;
        b.stalls = 1;
        b.stall_s = 0.8;
        b.whole_again_s = Some(4.0);
        assert!(!b.clean());
        let t = Totals::of(&schedule, &[a, b]);
        assert_eq!((t.steps, t.faults, t.stalls, t.chat_sent), (2, 2, 1, 200));
        assert_eq!((t.write_outages, t.chat_unacked), (2, 2));
        assert!((t.write_outage_s - 5.0).abs() < 1e-9);
        assert!((t.max_whole_again_s - 4.0).abs() < 1e-9);
    }
}
