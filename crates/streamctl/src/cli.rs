//! The command line (clap derive). These subcommands and flags are the stable interface the
//! README, tests and benchmarks use.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "streamctl",
    version,
    about = "Run and operate a streaming-cluster (local runner, status, failures on demand)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Evaluate cluster.nix, create CA, certificates and secrets, start every host on loopback,
    /// and wait until the stream plays through an LB.
    Up(UpArgs),
    /// Stop every host started from the state dir (whole process groups, ffmpeg included).
    Down(DownArgs),
    /// Every host: process up/hung/down, health, and viewers/load.
    Status(StatusArgs),
    /// Kill one host (SIGKILL its process group), hang it (--hang: SIGSTOP), kill one of its
    /// ffmpeg children (--ffmpeg), or crash its service alone (--crash: SIGABRT; the runner
    /// restarts it).
    Kill(KillArgs),
    /// Resume a hung host (SIGCONT) or start a dead one again.
    Start(StartArgs),
    /// Cut a host off the network: from everyone (viewers and operator commands included), or
    /// only from the hosts and roles given with --from ("viewers": the simulated viewers and
    /// chat clients). Existing connections go silent too. Needs root and nftables.
    Partition(PartitionArgs),
    /// Lift the cuts involving a host (as the host cut off or as a peer), or every cut.
    Heal(HealArgs),
    /// Print /etc/hosts lines for the cluster's names (hosts and the site name).
    Hosts(HostsArgs),
    /// HLS viewer simulator (startup, stalls, failovers, latency).
    Watch(streaming_clients::watch::WatchArgs),
    /// After adding a host's entry to the cluster file: regenerate every config, create its
    /// certificate, start it, and SIGHUP the others so they use it without restarts.
    /// On a drained host: take it back into service.
    Add(AddArgs),
    /// Take a host out of service: LBs stop assigning it and its viewers move at their next
    /// playlist request (it answers 503; steering players are steered away). The flag lives in
    /// <state>/drained and survives regeneration. Then remove its entry from the cluster file
    /// and run `streamctl sync` to stop it for good.
    Drain(DrainArgs),
    /// Re-read the cluster file (drained list applied): rewrite every config, SIGHUP every
    /// running host, and stop hosts whose entry was removed.
    Sync(SyncArgs),
    /// Restart hosts one at a time on the build there is now, viewers and chat undisturbed:
    /// db replica, sources, ingests, broadcasts (drained first), LBs, then the db primary after
    /// a Patroni switchover; each waits until the cluster is whole again. Ctrl-C finishes the
    /// host in hand and stops.
    Upgrade(UpgradeArgs),
    /// Base backup of the chat database with pgBackRest from the current primary (the stanza
    /// is created on first use and WAL archiving checked), then what the repository holds
    /// (docs/backup.md).
    Backup(BackupArgs),
    /// Point-in-time restore of the database: both db hosts' Patroni stopped, their data
    /// directories moved aside (kept), one restored to --to, the old cluster's keys removed from
    /// etcd, Patroni started again and the other db host re-cloned from the new primary.
    Restore(RestoreArgs),
    /// Load and comparison benchmarks.
    Bench(BenchArgs),
    /// Capacity plan from the cluster file and the measured per-core figures: egress, room on
    /// the broadcasts (80 % of each uplink), cores for ingests, broadcasts and LBs, and whether
    /// the host list holds the audience with its largest host of each role down.
    Plan(PlanArgs),
    /// Chat load: registered clients on several broadcasts send messages, reconnect through the
    /// LB on failures, and check that every acked message reached everyone once and in order.
    Chat(streaming_clients::chat::ChatArgs),
    /// Publish FLV from stdin (`ffmpeg ... -f flv pipe:1 |`) over RTMPS, the stream key read
    /// from a file so that it is on no command line; one connection, exit 1 when it fails.
    Publish(streaming_clients::publish::PublishArgs),
    /// Internal: one local db host (its etcd member and Patroni), started by `up`/`start` as
    /// the leader of the host's process group.
    #[command(hide = true)]
    DbHost(DbHostArgs),
    /// Internal: runs one host's service and restarts it when it fails, as systemd's
    /// `Restart=on-failure` would; started by `up`/`start`/`add` as the leader of the host's
    /// process group.
    #[command(hide = true)]
    Supervise(SuperviseArgs),
}

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// The cluster file (its production profile: full ladders, declared uplinks).
    #[arg(long, default_value = "cluster.nix")]
    pub cluster: PathBuf,
    /// Viewers in all, shared evenly by the channels planned for. Several values
    /// (`1000,5000`) print one line per case.
    #[arg(long, value_delimiter = ',', required = true)]
    pub viewers: Vec<u64>,
    /// A channel to plan for (repeat for several); default: every channel of the file.
    #[arg(long)]
    pub channel: Vec<String>,
    /// Count each viewer at this many Mbit/s instead of its channel's top rendition. Several
    /// values (`1,2,3.5,5`) print one line per case.
    #[arg(long, value_delimiter = ',')]
    pub bitrate_mbps: Vec<f64>,
    /// Measured per-core figures [default: docs/capacity-figures.json beside the cluster file,
    /// in the working directory, or in the source tree].
    #[arg(long)]
    pub figures: Option<PathBuf>,
    /// Print the plans as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchKind,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchKind {
    /// Inject every single-host fault (and one double fault) while viewers watch.
    Failover(streaming_bench::failover::FailoverArgs),
    /// Chat load while the database primary is killed twice and hung once: write outage per
    /// failover, and every acked message checked in PostgreSQL.
    ChatFailover(streaming_bench::chat_failover::ChatFailoverArgs),
    /// A random fault schedule from a seed (kills, hangs, crashes; single and in pairs) while
    /// viewers watch and chat clients write: per step and total figures.
    Chaos(streaming_bench::chaos::ChaosArgs),
    /// One broadcast against nginx serving the same segment to wrk over HTTPS, in alternating
    /// rounds: requests/s, Gbit/s, p99, and Gbit/s per core used (the sources and ingests are
    /// hung meanwhile, then resumed).
    Serve(streaming_bench::serve::ServeArgs),
    /// One LB answering what every page asks it every 5 s (`/api/stats`) to wrk over HTTPS:
    /// requests/s, p99, and requests/s per core used (the figure `streamctl plan` sizes LBs with).
    Lb(streaming_bench::lb::LbArgs),
    /// Simulated viewers on one broadcast in growing steps until one stalls: stalls, segment
    /// fetch p50/p99, the broadcast's cores and memory per viewer, the generator's own cores.
    Viewers(streaming_bench::viewers::ViewersArgs),
    /// Our ingest against the original pipeline (nginx-rtmp + `exec ffmpeg`, its 720p/480p/360p
    /// ladder) on the same 1080p25 input, standalone (no cluster needed): cores per channel in
    /// alternating rounds, and each rendition's real bitrate, SSIM and PSNR against the input.
    Ingest(streaming_bench::ingest::IngestArgs),
}

