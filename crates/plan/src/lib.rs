//! How many broadcasts, ingests and LBs an audience needs, from `cluster.nix` and the costs
//! the benchmarks measured (`docs/capacity-figures.json`); `streamctl plan` prints it.
//!
//! The original README sized a cluster by one multiplication, bitrate × viewers = uplink. A
//! plan adds what that leaves out: the 80 % uplink rule the LBs admit viewers by, the share
//! each broadcast gets, CPU from measured per-core figures, and the failover promise, which
//! needs the audience to fit with the largest host of each role down.

pub mod figures;
pub mod plan;
