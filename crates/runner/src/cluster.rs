//! From `cluster.nix` to a local cluster's files: the generator's per-host JSON, certificates,
//! secrets and the state directory layout that every other subcommand reads back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use streaming_core::config::{HostConfig, Role};

use crate::pki::{self, CaFiles, LeafSpec};

/// Where everything of one local cluster lives (`--state`, default `.streamctl`).
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    /// Makes the path absolute (configs and pid files name it) without requiring it to exist.
    pub fn new(state: &Path) -> anyhow::Result<Self> {
        let root = if state.is_absolute() {
            state.to_owned()
        } else {
            std::env::current_dir()?.join(state)
        };
        Ok(Self { root })
    }
    pub fn config_dir(&self) -> PathBuf {
        self.root.join("config")
    }
    pub fn config_file(&self, host: &str) -> PathBuf {
        self.config_dir().join(format!("{host}.json"))
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn pid_file(&self, host: &str) -> PathBuf {
        self.run_dir().join(format!("{host}.pid"))
    }
    /// The supervised service's pid and restart count (not `.pid`: `down` reads those).
    pub fn service_file(&self, host: &str) -> PathBuf {
        self.run_dir().join(format!("{host}.service.json"))
    }
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// stdout + stderr of the host's process (the service's own log is `<host>.log` beside it).
    pub fn out_file(&self, host: &str) -> PathBuf {
        self.log_dir().join(format!("{host}.out"))
    }
    /// Hosts taken out of service by `streamctl drain`, one name a line; applied as
    /// `drain = true` after every evaluation so the flag survives re-generation.
    pub fn drained_file(&self) -> PathBuf {
        self.root.join("drained")
    }
    /// Which cluster file and address prefix the configs were generated from (`up`, `add`).
    pub fn source_file(&self) -> PathBuf {
        self.root.join("source.json")
    }
    pub fn ca(&self) -> CaFiles {
        CaFiles {
            cert: self.root.join("tls/ca.crt"),
            key: self.root.join("tls/ca.key"),
        }
    }

    /// The host configs written by `up`, in start order (db hosts included).
    pub fn load_configs(&self) -> anyhow::Result<Vec<HostConfig>> {
        let dir = self.config_dir();
        let entries = std::fs::read_dir(&dir).with_context(|| {
            format!(
                "no cluster in {} (run `streamctl up` first)",
                self.root.display()
            )
        })?;
        let mut configs = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                configs.push(HostConfig::load(&path)?);
            }
        }
        sort_for_start(&mut configs);
        Ok(configs)
    }

    pub fn load_config(&self, host: &str) -> anyhow::Result<HostConfig> {
        if !streaming_core::config::is_safe_name(host) {
            bail!("{host:?} is not a host name");
        }
        let path = self.config_file(host);
        if !path.exists() {
            bail!(
                "no host {host} in {} (see `streamctl status`)",
                self.root.display()
            );
        }
        Ok(HostConfig::load(&path)?)
    }
}

/// Start order: ingests first (sources publish to them), then sources, broadcasts, LBs.
pub fn start_rank(role: Role) -> u8 {
    match role {
        Role::Db => 0,
        Role::Ingest => 1,
        Role::Source => 2,
        Role::Broadcast => 3,
        Role::Lb => 4,
    }
}

pub fn sort_for_start(configs: &mut [HostConfig]) {
    configs.sort_by(|a, b| {
        (start_rank(a.me().role), &a.name).cmp(&(start_rank(b.me().role), &b.name))
    });
}

/// The generator to evaluate: `nix/generate.nix` beside the cluster file, else in the working
/// directory, else in the source tree streamctl was built from.
pub fn find_generator(cluster_file: &Path) -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = cluster_file.parent() {
        candidates.push(dir.join("nix/generate.nix"));
    }
    candidates.push(std::env::current_dir()?.join("nix/generate.nix"));
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nix/generate.nix"));
    candidates.into_iter().find(|p| p.exists()).context(
        "cannot find nix/generate.nix (beside the cluster file or in the working directory)",
    )
}

