//! NixOS hosts as a [`Fleet`] (`nix run .#deploy`, docs/deploy.md): a host is replaced by
//! deploy-rs switching it to the system the flake builds for it, with deploy-rs's rollbacks
//! on; everything else goes over ssh to root (or `--ssh-user` with sudo) and over HTTPS.
//!
//! - Drain: the broadcast's run-time drain flag (`streaming_core::config::DRAIN_FLAG` in its
//!   state directory) and a reload; no config is redeployed.
//! - After deploy exits 0, the host must still run the new system once deploy-rs's confirm
//!   timeout has passed (a confirmation can be lost and the host roll back by itself,
//!   serokell/deploy-rs#214), and its units must be active.
//! - Switchover: asked on the candidate host itself, which holds the cluster certificate and
//!   the REST password Patroni wants (curl reads the password from a file on stdin, never
//!   from its command line).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use streaming_core::config::{DRAIN_FLAG, HostConfig, HostEntry, Role};
use tokio::process::Command;

use super::Fleet;
use crate::db::sh_quote;
use crate::status::{self, HostStatus, PROBE_TIMEOUT};
use crate::{cluster, probe};

/// deploy-rs's confirm timeout (nix/deploy.nix passes the same on the command line).
const CONFIRM_TIMEOUT_S: u64 = 30;
/// deploy-rs's activation timeout: a db host restarting Patroni and PostgreSQL may be slow.
const ACTIVATION_TIMEOUT_S: u64 = 600;
/// One ssh command (a check, a flag, a reload; a switchover waits for Patroni).
const SSH_TIMEOUT: Duration = Duration::from_secs(90);

pub struct NixosFleet {
    flake: PathBuf,
    ssh_user: String,
    configs: Vec<HostConfig>,
    client: reqwest::Client,
    token: Option<String>,
    /// Each host's new system (`/nix/store/...-nixos-system-...`), once evaluated.
    systems: Mutex<BTreeMap<String, String>>,
}

impl NixosFleet {
    /// The hosts of `<flake>/cluster.nix` as the production profile describes them. `ca` is a
    /// PEM bundle trusting what the hosts serve (the cluster CA, plus the public roots when
    /// they use ACME); `ops_token` the file holding the cluster's ops token (`metrics-token`).
    pub fn new(flake: &Path, ca: &Path, ops_token: &Path, ssh_user: &str) -> anyhow::Result<Self> {
        let cluster_file = flake.join("cluster.nix");
        let generator = cluster::find_generator(&cluster_file)?;
        let mut configs: Vec<HostConfig> =
            cluster::evaluate_production_configs(&generator, &cluster_file)?
                .into_values()
                .collect();
        // The hosts' own paths mean nothing here: this machine's CA and token files instead.
        for config in &mut configs {
            config.paths.ca_cert = ca.to_owned();
            config.paths.metrics_token = Some(ops_token.to_owned());
        }
        let client = probe::client(ca, PROBE_TIMEOUT)?;
        let token = status::ops_token(&configs);
        if token.is_none() {
            bail!("cannot read the ops token from {}", ops_token.display());
        }
        Ok(Self {
            flake: flake.to_owned(),
            ssh_user: ssh_user.to_owned(),
            configs,
            client,
            token,
            systems: Mutex::new(BTreeMap::new()),
        })
    }

    fn entry(&self, host: &str) -> anyhow::Result<&HostEntry> {
        self.configs
            .first()
            .and_then(|c| c.cluster.hosts.iter().find(|h| h.name == host))
            .with_context(|| format!("no host {host} in the cluster"))
    }

    fn config(&self, host: &str) -> anyhow::Result<&HostConfig> {
        self.configs
            .iter()
            .find(|c| c.name == host)
            .with_context(|| format!("no config for {host}"))
    }

