//! argon2id password hashes (each takes tens of milliseconds and ~19 MiB by design), computed
//! on one thread per core, off the async runtime, with a bounded queue in front: a flood of
//! registrations or logins gets "busy" at once instead of queueing work (and memory) without
//! limit. Fixed threads also bound the memory the allocator keeps: a thread reuses its own
//! freed 19 MiB, where short-lived blocking-pool threads each kept their own.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, LazyLock, Mutex};

use std::cell::RefCell;

use argon2::password_hash::{self, Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{ARGON2ID_IDENT, Algorithm, Argon2, Block, Params, Version};

/// A valid hash of a password nobody knows: checking an unknown user's login against it costs
/// as much as a real check, so timing does not tell which names exist.
static DECOY: LazyLock<String> =
    LazyLock::new(|| hash_blocking("decoy password nobody uses").unwrap_or_default());

/// Requests that may wait for a hashing thread, per core; beyond them the answer is "busy". A
/// hash takes tens of milliseconds, so a waiter at the back is served within about a second.
const QUEUE_PER_CORE: usize = 16;

type Job = Box<dyn FnOnce() + Send>;

struct Gate {
    jobs: SyncSender<Job>,
}

static GATE: LazyLock<Gate> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Gate::new(cores, cores * QUEUE_PER_CORE)
});

impl Gate {
    /// `threads` hashing threads behind a queue of `queue` waiting jobs; the threads end when
    /// the gate is dropped.
    fn new(threads: usize, queue: usize) -> Gate {
        let (jobs, waiting) = sync_channel::<Job>(queue);
        let waiting = Arc::new(Mutex::new(waiting));
        for i in 0..threads {
            let waiting = waiting.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || work(&waiting));
            if let Err(e) = spawned {
                tracing::error!("cannot start a password hashing thread: {e}");
            }
        }
        Gate { jobs }
    }

    /// Runs `work` on a hashing thread, or refuses at once when the queue is full.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // The asker may have gone (client disconnected): nobody to tell.
            let _ = done.send(work());
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("password_checks_refused_total", "reason" => "busy").increment(1);
                return Err(HashError::Busy);
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(HashError::Failed("no hashing thread".into()));
            }
        }
        result
            .await
            .map_err(|_| HashError::Failed("the hashing thread failed".into()))
    }
}

fn work(waiting: &Mutex<Receiver<Job>>) {
    loop {
        let job = match waiting.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // A panicking hash must not take the thread (and its share of the capacity) with it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("password checks are busy, retry in a moment")]
    Busy,
    #[error("password hashing failed: {0}")]
    Failed(String),
}

/// Argon2's working memory, one block per thread that hashes, reused across hashes: each
/// hash allocating its own 19 MiB left the allocator holding about eight of them per thread.
fn with_memory<T>(blocks: usize, f: impl FnOnce(&mut [Block]) -> T) -> T {
    thread_local! {
        static MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
    }
    MEMORY.with_borrow_mut(|memory| {
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        f(&mut memory[..blocks])
    })
}

/// The argon2id hash of `password` with `salt` and `params`, in the PHC string format.
fn compute<'a>(
    password: &[u8],
    salt: Salt<'a>,
    params: &Params,
) -> password_hash::Result<PasswordHash<'a>> {
    // Our hashes' cost is Params::default(); a stored one asking for far more is not ours.
    if params.block_count() > MAX_BLOCKS {
        return Err(password_hash::Error::ParamValueInvalid(
            password_hash::errors::InvalidValue::TooLong,
        ));
    }
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_buf)?;
    let len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let output = with_memory(params.block_count(), |memory| {
        Output::init_with(len, |out| {
            Ok(argon.hash_password_into_with_memory(password, salt_bytes, out, memory)?)
        })
    })?;
    Ok(PasswordHash {
        algorithm: ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params)?,
        salt: Some(salt),
        hash: Some(output),
    })
}

/// Largest working memory accepted from a stored hash: 64 MiB.
const MAX_BLOCKS: usize = 64 * 1024;

fn hash_blocking(password: &str) -> Result<String, HashError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| HashError::Failed(e.to_string()))?;
    compute(password.as_bytes(), salt.as_salt(), &Params::default())
        .map(|h| h.to_string())
        .map_err(|e| HashError::Failed(e.to_string()))
}

