//! Logs, traces and metrics, installed the same way by every binary.
//!
//! Human-readable logs by default (JSON with `telemetry.json_logs`), to stderr and, when the host
//! has a log directory, to `<log_dir>/<host>.log`. Traces go to OTLP/HTTP when an endpoint is
//! configured. Metrics use the `metrics` facade rendered as Prometheus text on `/metrics`.

use std::path::Path;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::TelemetryConfig;

/// Keeps background writers and exporters alive; drop it last in `main` to flush.
pub struct TelemetryGuard {
    _file: Option<tracing_appender::non_blocking::WorkerGuard>,
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` filter.
pub fn init(
    service: &str,
    config: &TelemetryConfig,
    log_dir: Option<&Path>,
    host: &str,
) -> anyhow::Result<TelemetryGuard> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = config.json_logs;
    let fmt_layer = |writer: tracing_subscriber::fmt::writer::BoxMakeWriter| {
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_target(true);
        if json {
            layer.json().boxed()
        } else {
            layer.with_ansi(false).boxed()
        }
    };
    let mut layers: Vec<Box<dyn Layer<_> + Send + Sync>> = vec![
        fmt_layer(tracing_subscriber::fmt::writer::BoxMakeWriter::new(
            std::io::stderr,
        ))
        .with_filter(filter())
        .boxed(),
    ];
    let mut file_guard = None;
    if let Some(dir) = log_dir {
        std::fs::create_dir_all(dir)?;
        let appender = tracing_appender::rolling::never(dir, format!("{host}.log"));
        let (writer, guard) = tracing_appender::non_blocking(appender);
        file_guard = Some(guard);
        layers.push(
            fmt_layer(tracing_subscriber::fmt::writer::BoxMakeWriter::new(writer))
                .with_filter(filter())
                .boxed(),
        );
    }
    let mut provider = None;
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_owned())
            .with_attribute(opentelemetry::KeyValue::new("host.name", host.to_owned()))
            .build();
        let tracer_provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = tracer_provider.tracer(service.to_owned());
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(filter())
                .boxed(),
        );
        provider = Some(tracer_provider);
    }
    tracing_subscriber::registry().with(layers).try_init()?;
    Ok(TelemetryGuard {
        _file: file_guard,
        provider,
    })
}

/// Histograms exported with buckets, which can be summed across hosts and channels
/// (`histogram_quantile`); the others are summaries, quantiles per process.
const BUCKETED_HISTOGRAMS: &[(&str, &[f64])] = &[
    (
        // Seconds behind live reported by players: low latency sits around 2-3 s, classic HLS
        // around 6-8 s, a player that fell behind beyond.
        "broadcast_player_latency_seconds",
        &[
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 60.0,
        ],
    ),
    (
        // From the end of a part's media to its publication: tenths of a second when all is
        // well, a part duration or more when the transcoder lags.
        "ingest_part_delay_seconds",
        &[0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0],
    ),
    (
        // A chat message's append: milliseconds on a healthy primary, up to the leader lease
        // plus 2 s through a failover.
        "chat_append_seconds",
        &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
        ],
    ),
];

/// Installs the Prometheus recorder; the handle renders `/metrics`.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for (name, bounds) in BUCKETED_HISTOGRAMS {
        builder = builder.set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full((*name).to_owned()),
            bounds,
        )?;
    }
    Ok(builder.install_recorder()?)
}
