//! The LB: the front door. It hands each viewer a signed sticky token naming one broadcast
//! (chosen by health and free capacity from `/status` polls) and redirects there; it never
//! carries video to viewers. Publishers' RTMP(S) goes through it to a live ingest
//! (`rtmp_front`).

pub mod assign;
pub mod health;
pub mod ingest_health;
pub mod routes;
pub mod rtmp_front;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use streaming_core::config::HostConfig;
use streaming_core::secrets::read_secret;
use streaming_core::service::ServiceContext;
use streaming_core::token::TokenSigner;

use crate::health::{Health, POLL_TIMEOUT};
use crate::routes::{App, Current};
use streaming_core::sync::{read, write};

fn load(config: HostConfig) -> anyhow::Result<Current> {
    let key = read_secret(&config.paths.token_key)?;
    // Leaving from the host's cluster address: ingests and broadcasts answer `/status` to
    // cluster hosts only (on loopback the kernel would pick 127.0.0.1 for every host).
    let client =
        streaming_core::client::cluster_client_builder(&config.paths.ca_cert, POLL_TIMEOUT)
            .and_then(|b| Ok(b.local_address(config.me().address).build()?))
            .with_context(|| format!("cluster CA {}", config.paths.ca_cert.display()))?;
    Ok(Current {
        config: Arc::new(config),
        signer: TokenSigner::new(key.as_bytes()),
        client,
    })
}

/// What a poller reads at each round: the current config and client, so a reload applies from
/// the next round on.
fn poll_view(
    current: &Arc<RwLock<Current>>,
) -> impl Fn() -> (Arc<HostConfig>, reqwest::Client) + use<> {
    let current = current.clone();
    move || {
        let c = read(&current);
        (c.config.clone(), c.client.clone())
    }
}

/// Runs the LB until shutdown.
pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let current = Arc::new(RwLock::new(load(ctx.config.clone())?));
    let health = Arc::new(Health::default());

    tokio::spawn(health::poll_loop(
        health.clone(),
        poll_view(&current),
        ctx.lifecycle.clone(),
    ));
    let ingests = Arc::new(ingest_health::Ingests::default());
    tokio::spawn(ingest_health::poll_loop(
        ingests.clone(),
        poll_view(&current),
        ctx.lifecycle.clone(),
    ));
    let front = rtmp_front::Front::new(
        rtmp_front::FrontConfig::load(Arc::new(ctx.config.clone()))?,
        ingests,
    );

    // SIGHUP: new, removed or drained broadcasts and ingests, the token key and the RTMPS
    // certificate, without a restart.
    {
        let (current, front) = (current.clone(), front.clone());
        tokio::spawn(ctx.reload_loop(move |config| {
            let applied = reload(config, &current, &front);
            std::future::ready(applied)
        }));
    }

    let app = routes::router(App {
        current,
        health,
        metrics: ctx.metrics.clone(),
        ops: streaming_core::ops_auth::for_service(&ctx)?,
        assign_rate: Arc::new(streaming_core::rate_limit::RateLimiter::new(
            "assign",
            ctx.config.cluster.limits.assign_rate,
        )),
    });
    // Give the first poll a moment so the first viewers are not told the cluster is empty.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let me = ctx.config.me();
    let rtmp = rtmp_front::serve(
        me.socket(me.ports.rtmp),
        false,
        front.clone(),
        ctx.lifecycle.clone(),
    );
    let rtmps = rtmp_front::serve(
        me.socket(me.ports.rtmps),
        true,
        front,
        ctx.lifecycle.clone(),
    );
    let result = tokio::try_join!(ctx.serve_https(app), rtmp, rtmps);
    ctx.stop_on_error(result).map(|_| ())
}

/// Applies a reloaded config: the token key, the poll client and the RTMP front's routes,
/// all or nothing.
fn reload(
    config: HostConfig,
    current: &RwLock<Current>,
    front: &rtmp_front::Front,
) -> anyhow::Result<()> {
    let new = load(config)?;
    let front_config = rtmp_front::FrontConfig::load(new.config.clone())?;
    front.reload(front_config);
    let broadcasts = new
        .config
        .cluster
        .hosts_with_role(streaming_core::config::Role::Broadcast)
        .count();
    *write(current) = new;
    tracing::info!(broadcasts, "config and token key reloaded");
    Ok(())
}
