//! `streamctl plan`: the capacity plan of the cluster file for an audience, as a table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use streaming_plan::figures::Figures;
use streaming_plan::plan::{Plan, Target, plan as make_plan};

use crate::cli::PlanArgs;

/// `streamctl plan`.
pub fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let generator = streaming_runner::cluster::find_generator(&args.cluster)?;
    let cluster = streaming_runner::cluster::evaluate_production(&generator, &args.cluster)?;
    let figures_path = match &args.figures {
        Some(p) => p.clone(),
        None => find_figures(&args.cluster)?,
    };
    let figures = Figures::load(&figures_path)?;
    let channels: Vec<String> = if args.channel.is_empty() {
        cluster.channels.iter().map(|c| c.name.clone()).collect()
    } else {
        args.channel.clone()
    };
    let bitrates: Vec<Option<u64>> = if args.bitrate_mbps.is_empty() {
        vec![None]
    } else {
        args.bitrate_mbps
            .iter()
            .map(|m| Some((m * 1e6).round().max(0.0) as u64))
            .collect()
    };
    let mut plans = Vec::new();
    for &bitrate_bps in &bitrates {
        for &viewers in &args.viewers {
            let target = Target {
                viewers: split(viewers, &channels),
                bitrate_bps,
            };
            plans.push(make_plan(&cluster, &target, &figures)?);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plans)?);
        return Ok(());
    }
    println!(
        "Cluster file {} (production profile); figures {} ({})",
        args.cluster.display(),
        figures_path.display(),
        figures.machine
    );
    match plans.as_slice() {
        [one] => print_plan(one, bitrates[0].is_some()),
        many => print_cases(many),
    }
    Ok(())
}

/// `viewers` shared evenly by `channels`, the remainder to the first ones.
fn split(viewers: u64, channels: &[String]) -> BTreeMap<String, u64> {
    let n = channels.len().max(1) as u64;
    channels
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let extra = u64::from((i as u64) < viewers % n);
            (c.clone(), viewers / n + extra)
        })
        .collect()
}

/// `docs/capacity-figures.json` beside the cluster file, in the working directory, or in the
/// source tree streamctl was built from.
fn find_figures(cluster_file: &Path) -> anyhow::Result<PathBuf> {
    let name = "docs/capacity-figures.json";
    let mut candidates = Vec::new();
    if let Some(dir) = cluster_file.parent() {
        candidates.push(dir.join(name));
    }
    candidates.push(std::env::current_dir()?.join(name));
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(name),
    );
    candidates
        .into_iter()
        .find(|p| p.exists())
        .context("cannot find docs/capacity-figures.json (give --figures)")
}

fn print_plan(p: &Plan, bitrate_given: bool) {
    let counted_as = if bitrate_given {
        "as given"
    } else {
        "on average: each at its channel's top rendition, as the broadcasts count them, since \
         any viewer may switch up"
    };
    println!(
        "\n{} viewers, each counted at {} ({counted_as})",
        thousands(p.viewers),
        rate(p.per_viewer_bps as f64)
    );
    println!("\nEgress");
    println!(
        "  {:<12} {:>9} {:>13} {:>13}",
        "channel", "viewers", "per viewer", "egress"
    );
    for c in &p.channels {
        println!(
            "  {:<12} {:>9} {:>13} {:>13}",
            c.name,
            thousands(c.viewers),
            rate(c.per_viewer_bps as f64),
            rate(c.egress_bps as f64)
        );
    }

    print_broadcasts(p);
    print_ingests_and_lbs(p);
}

fn print_broadcasts(p: &Plan) {
    println!(
        "\nBroadcasts (viewers held under 80 % of the uplink; new viewers spread in proportion to room)"
    );
    println!(
        "  {:<12} {:>11} {:>8} {:>9} {:>12}   cores: at share / full / declared",
        "host", "uplink", "holds", "share", "egress"
    );
    for b in &p.broadcasts {
        println!(
            "  {:<12} {:>11} {:>8} {:>9} {:>12}   {} / {} / {}",
            b.name,
            rate(f64::from(b.uplink_mbps) * 1e6),
            thousands(b.capacity),
            thousands(b.viewers.round() as u64),
            rate(b.egress_bps),
            cores(b.cores_at_target),
            cores(b.cores_when_full),
            b.cores_declared.map_or("-".to_owned(), |c| c.to_string()),
        );
    }
    let h = &p.headroom;
    println!(
        "  all: room for {} viewers: {} ({:.0} % full)",
        thousands(h.capacity),
        verdict(h.free),
        h.fill * 100.0
    );
    if let Some(w) = &h.without_largest {
        println!(
            "  {} down: room for {}: {}",
            w.name,
            thousands(w.capacity),
            verdict(w.free)
        );
    } else {
        println!("  fewer than two broadcasts: none may go down");
    }
    if let Some(add) = &p.broadcasts_to_add
        && add.count > 0
    {
        println!(
            "  to hold {} with the largest down: add {} broadcasts of {}",
            thousands(p.viewers),
            thousands(add.count),
            rate(f64::from(add.uplink_mbps) * 1e6)
        );
    }
    let sizes: Vec<String> = p
        .broadcasts_needed
        .iter()
        .map(|n| {
            format!(
                "{} at {} ({} with one down)",
                thousands(n.count),
                rate(f64::from(n.uplink_mbps) * 1e6),
                thousands(n.count_with_one_down)
            )
        })
        .collect();
    println!("  of one size alone: {}", sizes.join(", "));
}

