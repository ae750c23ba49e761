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
    /// Re-read this path on SIGHUP ([`ServiceContext::reload_config`]).
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

    /// Re-reads the config file; the caller keeps the old one when this fails.
    pub fn reload_config(&self) -> Result<HostConfig, crate::config::ConfigError> {
        let config = HostConfig::load(&self.config_path)?;
        Ok(config)
    }
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
