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

/// Writes `<dir>/cluster.nix`: the repository's host list without the hosts named in
/// `left_out` (a smaller cluster where a test needs fewer hosts), and returns its path. Not
/// every test binary trims the list.
#[allow(dead_code)]
fn cluster_without(dir: &Path, left_out: &[&str]) -> PathBuf {
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

/// A local cluster for one test: a temporary directory with its state (and whatever else the
/// test writes there), stopped by `streamctl down` when dropped, so no process outlives a
/// failing test. Not every test binary starts one.
#[allow(dead_code)]
pub struct LocalCluster {
    pub state: PathBuf,
    dir: tempfile::TempDir,
}

#[allow(dead_code)]
impl LocalCluster {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            state: dir.path().join("state"),
            dir,
        }
    }

    /// The test's temporary directory (the state is its `state` subdirectory).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `streamctl up --json` of a host list (`cluster.nix` of the repository by default) on
    /// the loopback addresses `prefix`.*, with more `flags` (`--monitoring`): its report.
    pub fn up(&self, prefix: &str, cluster: Option<&Path>, flags: &[&str]) -> Value {
        json_of(&run(streamctl()
            .args(["up", "--json", "--address-prefix", prefix, "--cluster"])
            .arg(cluster.map_or_else(|| repo_root().join("cluster.nix"), Path::to_owned))
            .args(flags)
            .arg("--state")
            .arg(&self.state)))
    }

    /// [`Self::up`] of the repository's host list without the hosts named in `left_out`.
    pub fn up_without(&self, prefix: &str, left_out: &[&str]) -> Value {
        let cluster = cluster_without(self.dir(), left_out);
        self.up(prefix, Some(&cluster), &[])
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = streamctl()
            .arg("down")
            .arg("--state")
            .arg(&self.state)
            .output();
    }
}