fn verify_blocking(hash: &str, password: &str) -> bool {
    let Ok(stored) = PasswordHash::new(hash) else {
        return false;
    };
    if stored.algorithm != ARGON2ID_IDENT || stored.version != Some(Version::V0x13.into()) {
        return false;
    }
    let (Ok(params), Some(salt), Some(expected)) =
        (Params::try_from(&stored), stored.salt, stored.hash)
    else {
        return false;
    };
    // Output's equality is constant-time.
    compute(password.as_bytes(), salt, &params).is_ok_and(|h| h.hash == Some(expected))
}

pub async fn hash(password: String) -> Result<String, HashError> {
    GATE.run(move || hash_blocking(&password)).await?
}

/// Verifies against `hash`, or against the decoy when there is no such user (always false).
pub async fn verify(hash: Option<String>, password: String) -> Result<bool, HashError> {
    GATE.run(move || match hash {
        Some(hash) => verify_blocking(&hash, &password),
        None => {
            verify_blocking(&DECOY, &password);
            false
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_only_their_password() {
        let h = hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(
            verify(Some(h.clone()), "correct horse".into())
                .await
                .unwrap()
        );
        assert!(!verify(Some(h), "wrong horse".into()).await.unwrap());
        assert!(
            !verify(None, "decoy password nobody uses".into())
                .await
                .unwrap()
        );
        assert!(!verify(Some("not a hash".into()), "x".into()).await.unwrap());
        // Hashes made by the argon2 crate's own PasswordHasher (earlier releases) still verify.
        use argon2::password_hash::PasswordHasher;
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"old password", &salt)
            .unwrap()
            .to_string();
        assert_eq!(
            compute(b"old password", salt.as_salt(), &Params::default())
                .unwrap()
                .to_string(),
            theirs
        );
        assert!(
            verify(Some(theirs.clone()), "old password".into())
                .await
                .unwrap()
        );
        assert!(!verify(Some(theirs), "old passwore".into()).await.unwrap());
    }

    /// A flood beyond the turns and the queue is refused at once rather than queued, and the
    /// accepted ones complete.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_is_refused_beyond_the_queue() {
        let gate = Arc::new(Gate::new(2, 6));
        let flood = 40;
        let tasks = hash_at_once(&gate, flood);
        let (mut done, mut busy) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(h) => {
                    assert!(h.unwrap().starts_with("$argon2id$"));
                    done += 1;
                }
                Err(HashError::Busy) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        eprintln!(
            "{flood} hashes at once through 2 threads and 6 places: {done} done, {busy} busy"
        );
        assert!(done >= 6, "the queue is served: {done}");
        assert!(busy > 0, "nothing was refused");
        // Once the flood has passed, the gate takes work again.
        let h = gate.run(|| hash_blocking("after")).await.unwrap().unwrap();
        assert!(h.starts_with("$argon2id$"));
    }

    /// `n` registrations arriving together: each hashes its own password through the gate.
    fn hash_at_once(
        gate: &Arc<Gate>,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<Result<String, HashError>, HashError>>> {
        (0..n)
            .map(|i| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    gate.run(move || hash_blocking(&format!("password {i}")))
                        .await
                })
            })
            .collect()
    }

    fn peak_rss_mib() -> f64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib / 1024.0
    }

    /// The figure behind the gate: 300 registrations at once raise the peak memory by one
    /// working memory per hashing thread, where hashing each on the blocking pool holds one per
    /// request (shown with 12 at once, to keep the machine usable).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measures this process's peak memory: run it alone, --exact"]
    async fn memory_of_a_registration_flood() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let gate = Arc::new(Gate::new(cores, cores * QUEUE_PER_CORE));
        let start = peak_rss_mib();
        let tasks = hash_at_once(&gate, 300);
        let mut busy = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Err(HashError::Busy)) {
                busy += 1;
            }
        }
        let gated = peak_rss_mib();
        let ungated: Vec<_> = (0..12)
            .map(|i| tokio::task::spawn_blocking(move || hash_blocking(&format!("p{i}"))))
            .collect();
        for t in ungated {
            t.await.unwrap().unwrap();
        }
        let after = peak_rss_mib();
        eprintln!(
            "peak RSS: {start:.0} MiB at start, {gated:.0} MiB after 300 gated hashes at once \
             ({busy} refused busy), {after:.0} MiB after 12 more on the blocking pool at once"
        );
        // Other tests of this process may hash meanwhile: a margin of one more gate.
        assert!(
            gated - start < 19.0 * 2.0 * cores as f64 + 24.0,
            "the gate let memory grow by {:.0} MiB",
            gated - start
        );
    }
}
