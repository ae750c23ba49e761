//! Helpers shared by the end-to-end tests: running the real `streamctl` and stopping the cluster
//! whatever happens to the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn streamctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_streamctl"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Runs a command and fails the test with its output when it fails.
pub fn run(command: &mut Command) -> Output {
    let output = command.output().expect("command starts");
    assert!(
        output.status.success(),
        "{command:?} failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

pub fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// ffmpeg publishing a 320x180 test pattern (H.264, no audio, a keyframe every `gop` frames)
/// to `url` for `seconds`, as an outside publisher would. Not every test binary publishes.
#[allow(dead_code)]
pub fn test_publisher(url: &str, seconds: u32, gop: u32) -> Command {
    let mut ffmpeg = Command::new("ffmpeg");
    ffmpeg
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg("testsrc2=size=320x180:rate=25")
        .args(["-t", &seconds.to_string(), "-g", &gop.to_string()])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-f", "flv"])
        .arg(url);
    ffmpeg
}

/// `streamctl up --json` of a host list (`cluster.nix` of the repository by default) on the
/// loopback addresses `prefix`.*: its report. Not every test binary starts it this way.
#[allow(dead_code)]
pub fn up(state: &Path, prefix: &str, cluster: Option<&Path>) -> Value {
    up_with(state, prefix, cluster, &[])
}

/// [`up`] with more flags (`--monitoring`).
#[allow(dead_code)]
pub fn up_with(state: &Path, prefix: &str, cluster: Option<&Path>, flags: &[&str]) -> Value {
    json_of(&run(streamctl()
        .args(["up", "--json", "--address-prefix", prefix, "--cluster"])
        .arg(cluster.map_or_else(|| repo_root().join("cluster.nix"), Path::to_owned))
        .args(flags)
        .arg("--state")
        .arg(state)))
}

/// Writes `<dir>/cluster.nix`: the repository's host list without the hosts named in
/// `left_out` (a smaller cluster where a test needs fewer hosts), and returns its path. Not
/// every test binary trims the list.
#[allow(dead_code)]
pub fn cluster_without(dir: &Path, left_out: &[&str]) -> PathBuf {
    let full = std::fs::read_to_string(repo_root().join("cluster.nix")).unwrap();
    let trimmed: String = full
        .lines()
        .filter(|line| {
            !left_out
                .iter()
                .any(|h| line.contains(&format!("name = \"{h}\";")))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let path = dir.join("cluster.nix");
    std::fs::write(&path, trimmed).unwrap();
    path
}

/// Stops the cluster of a state dir when dropped, so no process outlives a failing test.
pub struct Cluster {
    pub state: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = streamctl()
            .arg("down")
            .arg("--state")
            .arg(&self.state)
            .output();
    }
}
