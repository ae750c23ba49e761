//! Shared building blocks of streaming-cluster: the config schema every service reads, viewer
//! tokens, TLS, secrets, telemetry, HTTPS serving and the signals that drive shutdown and reload.

pub mod config;
pub mod http;
pub mod lifecycle;
pub mod process;
pub mod secrets;
pub mod serve;
pub mod service;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod token;

/// Wall-clock time in seconds since the Unix epoch, with sub-second precision.
pub fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
