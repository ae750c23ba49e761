//! `streamctl status`: one line per host.

use streaming_runner::cluster::Layout;
use streaming_runner::procs::Liveness;
use streaming_runner::status::HostStatus;

use crate::cli::StatusArgs;

/// `streamctl status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let statuses = streaming_runner::status::collect(&layout).await?;
    let cuts = streaming_runner::partition::active(&layout);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
        return Ok(());
    }
    println!(
        "{:<12} {:<10} {:>8} {:<6} {:<24} details",
        "host", "role", "pid", "proc", "health"
    );
    for s in &statuses {
        let health: String = s
            .health
            .clone()
            .unwrap_or_else(|| "-".into())
            .chars()
            .take(24)
            .collect();
        println!(
            "{:<12} {:<10} {:>8} {:<6} {:<24} {}",
            s.name,
            s.role.as_str(),
            s.service_pid
                .or(s.pid)
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            match s.process {
                Liveness::Running => "up",
                Liveness::Hung => "HUNG",
                Liveness::Restarting => "restart",
                Liveness::Dead => "down",
            },
            health,
            details(s)
        );
    }
    if !cuts.is_empty() {
        println!("network cuts (`streamctl heal` lifts them):");
        for cut in &cuts {
            println!("  {cut}");
        }
    }
    Ok(())
}

/// The role-specific part of a host's line: load, source, database role, restarts.
fn details(s: &HostStatus) -> String {
    let mut details = Vec::new();
    if let Some(v) = s.viewers {
        details.push(format!("viewers {v}"));
    }
    if let Some(e) = s.egress_mbps {
        details.push(format!("egress {e:.1} Mbit/s"));
    }
    if let Some(f) = s.free_viewers {
        details.push(format!("free {f}"));
    }
    if let Some(a) = &s.active_source {
        details.push(format!("source {a}"));
    }
    if let Some(channels) = s.publisher_of.as_ref().filter(|c| !c.is_empty()) {
        details.push(format!("publisher of {}", channels.join(" ")));
    }
    if let Some(role) = &s.db_role {
        let state = s.db_state.as_deref().unwrap_or("?");
        details.push(format!("patroni {role} ({state})"));
    }
    if let Some(streaming) = s.db_streaming.as_ref().filter(|v| !v.is_empty()) {
        details.push(format!("streaming to {}", streaming.join(" ")));
    }
    if let Some(etcd) = &s.etcd {
        details.push(format!("etcd {etcd}"));
    }
    if let Some(restarts) = s.restarts.filter(|r| *r > 0) {
        let last = s.last_exit.as_deref().unwrap_or("?");
        details.push(format!("restarted {restarts}x (last: {last})"));
    }
    details.join(", ")
}
