//! The local cluster as a [`Fleet`]: a host is replaced by restarting its processes on the
//! binaries there are now; a broadcast is drained through the drained list, as `streamctl
//! drain` does.

use anyhow::anyhow;
use streaming_core::config::HostConfig;

use super::Fleet;
use crate::cluster::Layout;
use crate::status::{self, HostStatus, PROBE_TIMEOUT};
use crate::{db, hosts, probe, topology};

pub struct LocalFleet {
    layout: Layout,
    configs: Vec<HostConfig>,
    client: reqwest::Client,
    token: Option<String>,
}

impl LocalFleet {
    pub fn new(layout: Layout) -> anyhow::Result<Self> {
        let configs = layout.load_configs()?;
        let client = probe::client(&layout.ca().cert, PROBE_TIMEOUT)?;
        let token = status::ops_token(&configs);
        Ok(Self {
            layout,
            configs,
            client,
            token,
        })
    }
}

impl Fleet for LocalFleet {
    fn configs(&self) -> &[HostConfig] {
        &self.configs
    }

    fn client(&self) -> &reqwest::Client {
        &self.client
    }

    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    async fn statuses(&self) -> anyhow::Result<Vec<HostStatus>> {
        status::collect(&self.layout).await
    }

    async fn prepare(&self, _steps: &[super::Step]) -> anyhow::Result<()> {
        // The binaries are built already (`cargo build`): they are what the hosts restart on.
        Ok(())
    }

    async fn host_ready(&self, _host: &str) -> Result<(), String> {
        // Its processes and health are in the statuses already.
        Ok(())
    }

    async fn drain(&self, host: &str) -> anyhow::Result<()> {
        topology::drain(&self.layout, host, None, &|_| {}).map(|_| ())
    }

    async fn undrain(&self, host: &str) -> anyhow::Result<()> {
        topology::undrain(&self.layout, host).map(|_| ())
    }

    async fn replace(&self, host: &str) -> anyhow::Result<String> {
        let layout = self.layout.clone();
        let host = host.to_owned();
        tokio::task::spawn_blocking(move || hosts::restart(&layout, &host))
            .await
            .map_err(|e| anyhow!("restart task: {e}"))?
    }

    async fn switchover(&self, primary: &str, candidate: &str) -> anyhow::Result<String> {
        // A db host's config holds what a state-changing request needs (certificate, password).
        let asking = self.layout.load_config(candidate)?;
        let leader = asking
            .cluster
            .hosts
            .iter()
            .find(|h| h.name == primary)
            .ok_or_else(|| anyhow!("{primary} is not in the cluster"))?;
        db::switchover(&asking, leader, candidate).await
    }
}