    /// Runs `script` as root on `host` (through sudo for another ssh user): its stdout.
    async fn ssh(&self, host: &str, script: &str) -> anyhow::Result<String> {
        let entry = self.entry(host)?;
        let remote = if self.ssh_user == "root" {
            script.to_owned()
        } else {
            format!("sudo -n sh -c {}", sh_quote(script))
        };
        let mut command = Command::new("ssh");
        command
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"])
            .arg(format!("{}@{}", self.ssh_user, entry.fqdn))
            .arg("--")
            .arg(remote)
            .kill_on_drop(true);
        let output = tokio::time::timeout(SSH_TIMEOUT, command.output())
            .await
            .with_context(|| format!("{host}: ssh took over {SSH_TIMEOUT:?}"))?
            .with_context(|| format!("{host}: cannot run ssh"))?;
        if !output.status.success() {
            bail!("{host}: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// The store path of the system the flake builds for `host` (built, so deploy-rs's own
    /// build is then a no-op).
    async fn new_system(&self, host: &str) -> anyhow::Result<String> {
        if let Some(path) = self.known_system(host) {
            return Ok(path);
        }
        let attr = format!(
            "{}#nixosConfigurations.{host}.config.system.build.toplevel",
            self.flake.display()
        );
        let output = Command::new("nix")
            .args(["build", "--no-link", "--print-out-paths"])
            .arg(&attr)
            .output()
            .await
            .context("cannot run nix")?;
        if !output.status.success() {
            bail!(
                "{host}: its system does not build: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        self.systems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(host.to_owned(), path.clone());
        Ok(path)
    }

    fn known_system(&self, host: &str) -> Option<String> {
        self.systems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(host)
            .cloned()
    }

    async fn current_system(&self, host: &str) -> anyhow::Result<String> {
        self.ssh(host, "readlink -f /run/current-system").await
    }

    /// The units a host of this role must have active.
    fn units(entry: &HostEntry) -> Vec<String> {
        let mut units = match entry.role {
            Role::Db => vec!["patroni.service".to_owned(), "etcd.service".to_owned()],
            role => vec![format!("streaming-{}.service", role.as_str())],
        };
        if entry.etcd_witness {
            units.push("etcd.service".to_owned());
        }
        units
    }
}

impl Fleet for NixosFleet {
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
        Ok(status::collect_remote(&self.configs, &self.client, self.token.as_deref()).await)
    }

    async fn prepare(&self, steps: &[super::Step]) -> anyhow::Result<()> {
        // A host that does not build stops the rollout before anything changed.
        for step in steps {
            self.new_system(&step.host).await?;
        }
        Ok(())
    }

    async fn host_ready(&self, host: &str) -> Result<(), String> {
        let entry = self.entry(host).map_err(|e| format!("{e:#}"))?;
        let units = Self::units(entry).join(" ");
        self.ssh(host, &format!("systemctl is-active --quiet {units}"))
            .await
            .map_err(|e| format!("{host}: not every unit of {units} is active ({e:#})"))?;
        let wanted = self.known_system(host);
        if let Some(wanted) = wanted {
            let current = self
                .current_system(host)
                .await
                .map_err(|e| format!("{e:#}"))?;
            if current != wanted {
                return Err(format!("{host} runs {current}, not {wanted}"));
            }
        }
        Ok(())
    }

    async fn drain(&self, host: &str) -> anyhow::Result<()> {
        let flag = self.config(host)?.paths.state_dir.join(DRAIN_FLAG);
        let script = format!(
            "touch {} && systemctl reload streaming-broadcast.service",
            sh_quote(&flag.to_string_lossy())
        );
        self.ssh(host, &script).await.map(|_| ())
    }

    async fn undrain(&self, host: &str) -> anyhow::Result<()> {
        let flag = self.config(host)?.paths.state_dir.join(DRAIN_FLAG);
        let script = format!(
            "rm -f {} && systemctl reload streaming-broadcast.service",
            sh_quote(&flag.to_string_lossy())
        );
        self.ssh(host, &script).await.map(|_| ())
    }

    async fn replace(&self, host: &str) -> anyhow::Result<String> {
        let wanted = self.new_system(host).await?;
        if self.current_system(host).await? == wanted {
            return Ok(format!("{host}: already on {wanted}"));
        }
        let status = Command::new("deploy")
            .args(deploy_args(&self.flake, host, &self.ssh_user))
            .status()
            .await
            .context("cannot run deploy (deploy-rs: nix run .#deploy puts it on PATH)")?;
        if !status.success() {
            bail!("{host}: deploy failed ({status}); deploy-rs rolled it back if it had switched");
        }
        // The host waits this long for a confirmation it may have missed (then rolls back).
        tokio::time::sleep(Duration::from_secs(CONFIRM_TIMEOUT_S + 5)).await;
        let current = self.current_system(host).await?;
        if current != wanted {
            bail!("{host}: rolled itself back to {current} after deploy reported success");
        }
        Ok(format!("{host}: switched to {wanted}"))
    }

    async fn switchover(&self, primary: &str, candidate: &str) -> anyhow::Result<String> {
        let asking = self.config(candidate)?;
        let leader = self.entry(primary)?;
        let restapi = asking
            .patroni
            .as_ref()
            .and_then(|p| p.get("restapi"))
            .context("the candidate has no Patroni REST settings")?;
        let file = |key: &str| -> anyhow::Result<String> {
            restapi
                .get(key)
                .and_then(|v| v.as_str())
                .map(sh_quote)
                .with_context(|| format!("patroni.restapi.{key}"))
        };
        let body = serde_json::json!({"leader": primary, "candidate": candidate}).to_string();
        let script = format!(
            "{{ printf 'user = \"{user}:'; cat {password}; printf '\"\\n'; }} | curl -sS \
             --fail-with-body -K - --max-time 60 --cacert {ca} --cert {cert} --key {key} \
             -H 'Content-Type: application/json' -d {body} https://{addr}/switchover",
            user = crate::db::RESTAPI_USER,
            password = sh_quote(&asking.paths.db_superuser_password.to_string_lossy()),
            ca = file("cafile")?,
            cert = file("certfile")?,
            key = file("keyfile")?,
            body = sh_quote(&body),
            addr = leader.socket(leader.ports.patroni),
        );
        self.ssh(candidate, &script).await
    }
}

/// deploy-rs for one host, rollbacks on, no flake check (docs/deploy.md, nix/deploy.nix).
fn deploy_args(flake: &Path, host: &str, ssh_user: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "--skip-checks",
        "--magic-rollback",
        "true",
        "--auto-rollback",
        "true",
        "--confirm-timeout",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(CONFIRM_TIMEOUT_S.to_string());
    args.push("--activation-timeout".into());
    args.push(ACTIVATION_TIMEOUT_S.to_string());
    if ssh_user != "root" {
        args.push("--ssh-user".into());
        args.push(ssh_user.to_owned());
    }
    args.push(format!("{}#{host}.system", flake.display()));
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_with_rollbacks_and_the_target_last() {
        assert_eq!(
            deploy_args(Path::new("/src/cluster"), "broadcast3", "root").join(" "),
            "--skip-checks --magic-rollback true --auto-rollback true --confirm-timeout 30 \
             --activation-timeout 600 /src/cluster#broadcast3.system"
        );
        let other = deploy_args(Path::new("."), "db1", "ops");
        assert_eq!(
            other[other.len() - 3..],
            ["--ssh-user", "ops", ".#db1.system"]
        );
    }

    #[test]
    fn units_per_role() {
        let entry = |role: &str, witness: bool| -> HostEntry {
            let mut json = streaming_core::fixture::host("x1", role, "127.0.0.1");
            json["etcd_witness"] = witness.into();
            serde_json::from_value(json).unwrap()
        };
        assert_eq!(
            NixosFleet::units(&entry("db", false)),
            ["patroni.service", "etcd.service"]
        );
        assert_eq!(
            NixosFleet::units(&entry("lb", true)),
            ["streaming-lb.service", "etcd.service"]
        );
        assert_eq!(
            NixosFleet::units(&entry("broadcast", false)),
            ["streaming-broadcast.service"]
        );
    }
}
