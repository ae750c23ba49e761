//! Injecting and restoring one fault of the schedule, through the operator's own commands
//! (`streamctl kill` / `start`, `partition` / `heal`), run in-process.

use std::path::Path;

use streaming_core::config::Role;
use streaming_runner::hosts::Blow;

use super::schedule::{Fault, Kind};
use crate::faults;

/// Does the fault; the operator line of what was done. `from`: a partition's peers (hosts or
/// roles, empty: everyone).
pub async fn inject(state: &Path, fault: &Fault, from: &[String]) -> anyhow::Result<String> {
    if fault.kind == Kind::Partition {
        let cut = faults::cut(state, &fault.host, from).await?;
        return Ok(format!("{}: cut ({cut})", fault.host));
    }
    let blow = match fault.kind {
        Kind::Hang => Blow::Hang,
        // A db host's service is Patroni and PostgreSQL: they have no supervisor to abort.
        Kind::Crash if fault.role == Role::Db => Blow::Postgres { hang: false },
        Kind::Crash => Blow::Crash,
        _ => Blow::Kill,
    };
    faults::kill(state, &fault.host, blow).await
}

/// Undoes the fault, if anybody but the runner has to; the operator line, if any.
pub async fn restore(state: &Path, fault: &Fault) -> anyhow::Result<Option<String>> {
    if fault.restores_itself() {
        return Ok(None);
    }
    if fault.kind == Kind::Partition {
        let healed = faults::heal(state, &fault.host).await?;
        let healed: Vec<String> = healed.iter().map(ToString::to_string).collect();
        return Ok(Some(format!("healed {}", healed.join(", "))));
    }
    faults::start(state, &fault.host).await.map(Some)
}
