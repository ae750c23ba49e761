//! The faults the benches inject and undo: the runner's own `kill`, `start`, `partition` and
//! `heal` (what `streamctl` runs for an operator), called in-process, each returning the line
//! an operator would read.

use std::path::Path;
use std::time::Duration;

use streaming_runner::cluster::Layout;
use streaming_runner::hosts::{self, Blow};
use streaming_runner::partition::{self, Cut};
use streaming_runner::status::{self, HostStatus};
use streaming_runner::upgrade::{self, local::LocalFleet};

/// `streamctl kill HOST` with `blow`'s flags.
pub async fn kill(state: &Path, host: &str, blow: Blow) -> anyhow::Result<String> {
    let (layout, host) = (Layout::new(state)?, host.to_owned());
    blocking(move || hosts::kill(&layout, &host, blow)).await
}

/// `streamctl start HOST`: resumes a hung host, starts a dead one.
pub async fn start(state: &Path, host: &str) -> anyhow::Result<String> {
    let (layout, host) = (Layout::new(state)?, host.to_owned());
    blocking(move || hosts::start_again(&layout, &host)).await
}

/// Resumes the hosts a bench hung (its transcoders would have taken the cores it measured) and
/// waits until the cluster may lose a host again, as a rolling upgrade waits between hosts
/// (every ingest live on its preferred source, the LBs seeing every broadcast, ...): a bench
/// leaves the cluster as it found it, and the next measurement does not measure its recovery.
/// What cannot be resumed or settled is logged, not returned: the bench's own result stands.
pub async fn resume_settled(state: &Path, hosts: &[String]) {
    for host in hosts {
        if let Err(e) = start(state, host).await {
            tracing::warn!(%host, "cannot resume: {e:#}");
        }
    }
    if hosts.is_empty() {
        return;
    }
    let fleet = match Layout::new(state).and_then(LocalFleet::new) {
        Ok(fleet) => fleet,
        Err(e) => return tracing::warn!("cannot check the cluster after resuming: {e:#}"),
    };
    if let Err(missing) = upgrade::wait_ready(&fleet, None, SETTLE_LIMIT).await {
        tracing::warn!(%missing, "the cluster is not settled {} s after resuming", SETTLE_LIMIT.as_secs());
    }
}

/// How long [`resume_settled`] waits for the cluster to settle.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// `streamctl partition HOST --from PEER...` (no peers: from everyone).
pub async fn cut(state: &Path, host: &str, from: &[String]) -> anyhow::Result<Cut> {
    Ok(partition::partition(state, host, from, false).await?)
}

/// `streamctl heal HOST`: the cuts lifted.
pub async fn heal(state: &Path, host: &str) -> anyhow::Result<Vec<Cut>> {
    Ok(partition::heal(state, Some(host)).await?)
}

/// `streamctl status`.
pub async fn statuses(state: &Path) -> anyhow::Result<Vec<HostStatus>> {
    status::collect(&Layout::new(state)?).await
}

/// Signals, waits for process groups to go and spawns: off the runtime's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("fault task: {e}"))?
}