/// Evaluates the generator for the local profile; every host's JSON is deserialised and validated.
pub fn evaluate(
    generator: &Path,
    cluster_file: &Path,
    state_dir: &Path,
    address_prefix: &str,
) -> anyhow::Result<BTreeMap<String, HostConfig>> {
    let mut args: Vec<std::ffi::OsString> = vec!["--argstr".into(), "profile".into()];
    args.extend(["local".into(), "--argstr".into(), "stateDir".into()]);
    args.push(state_dir.into());
    args.extend(["--argstr".into(), "addressPrefix".into()]);
    args.push(address_prefix.into());
    run_generator(generator, cluster_file, &args)
}

/// The cluster as production hosts see it (`production` profile: the full ladder, the
/// addresses and uplinks of `cluster.nix`), for planning rather than running.
pub fn evaluate_production(
    generator: &Path,
    cluster_file: &Path,
) -> anyhow::Result<streaming_core::config::ClusterConfig> {
    evaluate_production_configs(generator, cluster_file)?
        .into_values()
        .next()
        .map(|c| c.cluster)
        .context("the cluster file declares no host")
}

/// Every host's config as the production profile generates it (what NixOS hosts run).
pub fn evaluate_production_configs(
    generator: &Path,
    cluster_file: &Path,
) -> anyhow::Result<BTreeMap<String, HostConfig>> {
    run_generator(
        generator,
        cluster_file,
        &["--argstr".into(), "profile".into(), "production".into()],
    )
}

fn run_generator(
    generator: &Path,
    cluster_file: &Path,
    profile_args: &[std::ffi::OsString],
) -> anyhow::Result<BTreeMap<String, HostConfig>> {
    let cluster_file = std::fs::canonicalize(cluster_file)
        .with_context(|| format!("cluster file {}", cluster_file.display()))?;
    let output = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(generator)
        .arg("--arg")
        .arg("cluster")
        .arg(format!("import {}", nix_path(&cluster_file)?))
        .args(profile_args)
        .output()
        .context("cannot run nix-instantiate (Debian: apt install nix-bin)")?;
    if !output.status.success() {
        bail!(
            "nix-instantiate failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let configs: BTreeMap<String, HostConfig> = serde_json::from_slice(&output.stdout)
        .context("generator output is not a map of host configs")?;
    for (name, config) in &configs {
        if name != &config.name {
            bail!(
                "generator: entry {name} holds the config of {}",
                config.name
            );
        }
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("generator: host {name}: {e}"))?;
    }
    Ok(configs)
}

/// The drained host names in a `drained` file's text (blank lines, `#` comments and names
/// that cannot be hosts are skipped).
pub fn parse_drained(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| streaming_core::config::is_safe_name(l))
        .map(str::to_owned)
        .collect()
}

