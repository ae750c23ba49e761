//! Changing the host list of a running cluster: `streamctl add`, `drain`, `sync`; and
//! `streamctl hosts`.

use std::time::Duration;

use anyhow::Context;
use streaming_core::config::{HostConfig, Role};
use streaming_runner::cluster::{self, Layout};
use streaming_runner::topology::{self, ListSource, TopologyReport};

use crate::cli::{AddArgs, DrainArgs, HostsArgs, SyncArgs};

/// `streamctl add NAME`.
pub async fn add(args: AddArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let list = ListSource {
        cluster: args.cluster.as_deref(),
        address_prefix: args.address_prefix.as_deref(),
    };
    let wait = Duration::from_secs(args.timeout);
    let say = super::sayer(args.json);
    let report = topology::add(&layout, &args.name, list, wait, &say).await?;
    print_report(&report, args.json)
}

/// `streamctl drain NAME`.
pub fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let say = super::sayer(args.json);
    let report = topology::drain(&layout, &args.name, args.cluster.as_deref(), &say)?;
    print_report(&report, args.json)
}

/// `streamctl sync`.
pub fn sync(args: SyncArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let report = topology::sync(&layout, args.cluster.as_deref())?;
    print_report(&report, args.json)
}

fn print_report(report: &TopologyReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let line = |what: &str, names: &[String]| {
        if !names.is_empty() {
            println!("{what}: {}", names.join(", "));
        }
    };
    line("started", &report.started);
    line("reloaded (SIGHUP)", &report.reloaded);
    line("removed (stopped)", &report.removed);
    line("listed but not running", &report.not_running);
    line("drained", &report.drained);
    Ok(())
}

/// `streamctl hosts`.
pub fn hosts(args: HostsArgs) -> anyhow::Result<()> {
    let configs: Vec<HostConfig> = match &args.state {
        Some(state) => Layout::new(state)?.load_configs()?,
        None => {
            let tmp = std::env::temp_dir().join("streamctl-hosts");
            let generator = cluster::find_generator(&args.cluster)?;
            cluster::evaluate(&generator, &args.cluster, &tmp, &args.address_prefix)?
                .into_values()
                .collect()
        }
    };
    let cluster = &configs.first().context("cluster has no host")?.cluster;
    print!("{}", hosts_lines(cluster));
    Ok(())
}

/// `address fqdn name` per host, then the site name on the first LB.
pub fn hosts_lines(cluster: &streaming_core::config::ClusterConfig) -> String {
    let mut out = String::new();
    for host in &cluster.hosts {
        out.push_str(&format!("{} {} {}\n", host.address, host.fqdn, host.name));
    }
    if let Some(lb) = cluster.hosts_with_role(Role::Lb).next() {
        out.push_str(&format!("{} {}\n", lb.address, cluster.site));
    }
    out
}
