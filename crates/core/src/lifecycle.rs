//! Shutdown and reload, the same way in every service.
//!
//! SIGTERM or SIGINT starts a graceful shutdown (stop accepting, finish in-flight work); SIGHUP
//! asks the service to re-read its config, secrets and certificates. Tasks hold a [`Lifecycle`]
//! clone and select on [`Lifecycle::shutdown`].

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

#[derive(Clone)]
pub struct Lifecycle {
    shutdown: watch::Receiver<bool>,
    reload: watch::Receiver<u64>,
    trigger: std::sync::Arc<watch::Sender<bool>>,
}

impl Lifecycle {
    /// Listens to the process signals. Must run inside the tokio runtime.
    pub fn from_signals() -> std::io::Result<Self> {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (reload_tx, reload_rx) = watch::channel(0u64);
        let shutdown_tx = std::sync::Arc::new(shutdown_tx);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let tx = shutdown_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                    _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading config, secrets and certificates");
                        reload_tx.send_modify(|n| *n += 1);
                    }
                }
            }
            let _ = tx.send(true);
        });
        Ok(Self {
            shutdown: shutdown_rx,
            reload: reload_rx,
            trigger: shutdown_tx,
        })
    }

    /// Driven only by [`Lifecycle::request_shutdown`], for a server embedded in a test; it
    /// never reloads.
    pub fn manual() -> Self {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (_, reload_rx) = watch::channel(0u64);
        Self {
            shutdown: shutdown_rx,
            reload: reload_rx,
            trigger: std::sync::Arc::new(shutdown_tx),
        }
    }

    /// Resolves once shutdown was asked for (immediately if it already was).
    pub async fn shutdown(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Starts a shutdown from inside the service (fatal error in a task).
    pub fn request_shutdown(&self) {
        let _ = self.trigger.send(true);
    }

    /// A receiver that changes on every SIGHUP.
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reload.clone()
    }
}
