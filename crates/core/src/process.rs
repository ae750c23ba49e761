//! Child processes that must not outlive their parent.

use std::process::Command;

/// Environment variable naming the channel an ffmpeg child works for (sources and ingests run
/// one per channel): operators' tools read it from `/proc/<pid>/environ` to pick the right one.
pub const CHANNEL_ENV: &str = "STREAMING_CHANNEL";

/// Makes the child receive SIGKILL when the spawning *thread* dies (Linux `PR_SET_PDEATHSIG`).
///
/// Spawn from a thread that lives as long as the child (a supervisor thread), never from a
/// pooled thread that may exit while the child runs.
pub fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
