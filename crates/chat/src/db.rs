//! Finding the PostgreSQL primary through Patroni and keeping one pool to it.
//!
//! libpq's `target_session_attrs=read-write` would happily connect to an orphaned old primary
//! (cut off from etcd, it still accepts writes until Patroni demotes it), so the primary is
//! whichever db host's Patroni answers 200 on `GET /primary` ([`streaming_core::patroni`]). A watcher asks every db host twice a second; when the answer changes, the pool
//! is replaced and the old one closed, so no new statement reaches the old primary. A statement
//! already sent there cannot be acknowledged by it either: with `synchronous_mode` an orphan's
//! commit waits for a standby that is gone, and our callers give up after a timeout and retry,
//! idempotently, on the new primary.
//!
//! Both paths are TLS checked against the cluster CA: Patroni's REST API over HTTPS, and
//! PostgreSQL with `verify-full` (the db host's certificate must name the address we dial), so
//! neither the primary's identity nor the passwords and chat rows can be forged or read on the
//! way.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use streaming_core::config::{HostConfig, HostEntry, Role};
use streaming_core::patroni::Patroni;
use tokio::sync::{Notify, watch};

/// How often the watcher asks Patroni who leads, and how long one answer may take.
const CHECK_EVERY: Duration = Duration::from_millis(500);
const CHECK_TIMEOUT: Duration = Duration::from_millis(800);
/// A statement (commit included) that takes longer than this is abandoned and retried: the
/// primary may be gone or orphaned.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no PostgreSQL primary is reachable (failover in progress?)")]
    NoPrimary,
    #[error("database statement timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

impl DbError {
    /// Worth retrying on the (possibly new) primary, as opposed to a bad statement.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::NoPrimary | DbError::Timeout(_) => true,
            DbError::Sql(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                // Read-only transaction (a demoted primary), admin shutdown, connection failures
                // and serialization failures: the next attempt may succeed.
                sqlx::Error::Database(db) => {
                    matches!(
                        db.code().as_deref(),
                        Some("25006" | "57P01" | "57P02" | "57P03" | "40001" | "40P01")
                    ) || db.code().is_some_and(|c| c.starts_with("08"))
                }
                _ => false,
            },
        }
    }
}

/// The current primary's pool, or none while there is no primary.
#[derive(Clone)]
struct Current {
    host: String,
    pool: PgPool,
    options: PgConnectOptions,
}

/// Shared handle: cheap to clone, always hands out the pool of the primary as last seen.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    current: RwLock<Option<Current>>,
    /// Bumped on every primary change, so listeners reconnect.
    generation: watch::Sender<u64>,
    /// Wakes the watcher at once after a statement failed.
    recheck: Notify,
    user: String,
    database: String,
    password: String,
    /// The cluster CA: the only root trusted for Patroni and PostgreSQL.
    ca_cert: PathBuf,
}

