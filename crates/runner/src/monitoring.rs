//! `streamctl up --monitoring`: Debian's Prometheus watching the local cluster with what
//! `nix/monitoring.nix` generates for it (the scrape jobs, the metrics token and CA paths of
//! the local profile, the alert rules a NixOS host flagged `monitoring = true` runs), listening
//! on that host's local address. Grafana is not in Debian 12: its dashboards are written beside
//! for a Grafana run by hand (docs/monitoring.md).
//!
//! Prometheus runs in a process group of its own with its pid in `<state>/monitoring/`, so
//! `streamctl down` stops it with the hosts; a second `up --monitoring` reloads its
//! configuration (SIGHUP) instead of starting another.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::cluster::{Layout, Source, nix_path};
use crate::procs;

/// Prometheus's port on the monitoring host's address.
pub const PORT: u16 = 9090;
/// How long Prometheus keeps samples locally: a local cluster lives for hours, not weeks.
const RETENTION: &str = "2d";

/// Where the monitoring files of a state dir live.
pub fn dir(layout: &Layout) -> PathBuf {
    layout.root.join("monitoring")
}

fn pid_file(layout: &Layout) -> PathBuf {
    dir(layout).join("prometheus.pid")
}

/// The running Prometheus of this state dir, if any (its pid, if that process still reads this
/// state dir's configuration: pids are recycled).
pub fn running(layout: &Layout) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(layout))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid <= 1 || procs::liveness(pid) == procs::Liveness::Dead {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let config = format!(
        "--config.file={}",
        dir(layout).join("prometheus.yml").display()
    );
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == config.as_bytes())
        .then_some(pid)
}

/// Writes `prometheus.yml`, `alerts.rules.json` and `dashboards.json` for the local cluster,
/// then starts Prometheus (or has the running one reload them). Returns its URL.
pub fn start(layout: &Layout, source: &Source) -> anyhow::Result<String> {
    let binary = procs::which("prometheus").context(
        "prometheus is not installed (Debian: apt-get install --no-install-recommends \
         prometheus; scripts/setup-debian.sh does it)",
    )?;
    let dir = dir(layout);
    std::fs::create_dir_all(dir.join("data"))
        .with_context(|| format!("create {}", dir.display()))?;
    let address: Option<String> =
        serde_json::from_slice(&evaluate(source, layout, "monitoringAddress")?)
            .context("monitoringAddress is not a string or null")?;
    let Some(address) = address else {
        bail!("no host of the cluster file has `monitoring = true;`: say where Prometheus runs");
    };
    for (attr, file) in [
        ("prometheus", "prometheus.yml"),
        ("rules", "alerts.rules.json"),
        ("dashboards", "dashboards.json"),
    ] {
        let json = evaluate(source, layout, attr)?;
        crate::files::write_file(&dir.join(file), &json, false)
            .with_context(|| format!("write {}", dir.join(file).display()))?;
    }
    let url = format!("http://{address}:{PORT}");
    if let Some(pid) = running(layout) {
        procs::signal_pid(pid, libc::SIGHUP);
        return Ok(url);
    }
    spawn(layout, &binary, &format!("{address}:{PORT}"))?;
    Ok(url)
}

/// Stops the Prometheus of this state dir; `None` when none ran.
pub fn stop(layout: &Layout) -> Option<String> {
    let pid = running(layout)?;
    let stopped = procs::stop_group(pid, Duration::from_secs(10));
    let _ = std::fs::remove_file(pid_file(layout));
    Some(if stopped {
        format!("prometheus (pid {pid}): stopped")
    } else {
        format!("prometheus (pid {pid}): still running after SIGKILL")
    })
}

fn spawn(layout: &Layout, binary: &Path, listen: &str) -> anyhow::Result<()> {
    let dir = dir(layout);
    let out_path = layout.log_dir().join("prometheus.out");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out_path)
        .with_context(|| format!("open {}", out_path.display()))?;
    let child = Command::new(binary)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--storage.tsdb.retention.time={RETENTION}"))
        .arg(format!("--web.listen-address={listen}"))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {}", binary.display()))?;
    let pid = child.id();
    // Not waited for: it outlives this command; `down` finds it by its pid file.
    drop(child);
    crate::files::write_file(&pid_file(layout), format!("{pid}\n").as_bytes(), false)
        .context("write prometheus.pid")
}

/// One attribute of `nix/monitoring.nix` for the local cluster of `source`, as JSON.
fn evaluate(source: &Source, layout: &Layout, attr: &str) -> anyhow::Result<Vec<u8>> {
    let generator = crate::cluster::find_generator(&source.cluster)?;
    let monitoring = generator.with_file_name("monitoring.nix");
    let output = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(&monitoring)
        .args(["-A", attr, "--arg", "cluster"])
        .arg(format!("import {}", nix_path(&source.cluster)?))
        .args(["--argstr", "profile", "local", "--argstr", "stateDir"])
        .arg(&layout.root)
        .args(["--argstr", "addressPrefix", &source.address_prefix])
        .output()
        .context("cannot run nix-instantiate (Debian: apt install nix-bin)")?;
    if !output.status.success() {
        bail!(
            "nix-instantiate {} -A {attr} failed: {}",
            monitoring.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}
