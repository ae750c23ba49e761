//! Shared building blocks of streaming-cluster: the config schema every service reads, viewer
//! tokens, the chat protocol, TLS, secrets, telemetry, HTTPS serving and the signals that drive shutdown and reload.

pub mod chat_protocol;
pub mod config;
pub mod conn_limit;
pub mod http;
pub mod lifecycle;
pub mod ops_auth;
pub mod process;
pub mod rate_limit;
pub mod secrets;
pub mod serve;
pub mod service;
pub mod status;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod token;