impl Database {
    /// Starts the watcher. Works with no db host up: callers get `NoPrimary` until one leads.
    pub fn start(
        config: &HostConfig,
        password: String,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        let hosts: Vec<HostEntry> = config.cluster.hosts_with_role(Role::Db).cloned().collect();
        let (generation, _) = watch::channel(0);
        let db = Database {
            inner: Arc::new(Inner {
                current: RwLock::new(None),
                generation,
                recheck: Notify::new(),
                user: config.cluster.database.user.clone(),
                database: config.cluster.database.name.clone(),
                password,
                ca_cert: config.paths.ca_cert.clone(),
            }),
        };
        let watcher = db.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = watcher.watch(hosts) => {}
                () = shutdown => {}
            }
            if let Some(current) = watcher.take() {
                current.pool.close().await;
            }
        });
        db
    }

    /// The primary's pool, or `NoPrimary`.
    pub fn pool(&self) -> Result<PgPool, DbError> {
        self.read().map(|c| c.pool).ok_or(DbError::NoPrimary)
    }

    /// Name of the db host used as primary right now.
    pub fn primary(&self) -> Option<String> {
        self.read().map(|c| c.host)
    }

    /// Changes whenever the primary changes (LISTEN connections must follow).
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// After a failed statement: look for the primary now rather than at the next tick.
    pub fn suspect(&self) {
        self.inner.recheck.notify_one();
    }

    fn read(&self) -> Option<Current> {
        self.inner.current.read().ok().and_then(|c| c.clone())
    }

    fn take(&self) -> Option<Current> {
        self.inner.current.write().ok().and_then(|mut c| c.take())
    }

    async fn watch(&self, hosts: Vec<HostEntry>) {
        let patroni = match Patroni::new(&self.inner.ca_cert, CHECK_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    "cannot build the Patroni client, chat has no database: {e} (CA {})",
                    self.inner.ca_cert.display()
                );
                return;
            }
        };
        let mut ticker = tokio::time::interval(CHECK_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = self.inner.recheck.notified() => {}
            }
            let leaders = patroni.leaders(&hosts).await;
            let current = self.primary();
            let chosen = match &current {
                Some(name) if leaders.iter().any(|h| &h.name == name) => continue,
                _ => leaders.first(),
            };
            match chosen {
                Some(host) => self.switch_to(host).await,
                None => {
                    if let Some(old) = self.take() {
                        tracing::warn!(
                            old = %old.host,
                            "no db host claims to be primary: chat writes wait for a failover"
                        );
                        self.inner.generation.send_modify(|g| *g += 1);
                        close_in_background(old.pool);
                    }
                }
            }
        }
    }

    /// A one-connection pool of its own to the current primary: migrations hold a
    /// session-level advisory lock, so a connection abandoned mid-migration must be closed
    /// (releasing the lock) with this pool, never returned to the shared one.
    pub fn dedicated(&self) -> Result<PgPool, DbError> {
        let options = self.read().ok_or(DbError::NoPrimary)?.options;
        Ok(PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(STATEMENT_TIMEOUT)
            .connect_lazy_with(options))
    }

    fn options(&self, host: &HostEntry) -> PgConnectOptions {
        PgConnectOptions::new()
            .host(&host.address.to_string())
            .port(host.ports.postgres)
            .username(&self.inner.user)
            .password(&self.inner.password)
            .database(&self.inner.database)
            .ssl_mode(PgSslMode::VerifyFull)
            .ssl_root_cert(&self.inner.ca_cert)
            .application_name("streaming-cluster")
    }

    async fn switch_to(&self, host: &HostEntry) {
        let options = self.options(host);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(0)
            .acquire_timeout(STATEMENT_TIMEOUT)
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(options.clone());
        let old = {
            let Ok(mut current) = self.inner.current.write() else {
                return;
            };
            current.replace(Current {
                host: host.name.clone(),
                pool,
                options,
            })
        };
        tracing::info!(
            primary = %host.name,
            previous = old.as_ref().map(|o| o.host.as_str()).unwrap_or("none"),
            "database primary"
        );
        metrics::counter!("chat_db_primary_changes_total").increment(1);
        self.inner.generation.send_modify(|g| *g += 1);
        if let Some(old) = old {
            close_in_background(old.pool);
        }
    }
}

/// Closing waits for connections in use, and those may hang with a hung host: the watcher must
/// not wait with them.
fn close_in_background(pool: PgPool) {
    tokio::spawn(async move { pool.close().await });
}

/// Runs `op` against the primary, retrying transient failures (no primary, timeouts, a demoted
/// node, dropped connections) until `deadline` has passed. `op` must be idempotent.
pub async fn with_retry<T, F, Fut>(
    db: &Database,
    deadline: Duration,
    mut op: F,
) -> Result<T, DbError>
where
    F: FnMut(PgPool) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut generations = db.generations();
    loop {
        generations.borrow_and_update();
        let attempt = match db.pool() {
            // A new primary abandons the attempt on the old one at once (it may hang there
            // until the statement timeout): the retry is idempotent.
            Ok(pool) => tokio::select! {
                result = tokio::time::timeout(STATEMENT_TIMEOUT, op(pool)) => match result {
                    Ok(result) => result,
                    Err(_) => Err(DbError::Timeout(STATEMENT_TIMEOUT)),
                },
                _ = generations.changed() => Err(DbError::NoPrimary),
            },
            Err(e) => Err(e),
        };
        match attempt {
            Err(e) if e.is_transient() && started.elapsed() < deadline => {
                db.suspect();
                tracing::debug!("database attempt failed, retrying: {e}");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = generations.changed() => {}
                }
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_the_failover_ones() {
        assert!(DbError::NoPrimary.is_transient());
        assert!(DbError::Timeout(STATEMENT_TIMEOUT).is_transient());
        assert!(DbError::Sql(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!DbError::Sql(sqlx::Error::RowNotFound).is_transient());
        assert!(!DbError::Sql(sqlx::Error::ColumnNotFound("x".into())).is_transient());
    }
}
