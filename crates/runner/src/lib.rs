//! The local runner: every host of `cluster.nix` as a process group on its own loopback
//! address, with the certificates, secrets and supervision a real host would have. `streamctl`
//! is its command line; the benches drive it in-process.
//!
//! - [`cluster`]: cluster.nix -> per-host configs, secrets, state directory layout; [`files`]:
//!   how they are written.
//! - [`pki`]: the local CA and host certificates.
//! - [`procs`]: host processes (process groups, pid files, signals, /proc); [`cgroup`]: each
//!   host's cgroup, so the kernel knows which host opened a socket.
//! - [`supervise`]: restarts a failed host service, as systemd would.
//! - [`hosts`]: one host started, stopped, killed, hung, crashed or resumed; [`up`]: the whole
//!   cluster started and waited for; [`topology`]: hosts added, drained and removed while it
//!   runs; [`status`]: what every host is doing; [`whole`]: whether every host is back;
//!   [`upgrade`]: every host restarted in turn without viewers or chat noticing.
//! - [`partition`]: network cuts between hosts (nftables).
//! - [`db`]: the database role (etcd, Patroni, PostgreSQL) and who is primary.
//! - [`probe`]: health, status and playback checks over HTTPS.
//! - [`monitoring`]: Prometheus watching the local cluster (`up --monitoring`).

pub mod cgroup;
pub mod cluster;
pub mod db;
pub mod files;
pub mod hosts;
pub mod monitoring;
pub mod partition;
pub mod pki;
pub mod probe;
pub mod procs;
pub mod status;
pub mod supervise;
pub mod topology;
pub mod up;
pub mod upgrade;
pub mod whole;
