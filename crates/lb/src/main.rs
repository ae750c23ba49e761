use std::process::ExitCode;

use streaming_core::config::Role;

fn main() -> ExitCode {
    streaming_core::service::main(Role::Lb, streaming_lb::run)
}
