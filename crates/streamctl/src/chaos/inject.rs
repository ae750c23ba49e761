//! Injecting and restoring one fault of the schedule, through the operator's own commands
//! (`streamctl kill` / `start`, `partition` / `heal`), run in-process.

use std::path::Path;

use streaming_core::config::Role;

use super::schedule::{Fault, Kind};
use crate::cli::{KillArgs, StartArgs, StateArg};
use crate::commands;

/// Does the fault; the operator line of what was done. `from`: a partition's peers (hosts or
/// roles, empty: everyone).
pub async fn inject(state: &Path, fault: &Fault, from: &[String]) -> anyhow::Result<String> {
    if fault.kind == Kind::Partition {
        let cut = crate::partition::partition(state, &fault.host, from, false).await?;
        return Ok(format!("{}: cut ({cut})", fault.host));
    }
    let args = KillArgs {
        name: fault.host.clone(),
        state: StateArg {
            dir: state.to_owned(),
        },
        hang: fault.kind == Kind::Hang,
        ffmpeg: false,
        // A db host's service is Patroni and PostgreSQL: they have no supervisor to abort.
        postgres: fault.kind == Kind::Crash && fault.role == Role::Db,
        crash: fault.kind == Kind::Crash && fault.role != Role::Db,
    };
    blocking(move || commands::kill_host(&args)).await
}

/// Undoes the fault, if anybody but the runner has to; the operator line, if any.
pub async fn restore(state: &Path, fault: &Fault) -> anyhow::Result<Option<String>> {
    if fault.restores_itself() {
        return Ok(None);
    }
    if fault.kind == Kind::Partition {
        let healed = crate::partition::heal(state, Some(&fault.host)).await?;
        let healed: Vec<String> = healed.iter().map(ToString::to_string).collect();
        return Ok(Some(format!("healed {}", healed.join(", "))));
    }
    let args = StartArgs {
        name: fault.host.clone(),
        state: StateArg {
            dir: state.to_owned(),
        },
    };
    blocking(move || commands::start_host_again(&args))
        .await
        .map(Some)
}

/// Signals, waits for process groups to go and spawns: off the runtime's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("fault task: {e}"))?
}
