//! The ingest binary: everything lives in the library.
use std::process::ExitCode;

use streaming_core::config::Role;

fn main() -> ExitCode {
    streaming_core::service::main(Role::Ingest, streaming_ingest::run)
}
