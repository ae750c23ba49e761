//! The settings and files of a db host: Patroni's and etcd's settings, PostgreSQL's directories, and
//! postgres-owned copies of what it must read.

use std::path::{Path, PathBuf};

use anyhow::Context;

use serde_json::{Value, json};
use streaming_core::config::{EtcdConfig, HostConfig, HostPaths};

use super::PG_BIN_DIR;
use crate::cluster::Layout;

/// Patroni's config file (JSON is YAML).
pub fn patroni_file(config: &HostConfig) -> PathBuf {
    config.paths.state_dir.join("patroni.yml")
}

/// The script Patroni runs once after initdb (`bootstrap.post_bootstrap`).
pub fn post_bootstrap_file(config: &HostConfig) -> PathBuf {
    config.paths.state_dir.join("post-bootstrap.sh")
}

/// The postgres-owned copy of the services' password that the post-bootstrap script reads.
pub fn app_password_copy(config: &HostConfig) -> PathBuf {
    config.paths.state_dir.join("app-password")
}

/// The host's certificate, key and CA as Patroni and PostgreSQL must read them (postgres-owned
/// copies named in the generator's patroni section): (source, copy) pairs.
pub fn db_tls_files(config: &HostConfig) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let patroni = config
        .patroni
        .as_ref()
        .with_context(|| format!("{} has no patroni section", config.name))?;
    let restapi = &patroni["restapi"];
    [
        (&config.paths.tls_cert, "certfile"),
        (&config.paths.tls_key, "keyfile"),
        (&config.paths.ca_cert, "cafile"),
    ]
    .into_iter()
    .map(|(source, key)| {
        let copy = restapi[key]
            .as_str()
            .with_context(|| format!("{}: patroni.restapi.{key} is missing", config.name))?;
        Ok((source.clone(), PathBuf::from(copy)))
    })
    .collect()
}

/// While this file exists the host's supervisor does not start Patroni (etcd only): `restore`
/// holds both db hosts so while it rebuilds the data directory and clears the DCS.
pub fn patroni_hold_file(config: &HostConfig) -> PathBuf {
    config.paths.state_dir.join("patroni.hold")
}

/// pgBackRest's settings of a db host (the generator's `pgbackrest` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pgbackrest {
    pub stanza: String,
    pub config_file: PathBuf,
    /// The repository (`repo1-path`), when it is a directory.
    pub repo_path: Option<PathBuf>,
    /// Directories pgBackRest writes (lock, log, spool): the postgres user's.
    pub own_dirs: Vec<PathBuf>,
    /// pgbackrest.conf's text.
    pub text: String,
}

pub fn pgbackrest(config: &HostConfig) -> anyhow::Result<Pgbackrest> {
    let section = config
        .pgbackrest
        .as_ref()
        .with_context(|| format!("{} has no pgbackrest section", config.name))?;
    let field = |key: &str| {
        section[key]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{}: pgbackrest.{key} is missing", config.name))
    };
    let stanza = field("stanza")?;
    let render = |object: &Value| -> String {
        object
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}\n"),
                other => format!("{k}={other}\n"),
            })
            .collect()
    };
    let global = &section["global"];
    let text = format!(
        "# Written by streamctl from the generator's pgbackrest section.\n[global]\n{}\n[{stanza}]\n{}",
        render(global),
        render(&section["stanza_options"])
    );
    let own_dirs = ["lock-path", "log-path", "spool-path"]
        .into_iter()
        .filter_map(|k| global[k].as_str().map(PathBuf::from))
        .collect();
    Ok(Pgbackrest {
        stanza,
        config_file: field("config_file")?.into(),
        repo_path: global["repo1-path"].as_str().map(PathBuf::from),
        own_dirs,
        text,
    })
}

/// etcd's own output (verbose JSON lines), beside the host's `.out` file.
pub fn etcd_log_file(config: &HostConfig) -> PathBuf {
    let dir = config
        .paths
        .log_dir
        .clone()
        .unwrap_or_else(|| config.paths.state_dir.clone());
    dir.join(format!("{}-etcd.out", config.name))
}

/// The log files worth reading when the host's database does not come up.
pub fn log_files(layout: &Layout, config: &HostConfig) -> Vec<PathBuf> {
    let mut files = vec![layout.out_file(&config.name)];
    if config.etcd.is_some() {
        files.push(etcd_log_file(config));
    }
    files
}

/// PostgreSQL's directories from the host's `patroni` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgDirs {
    pub data_dir: PathBuf,
    pub socket_dir: Option<PathBuf>,
}

pub fn pg_dirs(config: &HostConfig) -> anyhow::Result<PgDirs> {
    let patroni = config
        .patroni
        .as_ref()
        .with_context(|| format!("{} has no patroni section", config.name))?;
    let postgresql = &patroni["postgresql"];
    let data_dir = postgresql["data_dir"]
        .as_str()
        .with_context(|| format!("{}: patroni.postgresql.data_dir is missing", config.name))?;
    let socket_dir = postgresql["parameters"]["unix_socket_directories"]
        .as_str()
        .and_then(|dirs| dirs.split(',').next())
        .map(|d| PathBuf::from(d.trim()));
    Ok(PgDirs {
        data_dir: data_dir.into(),
        socket_dir,
    })
}

