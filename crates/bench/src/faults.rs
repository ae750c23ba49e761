//! The faults the benches inject and undo: the runner's own `kill`, `start`, `partition` and
//! `heal` (what `streamctl` runs for an operator), called in-process, each returning the line
//! an operator would read.

use std::path::Path;

use streaming_runner::cluster::Layout;
use streaming_runner::hosts::{self, Blow};
use streaming_runner::partition::{self, Cut};
use streaming_runner::status::{self, HostStatus};

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
