//! Shared building blocks of streaming-cluster: the config schema every service reads, viewer
//! tokens, the chat protocol, TLS, secrets, telemetry, HTTPS serving and the signals that drive
//! shutdown and reload, the cluster HTTPS client and the Patroni client.

pub mod capacity;
pub mod chat_protocol;
pub mod client;
pub mod config;
pub mod conn_limit;
#[cfg(any(test, feature = "test-fixtures"))]
pub mod fixture;
pub mod http;
pub mod lifecycle;
pub mod news;
pub mod ops_auth;
pub mod patroni;
pub mod player_report;
pub mod process;
pub mod rate_limit;
pub mod secrets;
pub mod serve;
pub mod service;
pub mod signed;
pub mod status;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod token;
