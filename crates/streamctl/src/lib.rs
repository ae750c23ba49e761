//! streamctl: the operator's command line of streaming-cluster. Each subcommand parses its
//! arguments ([`cli`]) and hands the work to a library: the local runner
//! (`streaming_runner`: up, down, status, kill, start, partition, add, drain, sync), the
//! simulated clients (`streaming_clients`: watch, chat, publish), the benchmarks
//! (`streaming_bench`) or the capacity planner (`streaming_plan`).

pub mod cli;
mod commands;

use cli::BenchKind;
pub use cli::{Cli, Command};

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => commands::up(args).await,
        Command::Down(args) => commands::down(args),
        Command::Status(args) => commands::status(args).await,
        Command::Kill(args) => commands::kill(args),
        Command::Start(args) => commands::start(args),
        Command::Partition(args) => commands::partition(args).await,
        Command::Heal(args) => commands::heal(args).await,
        Command::Hosts(args) => commands::hosts(args),
        Command::Watch(args) => streaming_clients::watch::run(args).await,
        Command::Add(args) => commands::add(args).await,
        Command::Drain(args) => commands::drain(args),
        Command::Sync(args) => commands::sync(args),
        Command::Upgrade(args) => commands::upgrade(args).await,
        Command::Backup(args) => commands::backup(args).await,
        Command::Restore(args) => commands::restore(args).await,
        Command::Bench(args) => match args.what {
            BenchKind::Failover(args) => streaming_bench::failover::run(args).await,
            BenchKind::ChatFailover(args) => streaming_bench::chat_failover::run(args).await,
            BenchKind::Chaos(args) => streaming_bench::chaos::run(args).await,
            BenchKind::Serve(args) => streaming_bench::serve::run(args).await,
            BenchKind::Lb(args) => streaming_bench::lb::run(args).await,
            BenchKind::Viewers(args) => streaming_bench::viewers::run(args).await,
            BenchKind::Ingest(args) => streaming_bench::ingest::run(args).await,
        },
        Command::Plan(args) => commands::plan(args),
        Command::Chat(args) => streaming_clients::chat::run(args).await,
        Command::Publish(args) => streaming_clients::publish::run(args).await,
        Command::DbHost(args) => streaming_runner::db::run_host(&args.config),
        Command::Supervise(args) => {
            streaming_runner::supervise::run(&streaming_runner::supervise::Supervised {
                config: args.config,
                binary: args.binary,
                service_file: args.service_file,
            })
        }
    }
}
