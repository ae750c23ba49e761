//! argon2id password hashes, computed off the async runtime (each takes tens of milliseconds
//! and ~19 MiB by design). At most one hash per core runs at a time and a bounded number wait
//! for a turn: a flood of registrations or logins gets "busy" at once instead of queueing
//! blocking tasks (and their memory) without limit.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tokio::sync::Semaphore;

/// A valid hash of a password nobody knows: checking an unknown user's login against it costs
/// as much as a real check, so timing does not tell which names exist.
static DECOY: LazyLock<String> =
    LazyLock::new(|| hash_blocking("decoy password nobody uses").unwrap_or_default());

/// Requests that may wait for a hashing turn, per core; beyond them the answer is "busy". A
/// turn takes tens of milliseconds, so a waiter at the back is served within about a second.
const QUEUE_PER_CORE: usize = 16;

struct Gate {
    turns: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
}

static GATE: LazyLock<Gate> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Gate::new(cores, cores * QUEUE_PER_CORE)
});

impl Gate {
    fn new(turns: usize, max_waiting: usize) -> Gate {
        Gate {
            turns: Semaphore::new(turns),
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// Runs `work` on the blocking pool once a turn is free, or refuses at once when too many
    /// are already waiting.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let permit = match self.turns.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    metrics::counter!("password_checks_refused_total", "reason" => "busy")
                        .increment(1);
                    return Err(HashError::Busy);
                }
                let permit = self.turns.acquire().await;
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                permit.map_err(|e| HashError::Failed(e.to_string()))?
            }
        };
        let result = tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| HashError::Failed(e.to_string()));
        drop(permit);
        result
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("password checks are busy, retry in a moment")]
    Busy,
    #[error("password hashing failed: {0}")]
    Failed(String),
}

fn hash_blocking(password: &str) -> Result<String, HashError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| HashError::Failed(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Failed(e.to_string()))
}

fn verify_blocking(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
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
    }

    /// A flood beyond the turns and the queue is refused at once rather than queued, and the
    /// accepted ones complete.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_is_refused_beyond_the_queue() {
        let gate = std::sync::Arc::new(Gate::new(2, 6));
        let flood = 40;
        let tasks: Vec<_> = (0..flood)
            .map(|i| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    gate.run(move || hash_blocking(&format!("password {i}")))
                        .await
                })
            })
            .collect();
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
        eprintln!("{flood} hashes at once through 2 turns and 6 places: {done} done, {busy} busy");
        assert!(done >= 8, "the turns and the queue are served: {done}");
        assert!(busy > 0, "nothing was refused");
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
        assert_eq!(gate.turns.available_permits(), 2);
    }
}
