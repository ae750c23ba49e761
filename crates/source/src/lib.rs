//! The source role: a test pattern publisher (bars, burned-in wall clock, channel and host
//! name, a tone) that pushes one encode per channel it publishes to every ingest of the
//! cluster over RTMPS and keeps reconnecting.
//!
//! - [`encode`]: the ffmpeg command (pure, tested without ffmpeg).
//! - [`supervisor`]: the thread that keeps one ffmpeg running, with backoff and a new anchor per
//!   start, and the task that publishes its FLV output to the ingests.
//! - [`encodes`]: one supervisor per channel, started, restarted and stopped on reload.
//! - [`http`]: `/healthz`, `/status` and `/metrics` over HTTPS for `streamctl status`.
//!
//! SIGHUP re-reads the config and the stream keys and restarts a channel's encode only if its
//! ingest list, key or picture changed.

pub mod encode;
pub mod encodes;
pub mod http;
pub mod supervisor;

use std::sync::Arc;

use streaming_core::service::ServiceContext;

use crate::encode::EncodeSpec;
use crate::encodes::Encodes;

/// Runs the source until SIGTERM.
pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let specs = EncodeSpec::all_from_config(&ctx.config)?;
    let encodes = Arc::new(Encodes::start(specs, ctx.lifecycle.clone())?);

    let reload_task = {
        let encodes = encodes.clone();
        tokio::spawn(ctx.reload_loop(move |config| {
            let applied = reload(&config, &encodes);
            std::future::ready(applied)
        }))
    };

    let me = ctx.config.me().clone();
    let app = http::router(http::AppState {
        name: me.name.clone(),
        encodes: encodes.clone(),
        metrics: ctx.metrics.clone(),
        ops: streaming_core::ops_auth::for_service(&ctx)?,
    });
    let served = ctx.serve_https(app).await;
    // Whatever ended the server (shutdown or a bind error), the encodes stop with it.
    ctx.lifecycle.request_shutdown();
    reload_task.abort();
    let _ = reload_task.await;
    tokio::task::spawn_blocking(move || encodes.stop()).await?;
    served
}

/// On SIGHUP: new config + keys; each channel's encode restarts only when something it uses
/// changed.
fn reload(config: &streaming_core::config::HostConfig, encodes: &Encodes) -> anyhow::Result<()> {
    encodes.apply(EncodeSpec::all_from_config(config)?)?;
    Ok(())
}
