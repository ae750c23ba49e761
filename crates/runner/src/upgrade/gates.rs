//! When a rolling upgrade may touch the next host: the cluster is whole (every host up and
//! healthy, the database primary streaming to every replica) and, beyond what `status` shows,
//! every etcd member healthy, a synchronous standby in place, every ingest live on every
//! channel from its preferred source (back on the one timeline), and every LB seeing every broadcast live. The same gate
//! runs before the first host, so an upgrade never starts on a cluster that could not lose one.

use serde::Deserialize;
use streaming_core::config::{ClusterConfig, HostConfig, Role};
use streaming_core::patroni::Check;
use streaming_core::status::IngestStatus;

use crate::status::HostStatus;
use crate::{db, probe, whole};

/// A broadcast as an LB's `/status` lists it.
#[derive(Debug, Deserialize)]
struct LbView {
    broadcasts: Vec<LbBroadcast>,
}

#[derive(Debug, Deserialize)]
struct LbBroadcast {
    name: String,
    live: Option<bool>,
    last_error: Option<String>,
}

/// What the gates ask with: the cluster's configs (any host's holds the whole cluster; its CA
/// and ops token paths are this machine's), a client trusting the cluster's certificates.
pub struct Probe<'a> {
    pub configs: &'a [HostConfig],
    pub client: &'a reqwest::Client,
    pub token: Option<&'a str>,
}

/// `Ok` when the cluster may lose its next host, `hosts` being every host's status now; else
/// what is missing.
pub async fn ready(hosts: &[HostStatus], probe: &Probe<'_>) -> Result<(), String> {
    let mut missing = whole::missing(hosts, &[]);
    missing.extend(
        hosts
            .iter()
            .filter(|h| h.etcd.as_deref().is_some_and(|e| e != "ok"))
            .map(|h| format!("{} etcd: {}", h.name, h.etcd.as_deref().unwrap_or_default())),
    );
    if !missing.is_empty() {
        return Err(missing.join(", "));
    }
    // Every config holds the whole cluster view.
    let Some(cluster) = probe.configs.first().map(|c| &c.cluster) else {
        return Ok(());
    };
    let (standby, ingests, lbs) = futures::join!(
        synchronous_standby(probe.configs),
        ingests_live(probe, cluster),
        lbs_see_broadcasts(probe, cluster),
    );
    missing.extend(standby.err());
    missing.extend(ingests);
    missing.extend(lbs);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join(", "))
    }
}

/// With two db hosts or more, one replica is the synchronous standby (the one a switchover
/// or failover promotes without losing an acknowledged commit).
async fn synchronous_standby(configs: &[HostConfig]) -> Result<(), String> {
    let Some(any) = configs.first() else {
        return Ok(());
    };
    let dbs: Vec<_> = any.cluster.hosts_with_role(Role::Db).collect();
    if dbs.len() < 2 {
        return Ok(());
    }
    let patroni = db::rest_client(any).map_err(|e| format!("{e:#}"))?;
    for host in &dbs {
        if matches!(patroni.check(host, Check::Sync).await, Ok(true)) {
            return Ok(());
        }
    }
    Err("no synchronous standby".into())
}

/// Every ingest live (not on slate) on every channel and back on the channel's preferred
/// source: a restarted source publishes again, in step with the timeline, before the next goes.
async fn ingests_live(probe: &Probe<'_>, cluster: &ClusterConfig) -> Vec<String> {
    let mut missing = Vec::new();
    for ingest in cluster.hosts_with_role(Role::Ingest) {
        let answer = probe::status::<IngestStatus>(probe.client, &ingest.url, probe.token).await;
        let Some(status) = answer else {
            missing.push(format!("{}: no status", ingest.name));
            continue;
        };
        for channel in &cluster.channels {
            let preferred = cluster
                .hosts_with_role(Role::Source)
                .filter(|s| s.channels.contains(&channel.name))
                .min_by_key(|s| s.priority.unwrap_or(u32::MAX))
                .map(|s| s.name.as_str());
            match status.channels.get(&channel.name) {
                Some(c) if c.live && c.active_source.as_deref() == preferred => {}
                Some(c) => missing.push(format!(
                    "{} on {}: live {}, source {} (wanted {})",
                    ingest.name,
                    channel.name,
                    c.live,
                    c.active_source.as_deref().unwrap_or("none"),
                    preferred.unwrap_or("none")
                )),
                None => missing.push(format!("{} does not know {}", ingest.name, channel.name)),
            }
        }
    }
    missing
}

/// Every LB lists every broadcast as live, with its last poll answered.
async fn lbs_see_broadcasts(probe: &Probe<'_>, cluster: &ClusterConfig) -> Vec<String> {
    let mut missing = Vec::new();
    let broadcasts: Vec<&str> = cluster
        .hosts_with_role(Role::Broadcast)
        .map(|h| h.name.as_str())
        .collect();
    for lb in cluster.hosts_with_role(Role::Lb) {
        let Some(view) = probe::status::<LbView>(probe.client, &lb.url, probe.token).await else {
            missing.push(format!("{}: no status", lb.name));
            continue;
        };
        for name in &broadcasts {
            let seen = view.broadcasts.iter().find(|b| b.name == *name);
            if !seen.is_some_and(|b| b.live == Some(true) && b.last_error.is_none()) {
                missing.push(format!("{} does not see {name} live", lb.name));
            }
        }
    }
    missing
}
