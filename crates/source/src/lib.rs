//! The source role: a test pattern publisher (bars, burned-in wall clock and host name, a tone)
//! that pushes one encode to every ingest of the cluster over RTMPS and keeps reconnecting.
//!
//! - [`encode`]: the ffmpeg command (pure, tested without ffmpeg).
//! - [`supervisor`]: the thread that keeps one ffmpeg running, with backoff and a new anchor per
//!   start, and the task that publishes its FLV output to the ingests.
//! - [`http`]: `/healthz`, `/status` and `/metrics` over HTTPS for `streamctl status`.
//!
//! SIGHUP re-reads the config and the stream key and restarts the encode only if the ingest list,
//! the key or the picture changed.

pub mod encode;
pub mod http;
pub mod supervisor;

use std::sync::Arc;

use streaming_core::service::ServiceContext;

use crate::encode::EncodeSpec;
use crate::supervisor::Supervisor;

/// Runs the source until SIGTERM.
pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let spec = EncodeSpec::from_config(&ctx.config)?;
    tracing::info!(channel = %spec.channel, ingests = spec.ingests.len(), "publishing test pattern");
    let supervisor = Arc::new(Supervisor::start(spec, ctx.lifecycle.clone())?);

    let reload_task = {
        let supervisor = supervisor.clone();
        tokio::spawn(ctx.reload_loop(move |config| {
            let applied = reload(&config, &supervisor);
            std::future::ready(applied)
        }))
    };

    let me = ctx.config.me().clone();
    let app = http::router(http::AppState {
        name: me.name.clone(),
        supervisor: supervisor.clone(),
        metrics: ctx.metrics.clone(),
        ops: streaming_core::ops_auth::for_service(&ctx)?,
    });
    let served = ctx.serve_https(app).await;
    // Whatever ended the server (shutdown or a bind error), the encode stops with it.
    ctx.lifecycle.request_shutdown();
    reload_task.abort();
    let _ = reload_task.await;
    match Arc::try_unwrap(supervisor) {
        Ok(supervisor) => tokio::task::spawn_blocking(move || supervisor.stop()).await?,
        Err(_) => {
            tracing::warn!("supervisor still shared at shutdown; ffmpeg dies with the process")
        }
    }
    served
}

/// On SIGHUP: new config + key; restart the encode only when something it uses changed.
fn reload(
    config: &streaming_core::config::HostConfig,
    supervisor: &Supervisor,
) -> anyhow::Result<()> {
    let spec = EncodeSpec::from_config(config)?;
    if Some(&spec) == supervisor.spec().as_ref() {
        tracing::info!("reload: encode unchanged, ffmpeg keeps running");
    } else {
        tracing::info!(
            ?spec,
            "reload: encode changed (ingests, key or picture), restarting ffmpeg"
        );
        supervisor.replace(spec);
    }
    Ok(())
}