fn print_ingests_and_lbs(p: &Plan) {
    println!("\nIngests (each transcodes every channel: one down leaves the same work to another)");
    for c in &p.channels {
        let cost = match c.ingest_cores {
            Some(x) => format!("{x:.2} cores"),
            None => format!("no measured figure for preset {}", c.preset),
        };
        println!(
            "  {}: {} renditions, {}, {:.1} Mpx/s out: {cost}",
            c.name, c.renditions, c.preset, c.output_mpx_s
        );
    }
    println!(
        "  each of {}: {}{}; with one down: {}",
        p.ingests.hosts.join(", "),
        cores(p.ingests.cores_each),
        short(&p.ingests.short_of_cores),
        if p.ingests.holds_with_one_down {
            "holds"
        } else {
            "nothing left"
        }
    );

    println!(
        "\nLBs (every open page asks one LB for the viewer count every 5 s; cores at a TLS handshake per request)"
    );
    println!(
        "  one LB alone: {:.0} requests/s, {} cores{}; with one down: {}",
        p.lbs.requests_per_second,
        cores(p.lbs.cores_each),
        short(&p.lbs.short_of_cores),
        if p.lbs.holds_with_one_down {
            "holds"
        } else {
            "nothing left"
        }
    );
}

/// One line per (bitrate, viewers) case: the original README's table for this cluster.
fn print_cases(plans: &[Plan]) {
    println!(
        "\n{:>11} {:>9} {:>12} {:>9}   {:<22} {:<32} to add",
        "per viewer", "viewers", "egress", "room", "all up", "largest broadcast down"
    );
    for p in plans {
        let down = match &p.headroom.without_largest {
            Some(w) => format!("{}: {}", w.name, verdict(w.free)),
            None => "-".to_owned(),
        };
        let add = match &p.broadcasts_to_add {
            Some(a) if a.count > 0 => {
                format!("{} × {}", a.count, rate(f64::from(a.uplink_mbps) * 1e6))
            }
            _ => "0".to_owned(),
        };
        println!(
            "{:>11} {:>9} {:>12} {:>9}   {:<22} {:<32} {add}",
            rate(p.per_viewer_bps as f64),
            thousands(p.viewers),
            rate(p.egress_bps as f64),
            thousands(p.headroom.capacity),
            verdict(p.headroom.free),
            down,
        );
    }
}

fn verdict(free: i64) -> String {
    if free >= 0 {
        format!("holds, {} free", thousands(free.unsigned_abs()))
    } else {
        format!("SHORT by {}", thousands(free.unsigned_abs()))
    }
}

fn cores(c: Option<f64>) -> String {
    c.map_or("?".to_owned(), |c| format!("{c:.2}"))
}

fn short(hosts: &[String]) -> String {
    if hosts.is_empty() {
        String::new()
    } else {
        format!(" (MORE than declared on {})", hosts.join(", "))
    }
}

/// Bits per second in the unit that reads best, three significant digits at most.
fn rate(bps: f64) -> String {
    let (value, unit) = if bps >= 1e9 {
        (bps / 1e9, "Gbit/s")
    } else if bps >= 1e6 {
        (bps / 1e6, "Mbit/s")
    } else {
        (bps / 1e3, "kbit/s")
    };
    let decimals = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let digits = format!("{value:.decimals$}");
    let digits = if digits.contains('.') {
        digits.trim_end_matches('0').trim_end_matches('.')
    } else {
        &digits
    };
    format!("{digits} {unit}")
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_split_evenly() {
        let ch = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let got: Vec<u64> = split(1000, &ch).into_values().collect();
        assert_eq!(got, [334, 333, 333]);
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(thousands(5_000_000), "5,000,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(rate(3.5e6), "3.5 Mbit/s");
        assert_eq!(rate(28.03e9), "28 Gbit/s");
        assert_eq!(rate(227.47e6), "227 Mbit/s");
        assert_eq!(rate(5.6056e6), "5.61 Mbit/s");
        assert_eq!(rate(1e10), "10 Gbit/s");
        assert_eq!(rate(96_000.0), "96 kbit/s");
        assert_eq!(verdict(-3146), "SHORT by 3,146");
    }
}
