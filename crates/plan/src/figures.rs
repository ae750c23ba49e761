//! The measured costs the planner works from, read from `docs/capacity-figures.json`.
//!
//! Each figure carries the command that measured it, the date and the machine, because a
//! per-core figure only means something next to the machine it came from. A figure nobody
//! measured yet is absent, and the planner says so instead of guessing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum FiguresError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a figures file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The figures file: what one machine measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figures {
    /// The machine every figure below came from (CPU model, cores, memory, OS).
    pub machine: String,
    /// Bytes a broadcast serves to viewers per second per core, in Gbit/s, over HTTPS.
    #[serde(default)]
    pub broadcast_serve_gbps_per_core: Option<Figure>,
    /// Simulated HLS viewers (playlist reloads, every segment, token renewal) one broadcast
    /// core holds with no stall.
    #[serde(default)]
    pub broadcast_viewers_per_core: Option<Figure>,
    /// Ingest cores per million output pixels per second of a ladder, by x264 preset
    /// (decoding the input and the audio included).
    #[serde(default)]
    pub ingest_cores_per_output_mpx_s: BTreeMap<String, Figure>,
    /// LB requests per second per core (`/api/stats`, which every open page asks every 5 s).
    #[serde(default)]
    pub lb_requests_per_second_per_core: Option<Figure>,
}

/// One measured value and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure {
    pub value: f64,
    /// The command that measured it, as run from the repository root.
    pub command: String,
    /// When (YYYY-MM-DD).
    pub measured: String,
    /// What the value covers and what it leaves out.
    #[serde(default)]
    pub note: String,
}

impl Figures {
    pub fn load(path: &Path) -> Result<Self, FiguresError> {
        let text = std::fs::read_to_string(path).map_err(|source| FiguresError::Read {
            path: path.to_owned(),
            source,
        })?;
        let figures: Figures =
            serde_json::from_str(&text).map_err(|source| FiguresError::Parse {
                path: path.to_owned(),
                source,
            })?;
        figures.validate().map_err(|reason| FiguresError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(figures)
    }

    /// Every value is a positive, finite cost: a zero would divide the plan by nothing.
    fn validate(&self) -> Result<(), String> {
        let named = [
            (
                "broadcast_serve_gbps_per_core",
                &self.broadcast_serve_gbps_per_core,
            ),
            (
                "broadcast_viewers_per_core",
                &self.broadcast_viewers_per_core,
            ),
            (
                "lb_requests_per_second_per_core",
                &self.lb_requests_per_second_per_core,
            ),
        ];
        let presets = self.ingest_cores_per_output_mpx_s.iter();
        for (name, figure) in named
            .into_iter()
            .filter_map(|(n, f)| Some((n.to_owned(), f.as_ref()?)))
            .chain(presets.map(|(p, f)| (format!("ingest_cores_per_output_mpx_s.{p}"), f)))
        {
            if !(figure.value.is_finite() && figure.value > 0.0) {
                return Err(format!("{name}: {} is not a positive number", figure.value));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_figures_load() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/capacity-figures.json");
        let figures = Figures::load(&path).unwrap();
        assert!(!figures.machine.is_empty());
    }

    #[test]
    fn a_zero_or_unknown_figure_is_refused() {
        let dir = std::env::temp_dir().join(format!("plan-figures-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.json");
        let figure = r#"{"value": 0, "command": "x", "measured": "2026-12-02"}"#;
        std::fs::write(
            &path,
            format!(r#"{{"machine": "m", "broadcast_serve_gbps_per_core": {figure}}}"#),
        )
        .unwrap();
        let e = Figures::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("broadcast_serve_gbps_per_core: 0 is not a positive"),
            "{e}"
        );
        std::fs::write(&path, r#"{"machine": "m", "egress": 1}"#).unwrap();
        assert!(matches!(
            Figures::load(&path),
            Err(FiguresError::Parse { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
