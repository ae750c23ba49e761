//! Faults on demand: `streamctl kill`, `start`, `partition` and `heal`.

use streaming_runner::cluster::Layout;
use streaming_runner::hosts::{self, Blow};
use streaming_runner::partition;

use crate::cli::{HealArgs, KillArgs, PartitionArgs, StartArgs};

/// `streamctl kill`.
pub fn kill(args: KillArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let blow = if args.crash {
        Blow::Crash
    } else if args.ffmpeg {
        Blow::Ffmpeg { hang: args.hang }
    } else if args.postgres {
        Blow::Postgres { hang: args.hang }
    } else if args.hang {
        Blow::Hang
    } else {
        Blow::Kill
    };
    println!("{}", hosts::kill(&layout, &args.name, blow)?);
    Ok(())
}

/// `streamctl start`.
pub fn start(args: StartArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    println!("{}", hosts::start_again(&layout, &args.name)?);
    Ok(())
}

/// `streamctl partition`.
pub async fn partition(args: PartitionArgs) -> anyhow::Result<()> {
    let cut = partition::partition(&args.state.dir, &args.name, &args.from, args.one_way).await?;
    println!("cut: {cut} (`streamctl heal {}` lifts it)", args.name);
    Ok(())
}

/// `streamctl heal`.
pub async fn heal(args: HealArgs) -> anyhow::Result<()> {
    let healed = partition::heal(&args.state.dir, args.name.as_deref()).await?;
    if healed.is_empty() {
        println!("no cut to lift");
    }
    for cut in healed {
        println!("healed: {cut}");
    }
    Ok(())
}
