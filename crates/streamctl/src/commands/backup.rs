//! `streamctl backup` and `streamctl restore` (streaming_runner::db's pgBackRest functions).

use streaming_runner::cluster::Layout;
use streaming_runner::db;

use crate::cli::{BackupArgs, RestoreArgs};

/// `streamctl backup`.
pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    if args.archive_check {
        let host = db::archive_check(&layout).await?;
        if args.json {
            println!("{}", serde_json::json!({ "archived_on": host }));
        } else {
            println!("{host}: WAL switched and archived (pgbackrest check)");
        }
        return Ok(());
    }
    let report = db::backup(&layout, &args.kind).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mb = |b: Option<u64>| b.map_or("?".to_owned(), |b| format!("{:.1} MB", b as f64 / 1e6));
    println!(
        "{}: {} backup {} in {:.1} s (database {}, stored {})",
        report.host,
        report.kind.as_deref().unwrap_or("?"),
        report.label.as_deref().unwrap_or("?"),
        report.seconds,
        mb(report.database_bytes),
        mb(report.repository_bytes)
    );
    print!("{}", report.info_text);
    Ok(())
}

/// `streamctl restore`.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let report = db::restore(&layout, &args.to, args.host.as_deref()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let secs = |s: Option<f64>| s.map_or("?".to_owned(), |s| format!("{s:.1} s"));
    println!(
        "{} restored to {}: files {:.1} s, recovery {:.1} s; {} old DCS keys removed; primary \
         after {}, {} streaming after {}",
        report.host,
        report.target,
        report.restore_s,
        report.recovery_s,
        report.dcs_keys_removed,
        secs(report.primary_after_s),
        report.streaming.join(", "),
        secs(report.healthy_after_s)
    );
    for moved in &report.moved_aside {
        println!(
            "kept: {} (delete it once the restore is trusted)",
            moved.display()
        );
    }
    Ok(())
}
