//! The services' database: its URL on a given host or the primary, and psql as its role.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use streaming_core::config::{HostConfig, HostEntry, Role};
use streaming_core::secrets::read_secret;

use super::{pg_bin_dir, primary};

fn database_host<'a>(
    configs: &'a [HostConfig],
    host: &str,
) -> anyhow::Result<(&'a HostConfig, &'a HostEntry)> {
    let any = configs.first().context("no host config")?;
    let entry = any
        .cluster
        .host(host)
        .filter(|h| h.role == Role::Db)
        .with_context(|| format!("{host} is not a db host"))?;
    Ok((any, entry))
}

/// `postgres://streaming:<password>@<addr>:5432/streaming?sslmode=verify-full&sslrootcert=<CA>`
/// for a db host: the services' role, password read from the state's secret file, TLS checked
/// against the cluster CA.
pub fn app_database_url(configs: &[HostConfig], host: &str) -> anyhow::Result<String> {
    let (any, entry) = database_host(configs, host)?;
    let password = read_secret(&any.paths.db_password)?;
    let database = &any.cluster.database;
    Ok(format!(
        "postgres://{}:{}@{}/{}?sslmode=verify-full&sslrootcert={}",
        percent_encode(&database.user),
        percent_encode(&password),
        entry.socket(entry.ports.postgres),
        percent_encode(&database.name),
        percent_encode(&any.paths.ca_cert.to_string_lossy())
    ))
}

/// The services' URL of the current primary (see [`primary`]).
pub async fn primary_database_url(configs: &[HostConfig]) -> anyhow::Result<String> {
    let host = primary(configs)
        .await
        .context("no db host answers 200 on /primary")?;
    app_database_url(configs, &host)
}

pub(super) fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Runs SQL with psql as the services' role on a db host and returns its unaligned, tuples-only
/// output, over TLS checked against the cluster CA (`sslmode` overrides that, e.g. `disable` to
/// show that a plaintext connection is refused). The password travels in psql's environment,
/// not its command line. Blocking; a psql that has not finished within `timeout` (a hung
/// server) is killed.
pub fn psql_app(
    configs: &[HostConfig],
    host: &str,
    sql: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    psql_app_with(configs, host, sql, timeout, "verify-full")
}

pub fn psql_app_with(
    configs: &[HostConfig],
    host: &str,
    sql: &str,
    timeout: Duration,
    sslmode: &str,
) -> anyhow::Result<String> {
    let (any, entry) = database_host(configs, host)?;
    let password = read_secret(&any.paths.db_password)?;
    let database = &any.cluster.database;
    let connect_timeout = timeout.as_secs().clamp(2, 30);
    let mut child = Command::new(pg_bin_dir()?.join("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGHOST", entry.address.to_string())
        .env("PGPORT", entry.ports.postgres.to_string())
        .env("PGUSER", &database.user)
        .env("PGDATABASE", &database.name)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", connect_timeout.to_string())
        .env("PGAPPNAME", "streamctl")
        .env("PGSSLMODE", sslmode)
        .env("PGSSLROOTCERT", &any.paths.ca_cert)
        .env_remove("PGPASSFILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start psql")?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("psql on {host} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "psql on {host}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
