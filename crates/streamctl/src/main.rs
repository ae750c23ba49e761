use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = streaming_streamctl::Cli::parse();
    // `streamctl status | head` must end quietly, not panic on a closed pipe. Long-running
    // clients keep SIGPIPE ignored: rustls writes with writev, which (unlike send) raises
    // SIGPIPE when the peer reset the connection, and a killed host must not kill a bench.
    use streaming_streamctl::Command as C;
    let long_running = matches!(
        cli.command,
        C::Bench(_) | C::Watch(_) | C::Chat(_) | C::Up(_)
    );
    if !long_running {
        // SAFETY: called before any thread starts; restores the default disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    streaming_runner::procs::raise_open_files_limit();
    streaming_core::tls::install_crypto_provider();
    tracing_init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("streamctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(streaming_streamctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Operator messages go to stdout as plain text; `RUST_LOG` adds diagnostics on stderr.
fn tracing_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