pub fn read_drained(layout: &Layout) -> anyhow::Result<BTreeSet<String>> {
    match std::fs::read_to_string(layout.drained_file()) {
        Ok(text) => Ok(parse_drained(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", layout.drained_file().display())),
    }
}

pub fn write_drained(layout: &Layout, drained: &BTreeSet<String>) -> anyhow::Result<()> {
    let mut text =
        String::from("# hosts drained by `streamctl drain` (`streamctl add NAME` undoes)\n");
    for name in drained {
        text.push_str(name);
        text.push('\n');
    }
    crate::files::write_file(&layout.drained_file(), text.as_bytes(), false)
        .with_context(|| format!("write {}", layout.drained_file().display()))
}

/// Sets `drain` on the drained hosts' entries in every host's cluster view (each host sees the
/// whole cluster: LBs read it to stop assigning, the host itself to refuse playlists).
pub fn apply_drained(configs: &mut BTreeMap<String, HostConfig>, drained: &BTreeSet<String>) {
    for config in configs.values_mut() {
        for host in &mut config.cluster.hosts {
            host.drain = host.drain || drained.contains(&host.name);
        }
    }
}

/// What the configs of a state dir were generated from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Source {
    pub cluster: PathBuf,
    pub address_prefix: String,
}

impl Source {
    /// The recorded source, with `cluster`/`prefix` overriding it. Without a record (a cluster
    /// started by an older streamctl) the prefix comes from the configs' addresses.
    pub fn resolve(
        layout: &Layout,
        cluster: Option<&Path>,
        prefix: Option<&str>,
    ) -> anyhow::Result<Self> {
        let recorded: Option<Source> = std::fs::read(layout.source_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let derived_prefix = || -> Option<String> {
            let configs = layout.load_configs().ok()?;
            let address = configs.first()?.me().address.to_string();
            let mut octets = address.split('.');
            Some(format!("{}.{}", octets.next()?, octets.next()?))
        };
        let cluster = match (cluster, &recorded) {
            (Some(c), _) => c.to_owned(),
            (None, Some(r)) => r.cluster.clone(),
            (None, None) => PathBuf::from("cluster.nix"),
        };
        let address_prefix = match (prefix, &recorded) {
            (Some(p), _) => p.to_owned(),
            (None, Some(r)) => r.address_prefix.clone(),
            (None, None) => derived_prefix().unwrap_or_else(|| "127.77".to_owned()),
        };
        let cluster = std::fs::canonicalize(&cluster)
            .with_context(|| format!("cluster file {}", cluster.display()))?;
        Ok(Self {
            cluster,
            address_prefix,
        })
    }

    pub fn save(&self, layout: &Layout) -> anyhow::Result<()> {
        crate::files::write_file(
            &layout.source_file(),
            &serde_json::to_vec_pretty(self)?,
            false,
        )
        .with_context(|| format!("write {}", layout.source_file().display()))
    }
}

/// Evaluates the cluster file for this state dir and applies the drained list.
pub fn generate(layout: &Layout, source: &Source) -> anyhow::Result<BTreeMap<String, HostConfig>> {
    let generator = find_generator(&source.cluster)?;
    let mut configs = evaluate(
        &generator,
        &source.cluster,
        &layout.root,
        &source.address_prefix,
    )?;
    apply_drained(&mut configs, &read_drained(layout)?);
    Ok(configs)
}

/// A path as a Nix path literal; Nix paths cannot hold spaces and a few other characters.
pub(crate) fn nix_path(path: &Path) -> anyhow::Result<String> {
    let s = path.to_str().context("cluster file path is not UTF-8")?;
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
    {
        bail!("cluster file path {s:?} has characters a Nix path literal cannot hold");
    }
    Ok(s.to_owned())
}

/// Writes every host's config, the directories it names, certificates and secrets.
pub fn materialise(layout: &Layout, configs: &BTreeMap<String, HostConfig>) -> anyhow::Result<()> {
    for dir in [layout.config_dir(), layout.run_dir(), layout.log_dir()] {
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut leaves = Vec::new();
    for config in configs.values() {
        let me = config.me();
        std::fs::create_dir_all(&config.paths.state_dir)?;
        if let Some(log_dir) = &config.paths.log_dir {
            std::fs::create_dir_all(log_dir)?;
        }
        let mut dns_names = vec![me.fqdn.clone()];
        if me.role == Role::Lb {
            dns_names.push(config.cluster.site.clone());
        }
        leaves.push(LeafSpec {
            host: me.name.clone(),
            address: me.address,
            dns_names,
            cert_path: config.paths.tls_cert.clone(),
            key_path: config.paths.tls_key.clone(),
        });
    }
    let ca = layout.ca();
    if let Some(first) = configs.values().next()
        && first.paths.ca_cert != ca.cert
    {
        bail!(
            "generator puts the CA at {}, streamctl expects {}",
            first.paths.ca_cert.display(),
            ca.cert.display()
        );
    }
    let issued = pki::ensure(&ca, &leaves)?;
    if !issued.is_empty() {
        tracing::info!("issued certificates for {}", issued.join(", "));
    }
    ensure_secrets(configs)?;
    for (name, config) in configs {
        let json = serde_json::to_vec_pretty(config)?;
        crate::files::write_file(&layout.config_file(name), &json, false)?;
    }
    Ok(())
}

/// Random secrets shared by the hosts: token key, cluster key, one stream key per channel, the
/// database passwords (services' role, superuser, replication), the `admin` account's and the
/// metrics token.
/// Existing files are kept (a running publisher keeps its key across `up`s, and PostgreSQL
/// keeps the passwords it was bootstrapped with).
pub fn ensure_secrets(configs: &BTreeMap<String, HostConfig>) -> anyhow::Result<()> {
    let mut files = std::collections::BTreeSet::new();
    for config in configs.values() {
        files.insert(config.paths.token_key.clone());
        files.insert(config.paths.cluster_key.clone());
        files.insert(config.paths.db_password.clone());
        files.insert(config.paths.db_superuser_password.clone());
        files.insert(config.paths.db_replication_password.clone());
        files.insert(config.paths.admin_password.clone());
        files.extend(config.paths.metrics_token.clone());
        for channel in &config.cluster.channels {
            files.insert(
                config
                    .paths
                    .stream_keys_dir
                    .join(format!("{}.key", channel.name)),
            );
        }
    }
    for file in files {
        if !file.exists() {
            crate::files::write_file(&file, format!("{}\n", random_secret()).as_bytes(), true)?;
        }
    }
    Ok(())
}

/// 256 random bits as hex: safe in URLs, headers and ffmpeg arguments without escaping.
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()
            .unwrap()
    }

    #[test]
    fn generator_yields_a_valid_config_for_every_host() {
        let root = repo();
        let state = tempfile::tempdir().unwrap();
        let configs = evaluate(
            &root.join("nix/generate.nix"),
            &root.join("cluster.nix"),
            state.path(),
            "127.80",
        )
        .unwrap();
        // Every host of cluster.nix, each one deserialised (deny_unknown_fields) and validated.
        let listed = Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json"])
            .arg(root.join("cluster.nix"))
            .output()
            .unwrap();
        assert!(listed.status.success());
        let cluster: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
        let names: Vec<_> = cluster["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            configs
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            names.iter().cloned().collect()
        );
        for (name, config) in &configs {
            let me = config.me();
            assert_eq!(&me.name, name);
            assert!(
                me.address.to_string().starts_with("127.80."),
                "{name}: {}",
                me.address
            );
            assert_eq!(config.paths.ca_cert, state.path().join("tls/ca.crt"));
            assert!(config.paths.state_dir.starts_with(state.path()));
        }
        // Both db hosts archive into the one repository under the state dir, each through its
        // own pgbackrest.conf, which names its own data directory and socket.
        for db in ["db1", "db2"] {
            let config = &configs[db];
            let backup = crate::db::pgbackrest(config).unwrap();
            assert_eq!(backup.repo_path, Some(state.path().join("backup/repo")));
            let parameters = &config.patroni.as_ref().unwrap()["postgresql"]["parameters"];
            assert_eq!(parameters["archive_mode"], "on");
            assert_eq!(
                parameters["archive_command"].as_str().unwrap(),
                format!(
                    "test ! -e {}/archive/{}/archive.info || pgbackrest --config={} --stanza={} \
                     archive-push %p",
                    state.path().join("backup/repo").display(),
                    backup.stanza,
                    backup.config_file.display(),
                    backup.stanza
                )
            );
            let data = config.paths.state_dir.join("pgdata");
            assert!(backup.text.contains("[global]\n"), "{}", backup.text);
            assert!(
                backup.text.contains(&format!(
                    "[{}]\npg1-path={}\n",
                    backup.stanza,
                    data.display()
                )),
                "{}",
                backup.text
            );
            assert!(configs["lb1"].pgbackrest.is_none());
        }
        let source1 = &configs["source1"];
        assert_eq!(source1.me().address.to_string(), "127.80.5.1");
        assert_eq!(source1.cluster.channel("test").unwrap().preset, "ultrafast");
    }

    #[test]
    fn drained_list_survives_regeneration() {
        let state = tempfile::tempdir().unwrap();
        let layout = Layout::new(state.path()).unwrap();
        assert!(read_drained(&layout).unwrap().is_empty());
        assert_eq!(
            parse_drained("# c\nbroadcast3\n\n  lb1  # why\n../x\nbroadcast3\n"),
            ["broadcast3".to_owned(), "lb1".to_owned()].into()
        );
        let drained: BTreeSet<String> = ["broadcast3".to_owned()].into();
        write_drained(&layout, &drained).unwrap();
        assert_eq!(read_drained(&layout).unwrap(), drained);
        let root = repo();
        std::fs::copy(root.join("cluster.nix"), state.path().join("cluster.nix")).unwrap();
        std::fs::create_dir_all(state.path().join("nix")).unwrap();
        std::fs::copy(
            root.join("nix/generate.nix"),
            state.path().join("nix/generate.nix"),
        )
        .unwrap();
        let source = Source::resolve(
            &layout,
            Some(&state.path().join("cluster.nix")),
            Some("127.80"),
        )
        .unwrap();
        source.save(&layout).unwrap();
        assert_eq!(Source::resolve(&layout, None, None).unwrap(), source);
        let configs = generate(&layout, &source).unwrap();
        for config in configs.values() {
            for host in &config.cluster.hosts {
                assert_eq!(
                    host.drain,
                    host.name == "broadcast3",
                    "{}: {}",
                    config.name,
                    host.name
                );
            }
        }
    }

    #[test]
    fn materialise_writes_configs_certs_and_private_secrets() {
        use std::os::unix::fs::PermissionsExt;
        let root = repo();
        let state = tempfile::tempdir().unwrap();
        let layout = Layout::new(state.path()).unwrap();
        let configs = evaluate(
            &root.join("nix/generate.nix"),
            &root.join("cluster.nix"),
            &layout.root,
            "127.80",
        )
        .unwrap();
        materialise(&layout, &configs).unwrap();
        let loaded = layout.load_configs().unwrap();
        assert_eq!(loaded.len(), configs.len());
        assert_eq!(loaded.first().unwrap().me().role, Role::Db);
        assert_eq!(loaded.last().unwrap().me().role, Role::Lb);
        let key = state.path().join("secrets/stream-keys/test.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let db1 = &configs["db1"].paths;
        for secret in [
            &db1.db_password,
            &db1.db_superuser_password,
            &db1.db_replication_password,
            &db1.admin_password,
        ] {
            let meta = std::fs::metadata(secret).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{secret:?}");
            assert_eq!(
                streaming_core::secrets::read_secret(secret).unwrap().len(),
                64
            );
        }
        let before = std::fs::read_to_string(&key).unwrap();
        materialise(&layout, &configs).unwrap();
        assert_eq!(
            before,
            std::fs::read_to_string(&key).unwrap(),
            "secrets are kept across runs"
        );
        let ca = std::fs::read_to_string(layout.ca().cert).unwrap();
        for config in configs.values() {
            let leaf = std::fs::read_to_string(&config.paths.tls_cert).unwrap();
            let ip = rustls_pki_types::ServerName::IpAddress(config.me().address.into());
            assert!(pki::verifies(&ca, &leaf, &[ip]), "{}", config.name);
        }
    }
}
