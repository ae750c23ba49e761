//! The benchmarks of a running local cluster: faults injected through the runner while
//! simulated viewers and chat clients measure what they feel.
//!
//! - [`failover`]: the failover matrix, one fault (or pair) per row.
//! - [`chat_failover`]: chat durability while the database primary fails.
//! - [`chaos`]: a random fault schedule from a seed.
//! - [`serve`]: one broadcast against nginx serving the same segment ([`http_load`]: the
//!   HTTP/1.1 and HTTP/2 clients it and [`lb`] drive).
//! - [`lb`]: `/api/stats` requests per second per core one LB uses.
//! - [`viewers`]: how many simulated viewers one broadcast holds, and their cost.
//! - [`ingest`]: our ingest against the original nginx-rtmp + `exec ffmpeg` pipeline: cores
//!   and picture quality per rendition.
//! - [`faults`]: injecting and undoing a fault, as `streamctl kill/start/partition/heal` do
//!   (`streaming_runner::whole`: when the cluster is whole again); [`database`]: who is primary and
//!   whether every acked chat message is stored; [`obs_publisher`]: the OBS-like publisher of
//!   the single-publisher rows.

pub mod affinity;
pub mod chaos;
pub mod chat_failover;
pub mod database;
pub mod failover;
pub mod faults;
pub mod http_load;
pub mod ingest;
pub mod lb;
pub mod obs_publisher;
pub mod output;
pub mod serve;
pub mod viewers;
