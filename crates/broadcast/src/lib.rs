//! The broadcast edge: pulls each channel's HLS renditions from the ingests into a short
//! in-memory window and serves playlists and segments straight to viewers over HTTPS, with the
//! viewer page, token checks, and the `/status` the LBs balance on.

pub mod player;
pub mod pull;
pub mod routes;
pub mod state;
pub mod steering;
mod take;
pub mod viewers;
pub mod web;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use streaming_core::config::HostConfig;
use streaming_core::secrets::read_secret;
use streaming_core::service::ServiceContext;
use streaming_core::token::TokenSigner;

use crate::state::Broadcast;

/// Upper bound of one peer request; pullers set shorter per-request timeouts.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the secrets and builds the ingest client a config names.
fn load_secrets(config: &HostConfig) -> anyhow::Result<(TokenSigner, String, reqwest::Client)> {
    let token_key = read_secret(&config.paths.token_key)?;
    let cluster_key = read_secret(&config.paths.cluster_key)?;
    let client = streaming_core::client::cluster_client(&config.paths.ca_cert, PEER_TIMEOUT)
        .with_context(|| format!("cluster CA {}", config.paths.ca_cert.display()))?;
    Ok((TokenSigner::new(token_key.as_bytes()), cluster_key, client))
}

/// Runs the broadcast until shutdown.
pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let (signer, cluster_key, client) = load_secrets(&ctx.config)?;
    let bc = Arc::new(Broadcast::new(
        ctx.config.clone(),
        signer,
        cluster_key,
        client,
    ));
    pull::spawn_missing(&bc, &ctx.lifecycle);
    let chat =
        streaming_chat::Chat::start(&ctx.config, bc.allowed_origins(), ctx.lifecycle.clone())
            .context("starting accounts and chat")?;

    // SIGHUP: config (drain flag, ingests, uplink, channels), token and cluster keys, CA.
    {
        let (bc, lifecycle, chat) = (bc.clone(), ctx.lifecycle.clone(), chat.clone());
        tokio::spawn(ctx.reload_loop(move |config| {
            let applied = reload(config, &bc, &chat, &lifecycle);
            std::future::ready(applied)
        }));
    }

    // Viewers leave silently: prune them on a clock so the gauge falls too.
    {
        let (bc, lifecycle) = (bc.clone(), ctx.lifecycle.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = lifecycle.shutdown() => break,
                    _ = tokio::time::sleep(bc.segment_duration()) => { bc.viewer_count(); }
                }
            }
        });
    }

    let app = routes::router(
        routes::App {
            bc,
            metrics: ctx.metrics.clone(),
            ops: streaming_core::ops_auth::for_service(&ctx)?,
        },
        Some(chat.clone()),
    );
    // Chat sockets outlive their HTTP connection (upgraded): they get their Close (1001) too.
    let serving = async {
        // On an error, nothing else would end the wait for the chat sockets.
        ctx.stop_on_error(ctx.serve_https(app).await)
    };
    let (served, ()) = tokio::join!(serving, chat.closed());
    served
}

/// Applies a reloaded config: new secrets and client first (a missing file refuses the whole
/// reload), then chat, then the broadcast's state and any newly named channel's pullers.
fn reload(
    config: HostConfig,
    bc: &Arc<Broadcast>,
    chat: &streaming_chat::Chat,
    lifecycle: &streaming_core::lifecycle::Lifecycle,
) -> anyhow::Result<()> {
    let (signer, key, client) = load_secrets(&config)?;
    let drain = config.me().drain;
    if let Err(e) = chat.reload(&config, streaming_core::http::cluster_origins(&config)) {
        tracing::error!("chat reload failed, keeping its previous keys: {e:#}");
    }
    bc.replace(config, signer, key, client);
    pull::spawn_missing(bc, lifecycle);
    tracing::info!(drain, "config and secrets reloaded");
    Ok(())
}
