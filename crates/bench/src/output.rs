//! How every bench hands over its report: the Markdown table written to `--out` when given,
//! then either the JSON report (`--json`) or the table on stdout.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// Writes `table` to `out` (if any), then prints `report` as JSON when `json`, else `table`.
pub fn emit<R: Serialize + ?Sized>(
    out: Option<&Path>,
    json: bool,
    table: &str,
    report: &R,
) -> anyhow::Result<()> {
    if let Some(path) = out {
        std::fs::write(path, table).with_context(|| format!("write {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{table}");
    }
    Ok(())
}
