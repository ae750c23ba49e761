//! `streamctl up` and `down`.

use std::time::Duration;

use anyhow::{Context, bail};
use streaming_runner::cluster::Layout;
use streaming_runner::up::UpOptions;

use crate::cli::{DownArgs, UpArgs};

/// `streamctl up`.
pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let options = UpOptions {
        cluster: args.cluster,
        address_prefix: args.address_prefix,
        timeout: Duration::from_secs(args.timeout),
        monitoring: args.monitoring,
    };
    let report = streaming_runner::up::up(&layout, &options, &super::sayer(args.json)).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "playing after {:.1} s (first segment {})",
        report.startup_s, report.first_segment
    );
    if let (Some(primary), Some(s)) = (&report.db_primary, report.db_primary_s) {
        let replicas = match report.db_streaming_s {
            Some(r) => format!(
                "{} streaming after {r:.1} s",
                report.db_streaming.join(", ")
            ),
            None => "no replica streaming yet (see `streamctl status`)".to_owned(),
        };
        println!("database: primary {primary} after {s:.1} s; {replicas}");
    }
    println!("viewer:   {}", report.viewer_url);
    if let Some(url) = &report.prometheus_url {
        println!("metrics:  {url} (Prometheus: targets, alerts)");
    }
    println!("playlist: {}", report.playlist_url);
    println!(
        "CA:       {} (trust it, or use curl --cacert)",
        report.ca_cert
    );
    Ok(())
}

/// `streamctl down`.
pub fn down(args: DownArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    if let Some(stopped) = streaming_runner::monitoring::stop(&layout) {
        println!("{stopped}");
    }
    let left = streaming_runner::hosts::stop_all(&layout, &|line| println!("{line}"));
    for leftover in streaming_runner::partition::remove_cluster(&layout) {
        println!("not removed: {leftover}");
    }
    if !left.is_empty() {
        bail!("could not stop: {}", left.join(", "));
    }
    if args.wipe && layout.root.exists() {
        std::fs::remove_dir_all(&layout.root)
            .with_context(|| format!("remove {}", layout.root.display()))?;
        println!("removed {}", layout.root.display());
    }
    Ok(())
}
