//! streamctl: the operator CLI of streaming-cluster and its local cluster runner.
//!
//! - [`cluster`]: cluster.nix -> per-host configs, secrets, state directory layout.
//! - [`pki`]: the local CA and host certificates.
//! - [`procs`]: host processes (process groups, pid files, signals, /proc); [`cgroup`]: each
//!   host's cgroup, so the kernel knows which host opened a socket.
//! - [`partition`]: network cuts between hosts (nftables).
//! - [`supervise`]: restarts a failed host service, as systemd would.
//! - [`probe`]: health, status and playback checks over HTTPS.
//! - [`commands`]: one function per subcommand.
//! - [`db`]: the database role (etcd, Patroni, PostgreSQL) and who is primary.
//! - [`watch`]: the HLS viewer simulator; [`client_address`]: each simulated client's own
//!   loopback address.
//! - [`bench`]: load and failover benchmarks; [`obs_publisher`]: the OBS-like publisher of its
//!   single-publisher rows; [`chaos`]: the random fault schedule; [`publish`]: FLV from stdin
//!   over RTMPS with the key from a file (`streamctl publish`); [`whole`]: when the cluster
//!   is whole again after a fault.
//! - [`chat`]: the chat load client (`streamctl chat`); [`chat_failover`]: its database
//!   failover bench.

pub mod bench;
pub mod cgroup;
pub mod chaos;
pub mod chat;
pub mod chat_failover;
pub mod cli;
pub mod client_address;
pub mod cluster;
pub mod commands;
pub mod db;
pub mod obs_publisher;
pub mod partition;
pub mod pki;
pub mod probe;
pub mod procs;
pub mod publish;
pub mod supervise;
pub mod watch;
pub mod whole;

pub use cli::{Cli, Command};

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => commands::up(args).await,
        Command::Down(args) => commands::down(args),
        Command::Status(args) => commands::status(args).await,
        Command::Kill(args) => commands::kill(args),
        Command::Start(args) => commands::start(args),
        Command::Partition(args) => partition::run_partition(args).await,
        Command::Heal(args) => partition::run_heal(args).await,
        Command::Hosts(args) => commands::hosts(args),
        Command::Watch(args) => watch::run(args).await,
        Command::Add(args) => commands::add(args).await,
        Command::Drain(args) => commands::drain(args),
        Command::Sync(args) => commands::sync(args),
        Command::Bench(args) => bench::run(args).await,
        Command::Chat(args) => chat::run(args).await,
        Command::Publish(args) => publish::run(args).await,
        Command::DbHost(args) => db::run_host(&args.config),
        Command::Supervise(args) => supervise::run(&args),
    }
}