#[derive(Debug, Args)]
pub struct SuperviseArgs {
    /// The host's config file (`<state>/config/<host>.json`), passed on to the service.
    #[arg(long)]
    pub config: PathBuf,
    /// The role's service binary.
    #[arg(long)]
    pub binary: PathBuf,
    /// Where the service's pid and the restart count are written.
    #[arg(long)]
    pub service_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct DbHostArgs {
    /// The host's config file (`<state>/config/<host>.json`).
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Host name as in the cluster file, e.g. broadcast5.
    pub name: String,
    #[command(flatten)]
    pub state: StateArg,
    /// The host list (default: the one `up` or the last `add` used, recorded in the state dir).
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// First two octets of the loopback addresses (default: the one `up` used).
    #[arg(long)]
    pub address_prefix: Option<String>,
    /// Seconds to wait for the started host to answer /healthz (0: do not wait).
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Host name, e.g. broadcast3.
    pub name: String,
    #[command(flatten)]
    pub state: StateArg,
    /// The host list (default: the one recorded in the state dir).
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// full, diff or incr (pgBackRest makes a full backup when the repository has none).
    #[arg(long = "type", default_value = "incr")]
    pub kind: String,
    /// Only make sure the stanza exists and archiving works: switch the WAL segment and wait
    /// until it is archived (every commit before the call is then in the repository).
    #[arg(long)]
    pub archive_check: bool,
    #[command(flatten)]
    pub state: StateArg,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The point in time, as PostgreSQL reads a timestamp: "2026-12-03 08:30:00.123+00".
    #[arg(long = "to")]
    pub to: String,
    /// The db host restored first, the new primary (default: the current primary, else the
    /// first db host).
    #[arg(long)]
    pub host: Option<String>,
    #[command(flatten)]
    pub state: StateArg,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Hosts to upgrade, in any order (the safe order is applied).
    pub hosts: Vec<String>,
    /// Every host of a role (repeatable): lb, broadcast, ingest, source, db.
    #[arg(long = "role", value_parser = parse_role)]
    pub roles: Vec<streaming_core::config::Role>,
    /// Every host of the cluster.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub state: StateArg,
    /// Seconds the cluster may take to be whole again after a host's restart.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout: u64,
    /// Seconds a drained broadcast's viewers get to move before it restarts anyway.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// Upgrade the NixOS hosts of a flake instead (what `nix run .#deploy` runs): deploy-rs
    /// switches each host, ssh and HTTPS check it (docs/deploy.md).
    #[arg(long, requires_all = ["flake", "ca", "ops_token_file"])]
    pub nixos: bool,
    /// The flake checkout whose cluster.nix and nixosConfigurations are deployed.
    #[arg(long)]
    pub flake: Option<PathBuf>,
    /// PEM bundle trusting what the hosts serve: the cluster CA, plus public roots with ACME.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// File holding the ops token (the `metrics-token` secret) that `/status` asks for.
    #[arg(long)]
    pub ops_token_file: Option<PathBuf>,
    /// Who ssh logs in as on the hosts (not root: needs passwordless sudo).
    #[arg(long, default_value = "root")]
    pub ssh_user: String,
    #[arg(long)]
    pub json: bool,
}

fn parse_role(text: &str) -> Result<streaming_core::config::Role, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("unknown role {text} (lb, broadcast, ingest, source, db)"))
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub state: StateArg,
    /// The host list (default: the one recorded in the state dir).
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StateArg {
    /// State directory of the local cluster (configs, certificates, secrets, logs, pid files).
    #[arg(long = "state", default_value = ".streamctl")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// The host list.
    #[arg(long, default_value = "cluster.nix")]
    pub cluster: PathBuf,
    #[command(flatten)]
    pub state: StateArg,
    /// First two octets of the loopback addresses (127.77 by default; tests use their own).
    #[arg(long, default_value = "127.77")]
    pub address_prefix: String,
    /// Seconds to wait for the first playable segment through an LB.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// One JSON object: viewer_url, playlist_url, ca_cert, hosts, startup_s.
    #[arg(long)]
    pub json: bool,
    /// Also run Debian's Prometheus against the cluster, on the address of the host flagged
    /// `monitoring = true` (docs/monitoring.md); `down` stops it.
    #[arg(long)]
    pub monitoring: bool,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub state: StateArg,
    /// Also delete the state directory.
    #[arg(long)]
    pub wipe: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub state: StateArg,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Host name, e.g. broadcast2.
    pub name: String,
    #[command(flatten)]
    pub state: StateArg,
    /// SIGSTOP the host instead (it hangs: alive, answering nothing). `start` resumes it.
    /// With --ffmpeg: SIGSTOP only that ffmpeg child (the ingest's watchdog must notice).
    #[arg(long)]
    pub hang: bool,
    /// SIGKILL one ffmpeg child of the host (an ingest's transcoder first); the host restarts it.
    #[arg(long)]
    pub ffmpeg: bool,
    /// Db hosts: only Patroni and PostgreSQL (a crash of the database service; the host and
    /// its etcd member stay up). `start` runs Patroni again.
    #[arg(long, conflicts_with = "ffmpeg")]
    pub postgres: bool,
    /// SIGABRT to the host's service process only (not its group), as a stack overflow or any
    /// abort would end it: the runner restarts it after a backoff, as systemd would.
    #[arg(long, conflicts_with_all = ["ffmpeg", "postgres", "hang"])]
    pub crash: bool,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Host name, e.g. broadcast2.
    pub name: String,
    #[command(flatten)]
    pub state: StateArg,
}

#[derive(Debug, Args)]
pub struct PartitionArgs {
    /// Host name, e.g. db1.
    pub name: String,
    /// A host, a role (lb, broadcast, db, ingest, source) or "viewers"; repeatable. None: cut
    /// from everyone.
    #[arg(long = "from", value_name = "HOST|ROLE")]
    pub from: Vec<String>,
    /// Only the connections NAME opens: it cannot reach them, they still reach it.
    #[arg(long)]
    pub one_way: bool,
    #[command(flatten)]
    pub state: StateArg,
}

#[derive(Debug, Args)]
pub struct HealArgs {
    /// Host name; none: every cut.
    pub name: Option<String>,
    #[command(flatten)]
    pub state: StateArg,
}

#[derive(Debug, Args)]
pub struct HostsArgs {
    /// The host list.
    #[arg(long, default_value = "cluster.nix")]
    pub cluster: PathBuf,
    #[arg(long, default_value = "127.77")]
    pub address_prefix: String,
    /// Read the addresses from this state dir's configs instead of evaluating cluster.nix.
    #[arg(long)]
    pub state: Option<PathBuf>,
}
