//! `streamctl upgrade`: the local cluster's rolling restart, or with `--nixos` the NixOS
//! hosts' rolling switch (streaming_runner::upgrade).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use streaming_runner::cluster::Layout;
use streaming_runner::upgrade::{self, Limits, LocalFleet, NixosFleet, Selection, UpgradeReport};

use crate::cli::UpgradeArgs;

pub async fn upgrade(args: UpgradeArgs) -> anyhow::Result<()> {
    let selection = Selection {
        hosts: args.hosts,
        roles: args.roles,
        all: args.all,
    };
    let limits = Limits {
        ready: Duration::from_secs(args.ready_timeout),
        drain: Duration::from_secs(args.drain_timeout),
    };
    // The first Ctrl-C lets the host in hand finish (a host is never left stopped or drained
    // by an interrupt); the second one is the default: the process ends at once.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let json = args.json;
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::SeqCst);
            if !json {
                eprintln!("interrupt: finishing the host in hand, then stopping");
            }
            let _ = tokio::signal::ctrl_c().await;
            std::process::exit(130);
        }
    });
    let say = super::sayer(args.json);
    let report: UpgradeReport = match (&args.flake, &args.ca, &args.ops_token_file) {
        (Some(flake), Some(ca), Some(token)) if args.nixos => {
            let fleet = NixosFleet::new(flake, ca, token, &args.ssh_user)?;
            upgrade::upgrade(&fleet, &selection, limits, &stop, &say).await?
        }
        _ => {
            let fleet = LocalFleet::new(Layout::new(&args.state.dir)?)?;
            upgrade::upgrade(&fleet, &selection, limits, &stop, &say).await?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "upgraded {} host(s) in {:.1} s",
            report.hosts.len(),
            report.total_s
        );
    }
    Ok(())
}