/// PostgreSQL's server binaries: `STREAMCTL_PG_BIN_DIR`, else version 15, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("STREAMCTL_PG_BIN_DIR") {
        return Ok(dir.into());
    }
    let preferred = Path::new(PG_BIN_DIR);
    if preferred.join("postgres").exists() {
        return Ok(preferred.to_owned());
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).context(
        "PostgreSQL server binaries not found in /usr/lib/postgresql/<version>/bin \
         (Debian: apt install postgresql-15, or set STREAMCTL_PG_BIN_DIR)",
    )
}

/// Patroni's configuration for this host: the generator's section plus what depends on this
/// machine (where the server binaries are, the post-bootstrap script).
pub fn patroni_settings(
    config: &HostConfig,
    bin_dir: &Path,
    post_bootstrap: &Path,
) -> anyhow::Result<Value> {
    let mut settings = config
        .patroni
        .clone()
        .with_context(|| format!("{} has no patroni section", config.name))?;
    let object = settings
        .as_object_mut()
        .context("the patroni section is not an object")?;
    for (section, key, value) in [
        ("postgresql", "bin_dir", bin_dir),
        // Patroni splits the command with shlex, so the path is quoted.
        ("bootstrap", "post_bootstrap", post_bootstrap),
    ] {
        let value = if key == "post_bootstrap" {
            sh_quote(&value.to_string_lossy())
        } else {
            value.to_string_lossy().into_owned()
        };
        object
            .entry(section)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .with_context(|| format!("patroni.{section} is not an object"))?
            .insert(key.to_owned(), Value::String(value));
    }
    Ok(settings)
}

/// The post-bootstrap script: creates the services' login role and their database. Patroni
/// runs it as the postgres user with a superuser connection string as `$1`. The password is
/// read by psql itself (backquote into a psql variable, quoted with `:'pw'`), so it appears
/// in no command line.
pub fn post_bootstrap_script(psql: &Path, database: &str, user: &str) -> String {
    format!(
        r#"#!/bin/sh
# Written by streamctl. Patroni runs it once after initdb, as the postgres user, with a
# superuser connection string as $1: it creates the services' role and their database.
set -eu
cd "$(dirname "$0")"
test -s app-password || {{ echo "post-bootstrap: app-password missing" >&2; exit 1; }}
exec {psql} -X -q -v ON_ERROR_STOP=1 -v role={role} -v db={db} -d "$1" <<'SQL'
\set pw `cat app-password`
CREATE ROLE :"role" LOGIN PASSWORD :'pw';
CREATE DATABASE :"db" OWNER :"role";
SQL
"#,
        psql = sh_quote(&psql.to_string_lossy()),
        role = sh_quote(user),
        db = sh_quote(database),
    )
}

/// Single-quotes a word for sh (and Python's shlex).
pub fn sh_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// etcd's flags for one member. With an existing data dir etcd ignores the `--initial-*`
/// flags and simply restarts as the member it was. Clients and peers must show a certificate
/// from the cluster CA; the member shows the host's own to both.
pub fn etcd_args(etcd: &EtcdConfig, paths: &HostPaths) -> Vec<String> {
    let data_dir = etcd.data_dir.to_string_lossy().into_owned();
    let cert = paths.tls_cert.to_string_lossy().into_owned();
    let key = paths.tls_key.to_string_lossy().into_owned();
    let ca = paths.ca_cert.to_string_lossy().into_owned();
    let flags = [
        ("--name", etcd.name.as_str()),
        ("--data-dir", &data_dir),
        ("--listen-client-urls", &etcd.client_url),
        ("--advertise-client-urls", &etcd.client_url),
        ("--listen-peer-urls", &etcd.peer_url),
        ("--initial-advertise-peer-urls", &etcd.peer_url),
        ("--initial-cluster", &etcd.initial_cluster),
        ("--initial-cluster-token", &etcd.cluster_token),
        ("--initial-cluster-state", "new"),
        ("--heartbeat-interval", "100"),
        ("--election-timeout", "1000"),
        ("--logger", "zap"),
        ("--log-outputs", "stderr"),
        ("--cert-file", &cert),
        ("--key-file", &key),
        ("--trusted-ca-file", &ca),
        ("--peer-cert-file", &cert),
        ("--peer-key-file", &key),
        ("--peer-trusted-ca-file", &ca),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_owned(), value.to_owned()]);
    flags
        .chain([
            "--client-cert-auth".to_owned(),
            "--peer-client-cert-auth".to_owned(),
            // A member back from a partition asks before it campaigns: without it (etcd 3.4's
            // default) the terms it ran up alone depose the leader, and the election that
            // follows outlasted Patroni's retry_timeout and demoted a healthy primary.
            "--pre-vote".to_owned(),
        ])
        .collect()
}
