//! The broadcast edge: pulls each channel's HLS renditions from the ingests into a short
//! in-memory window and serves playlists and segments straight to viewers over HTTPS, with the
//! viewer page, token checks, and the `/status` the LBs balance on.

pub mod pull;
pub mod routes;
pub mod state;
pub mod steering;
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
    let client = streaming_core::tls::peer_client(&config.paths.ca_cert, PEER_TIMEOUT)
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
        let mut reloads = ctx.lifecycle.reloads();
        let ctx_path = ctx.config_path.clone();
        tokio::spawn(async move {
            while reloads.changed().await.is_ok() {
                let reloaded = HostConfig::load(&ctx_path)
                    .map_err(anyhow::Error::from)
                    .and_then(|config| {
                        if config.name != bc.name {
                            anyhow::bail!(
                                "config now names host {:?}, not {:?}",
                                config.name,
                                bc.name
                            );
                        }
                        let (signer, key, client) = load_secrets(&config)?;
                        Ok((config, signer, key, client))
                    });
                match reloaded {
                    Ok((config, signer, key, client)) => {
                        let drain = config.me().drain;
                        if let Err(e) =
                            chat.reload(&config, streaming_core::http::cluster_origins(&config))
                        {
                            tracing::error!("chat reload failed, keeping its previous keys: {e:#}");
                        }
                        bc.replace(config, signer, key, client);
                        pull::spawn_missing(&bc, &lifecycle);
                        tracing::info!(drain, "config and secrets reloaded");
                    }
                    Err(e) => tracing::error!("reload failed, keeping the previous config: {e:#}"),
                }
            }
        });
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
        let served = ctx.serve_https(app).await;
        if served.is_err() {
            // Nothing else would end the wait for the chat sockets.
            ctx.lifecycle.request_shutdown();
        }
        served
    };
    let (served, ()) = tokio::join!(serving, chat.closed());
    served
}
