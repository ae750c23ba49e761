//! What a client learns from the state directory of a local cluster (`streamctl up`'s) when
//! the command line does not say: the LBs, the channel, the CA, a host's address.

use std::path::Path;

use anyhow::Context;
use streaming_core::config::HostConfig;

/// Any host's config: every one carries the whole cluster.
pub fn any_config(state: &Path) -> anyhow::Result<HostConfig> {
    let dir = state.join("config");
    let entry = std::fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "no cluster state in {} (run `streamctl up` first or give a URL)",
                dir.display()
            )
        })?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))
        .context("no host config in the state dir")?;
    Ok(HostConfig::load(&entry.path())?)
}

/// The config of the host called `name`.
pub fn host_config(state: &Path, name: &str) -> anyhow::Result<HostConfig> {
    HostConfig::load(&state.join("config").join(format!("{name}.json")))
        .with_context(|| format!("no host {name} in {}", state.display()))
}
