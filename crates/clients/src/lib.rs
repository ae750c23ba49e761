//! Clients of the cluster that behave like real ones, many at once from one process: what
//! `streamctl watch`, `chat` and `publish` run, and what the benches load the cluster with.
//!
//! - [`watch`]: the HLS viewer simulator (startup, stalls, failovers, latency).
//! - [`chat`]: the chat load client and the analysis of what every client saw.
//! - [`publish`]: FLV from stdin over RTMPS with the key from a file.
//! - [`client_address`]: each simulated client's own loopback address; [`local`]: what the
//!   local cluster's state directory tells a client the command line did not.

pub mod chat;
pub mod client_address;
pub mod local;
pub mod publish;
pub mod watch;
