//! Serving an axum app over HTTPS with graceful shutdown and certificate reload.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;

use crate::lifecycle::Lifecycle;

/// In-flight requests get this long to finish after SIGTERM.
pub const GRACE_PERIOD: Duration = Duration::from_secs(5);

/// Serves `app` on `addr` until shutdown; re-reads the certificate on every SIGHUP.
pub async fn serve_https(
    app: axum::Router,
    addr: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    lifecycle: Lifecycle,
) -> anyhow::Result<()> {
    let tls = RustlsConfig::from_pem_file(&cert, &key)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "TLS certificate {} / key {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
    let handle = axum_server::Handle::new();
    {
        let (handle, lifecycle, tls) = (handle.clone(), lifecycle.clone(), tls.clone());
        let mut reloads = lifecycle.reloads();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = lifecycle.shutdown() => {
                        handle.graceful_shutdown(Some(GRACE_PERIOD));
                        break;
                    }
                    changed = reloads.changed() => {
                        if changed.is_err() { break; }
                        match tls.reload_from_pem_file(&cert, &key).await {
                            Ok(()) => tracing::info!(cert = %cert.display(), "TLS certificate reloaded"),
                            Err(e) => tracing::error!(cert = %cert.display(), "TLS reload failed, keeping the old certificate: {e}"),
                        }
                    }
                }
            }
        });
    }
    tracing::info!(%addr, "HTTPS listening");
    let server = axum_server::bind_rustls(addr, tls)
        .handle(handle)
        .serve(app.into_make_service_with_connect_info::<SocketAddr>());
    // axum-server announces shutdown with `Notify::notify_waiters`, which a server busy between
    // two accepts can miss (seen on ingests that never exited): past the grace period, stop
    // waiting for it and drop it, which closes the listener and its connections.
    let overdue = async {
        lifecycle.shutdown().await;
        tokio::time::sleep(GRACE_PERIOD + Duration::from_secs(1)).await;
    };
    tokio::select! {
        served = server => served.map_err(|e| anyhow::anyhow!("HTTPS server on {addr}: {e}")),
        () = overdue => {
            tracing::warn!(%addr, "HTTPS server still busy after the grace period: closing it");
            Ok(())
        }
    }
}
