//! One function per subcommand: arguments in, the runner (or a client, or a bench) does the
//! work, the result printed for the operator (plain text, or JSON with `--json`).

mod backup;
mod faults;
mod plan;
mod status;
mod topology;
mod up;
mod upgrade;

pub use backup::{backup, restore};
pub use faults::{heal, kill, partition, start};
pub use plan::plan;
pub use status::status;
pub use topology::{add, drain, hosts, sync};
pub use up::{down, up};
pub use upgrade::upgrade;

/// Prints operator lines unless the command's output is JSON.
fn sayer(json: bool) -> impl Fn(&str) {
    move |line: &str| {
        if !json {
            println!("{line}");
        }
    }
}
