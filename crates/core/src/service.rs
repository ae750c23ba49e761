//! The common start of every service binary, so each `main.rs` stays a few lines:
//! parse `--config`, install the crypto provider, load and validate the host config, set up
//! telemetry and metrics, listen for signals, then hand over to the role's library.

use std::path::PathBuf;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{HostConfig, Role};
use crate::lifecycle::Lifecycle;

/// How long blocking threads get to finish once the service's async work is done.
pub const SHUTDOWN_BLOCKING_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Command line shared by every service.
#[derive(Debug, clap::Parser)]
pub struct ServiceArgs {
    /// Host config JSON (generated from cluster.nix by nix/generate.nix).
    #[arg(long, env = "STREAMING_CLUSTER_CONFIG")]
    pub config: PathBuf,
}

/// What a role's `run` function receives.
pub struct ServiceContext {
    /// Re-read this path on SIGHUP ([`ServiceContext::reload_loop`]).
    pub config_path: PathBuf,
    pub config: HostConfig,
    pub lifecycle: Lifecycle,
    pub metrics: PrometheusHandle,
}

impl ServiceContext {
    /// Serves the host's HTTPS app on its address and HTTPS port with its certificate, until
    /// shutdown (certificates re-read on SIGHUP).
    pub fn serve_https(
        &self,
        app: axum::Router,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + use<> {
        let me = self.config.me();
        crate::serve::serve_https(
            app,
            me.socket(me.ports.https),
            self.config.paths.tls_cert.clone(),
            self.config.paths.tls_key.clone(),
            (&self.config.cluster.limits).into(),
            self.lifecycle.clone(),
        )
    }

    /// The one SIGHUP path of every role: on each reload signal, re-read the config
    /// ([`reload_config`]) and hand it to `apply`. A refused config or a failed
    /// `apply` is logged and the service keeps running on what it had. Resolves at shutdown;
    /// spawn it beside the role's servers.
    pub fn reload_loop<F, Fut>(&self, mut apply: F) -> impl Future<Output = ()> + Send + use<F, Fut>
    where
        F: FnMut(HostConfig) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send,
    {
        let lifecycle = self.lifecycle.clone();
        let mut reloads = lifecycle.reloads();
        let path = self.config_path.clone();
        let name = self.config.name.clone();
        async move {
            loop {
                tokio::select! {
                    () = lifecycle.shutdown() => return,
                    changed = reloads.changed() => if changed.is_err() { return },
                }
                let config = match reload_config(&path, &name) {
                    Ok(config) => config,
                    Err(e) => {
                        tracing::error!("reload refused, keeping the previous config: {e}");
                        continue;
                    }
                };
                if let Err(e) = apply(config).await {
                    tracing::error!("reload failed, keeping the previous config: {e:#}");
                }
            }
        }
    }

    /// Starts the shutdown of every task when one of the role's servers failed (a bind error),
    /// so the others stop too instead of serving a half-working host.
    pub fn stop_on_error<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            self.lifecycle.request_shutdown();
        }
        result
    }
}

/// Why a reloaded config was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("the config now names host {found:?}, not {expected:?}: refused")]
    OtherHost { expected: String, found: String },
}

/// Re-reads the config file of host `name`. A config that names another host is refused: the
/// file was swapped for another machine's, and applying it would make this process act as that
/// host.
fn reload_config(path: &std::path::Path, name: &str) -> Result<HostConfig, ReloadError> {
    let config = HostConfig::load(path)?;
    if config.name != name {
        return Err(ReloadError::OtherHost {
            expected: name.to_owned(),
            found: config.name,
        });
    }
    Ok(config)
}

/// Runs a service to completion. Errors are printed for the operator and give exit code 1.
pub fn main<F, Fut>(role: Role, run: F) -> std::process::ExitCode
where
    F: FnOnce(ServiceContext) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use clap::Parser;
    let args = ServiceArgs::parse();
    crate::tls::install_crypto_provider();
    let config = match HostConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{role}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if config.me().role != role {
        eprintln!(
            "{role}: host {} has role {} in {}",
            config.name,
            config.me().role,
            args.config.display()
        );
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{role}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let _telemetry = crate::telemetry::init(
            role.as_str(),
            &config.telemetry,
            config.paths.log_dir.as_deref(),
            &config.name,
        )?;
        let metrics = crate::telemetry::install_metrics()?;
        let lifecycle = Lifecycle::from_signals()?;
        tracing::info!(host = %config.name, %role, version = env!("CARGO_PKG_VERSION"), "starting");
        let context = ServiceContext {
            config_path: args.config.clone(),
            config,
            lifecycle,
            metrics,
        };
        let result = run(context).await;
        match &result {
            Ok(()) => tracing::info!("stopped"),
            Err(e) => tracing::error!("fatal: {e:#}"),
        }
        result
    });
    // Blocking threads (ffmpeg supervisors, pipe writers) may still wait on a child or a pipe:
    // give them a moment, then exit anyway rather than hang the shutdown.
    runtime.shutdown_timeout(SHUTDOWN_BLOCKING_GRACE);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{role}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid host config for `name`, with two LBs in the cluster.
    fn config_json(name: &str) -> String {
        use crate::fixture::{host, host_config};
        let hosts = vec![
            host("lb1", "lb", "127.79.1.1"),
            host("lb2", "lb", "127.79.1.2"),
        ];
        host_config(name, hosts).to_string()
    }

    #[test]
    fn reload_accepts_the_same_host_and_refuses_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.json");
        std::fs::write(&path, config_json("lb1")).unwrap();
        assert_eq!(reload_config(&path, "lb1").unwrap().name, "lb1");

        std::fs::write(&path, config_json("lb2")).unwrap();
        match reload_config(&path, "lb1") {
            Err(ReloadError::OtherHost { expected, found }) => {
                assert_eq!((expected.as_str(), found.as_str()), ("lb1", "lb2"));
            }
            other => panic!("expected OtherHost, got {other:?}"),
        }

        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            reload_config(&path, "lb1"),
            Err(ReloadError::Config(_))
        ));
    }

    /// The whole SIGHUP path with a real signal: another host's config is refused and never
    /// reaches the role; its own config does; shutdown ends the loop.
    #[tokio::test]
    async fn sighup_hands_the_reloaded_config_to_the_role_unless_it_names_another_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.json");
        std::fs::write(&path, config_json("lb1")).unwrap();
        let ctx = ServiceContext {
            config_path: path.clone(),
            config: HostConfig::load(&path).unwrap(),
            lifecycle: Lifecycle::from_signals().unwrap(),
            metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
        };
        let (tx, mut applied) = tokio::sync::mpsc::unbounded_channel();
        let reloads = tokio::spawn(ctx.reload_loop(move |config| {
            let _ = tx.send(config.name);
            std::future::ready(Ok(()))
        }));
        let hup = || {
            // SAFETY: kill with our own pid and a signal tokio handles.
            let sent = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
            assert_eq!(sent, 0);
        };
        let wait = std::time::Duration::from_millis(500);

        std::fs::write(&path, config_json("lb2")).unwrap();
        hup();
        assert!(tokio::time::timeout(wait, applied.recv()).await.is_err());

        std::fs::write(&path, config_json("lb1")).unwrap();
        hup();
        let name = tokio::time::timeout(wait * 10, applied.recv()).await;
        assert_eq!(name.unwrap().as_deref(), Some("lb1"));

        ctx.lifecycle.request_shutdown();
        tokio::time::timeout(wait * 10, reloads)
            .await
            .expect("the reload loop ends at shutdown")
            .unwrap();
    }
}
