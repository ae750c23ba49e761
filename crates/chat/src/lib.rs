//! Accounts and live chat, served by every broadcast, stored in PostgreSQL under Patroni.
//!
//! - db: which db host is primary (Patroni REST), one pool to it, retries across failovers.
//! - store: every SQL statement; the chat is an append-only, per-channel numbered event log.
//! - hub: LISTEN/NOTIFY fan-out to this broadcast's clients, with replay from a last seq.
//! - ws: the WebSocket protocol; socket: reading it at every wait and its close handshake;
//!   api: register/login/logout/me/role over HTTPS.
//! - session, password, limits: bearer session tokens, argon2, rate and size limits.
//! - throttle: failed logins, counted in the database for every broadcast at once.

pub mod api;
pub mod db;
pub mod hub;
pub mod limits;
pub mod password;
pub mod session;
mod socket;
pub mod store;
pub mod throttle;
pub mod ws;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use streaming_core::config::HostConfig;
use streaming_core::lifecycle::Lifecycle;
use streaming_core::secrets::read_secret;
use streaming_core::token::unix_now;
use tokio::sync::{Semaphore, watch};

use crate::db::{Database, DbError, with_retry};
use crate::hub::Hub;
use crate::limits::{ConnectionCounter, RateLimiter};
use crate::session::{SessionError, SessionSigner};
use crate::store::{StoreError, User, UserRole};

/// After SIGTERM, how long the service waits for its chat sockets to close: each sends its
/// acks under way (1 s at most), then 1001, and waits up to 2 s for the client's Close. Within
/// the 5 s that `streamctl down` allows before SIGKILL.
const SHUTDOWN_CLOSE: Duration = Duration::from_secs(4);

/// A session checked against the database recently is trusted for this long, so a reconnect
/// storm does not become a query storm; a logout reaches every broadcast within it.
const SESSION_CACHE: Duration = Duration::from_secs(5);

pub struct Chat {
    pub db: Database,
    pub hub: Arc<Hub>,
    /// This broadcast's name, told to clients so they know where they are.
    pub broadcast: String,
    signer: RwLock<SessionSigner>,
    origins: RwLock<Vec<String>>,
    /// How long a write keeps retrying through a failover before the client is told to resend:
    /// Patroni's ttl plus a margin.
    retry_window: Duration,
    lifecycle: Lifecycle,
    rates: RateLimiter<i64>,
    connections: ConnectionCounter,
    /// Chat sockets this broadcast holds at most (`limits.chat_sockets`).
    max_sockets: AtomicUsize,
    /// Database reads for replays at once: a reconnect storm queues here, not on the pool.
    replay_reads: Semaphore,
    /// Tells the preparing task to check the admin password again (SIGHUP).
    admin_check: watch::Sender<()>,
    sessions: Mutex<HashMap<uuid::Uuid, (User, Instant)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Token(#[from] SessionError),
    #[error("session ended (logged out or expired): log in again")]
    Revoked,
}

impl Chat {
    /// Reads the secrets and starts the database watcher, schema preparation and fan-out. The
    /// database may be down: everything waits for a primary in the background.
    pub fn start(
        config: &HostConfig,
        allowed_origins: Vec<String>,
        lifecycle: Lifecycle,
    ) -> anyhow::Result<Arc<Chat>> {
        let password = read_secret(&config.paths.db_password).context("database password")?;
        // Read now so a missing file stops the start; read again at each check, so a rotated
        // secret is what every broadcast stores after a restart, a failover or a SIGHUP.
        read_secret(&config.paths.admin_password).context("admin password")?;
        let token_key = read_secret(&config.paths.token_key).context("token key")?;
        let channels: Vec<String> = config
            .cluster
            .channels
            .iter()
            .map(|c| c.name.clone())
            .collect();

        let shutdown = {
            let lifecycle = lifecycle.clone();
            async move { lifecycle.shutdown().await }
        };
        let db = Database::start(config, password, shutdown);
        let hub = Hub::new(&channels);
        let chat = Arc::new(Chat {
            db: db.clone(),
            hub: hub.clone(),
            broadcast: config.name.clone(),
            signer: RwLock::new(SessionSigner::new(token_key.as_bytes())),
            origins: RwLock::new(allowed_origins),
            retry_window: Duration::from_secs(u64::from(config.cluster.database.ttl) + 5),
            lifecycle: lifecycle.clone(),
            rates: RateLimiter::new(limits::MESSAGE_BURST, limits::MESSAGES_PER_SECOND),
            connections: ConnectionCounter::default(),
            max_sockets: AtomicUsize::new(config.cluster.limits.chat_sockets as usize),
            replay_reads: Semaphore::new(REPLAY_READS),
            admin_check: watch::channel(()).0,
            sessions: Mutex::new(HashMap::new()),
        });

        let (prepared_tx, prepared_rx) = watch::channel(0u64);
        tokio::spawn(prepare_each_primary(
            db.clone(),
            channels,
            config.paths.admin_password.clone(),
            chat.admin_check.subscribe(),
            prepared_tx,
            lifecycle.clone(),
        ));
        let fan_out = hub.run(db, prepared_rx);
        tokio::spawn(async move {
            tokio::select! {
                () = fan_out => {}
                () = lifecycle.shutdown() => {}
            }
        });
        Ok(chat)
    }

    /// SIGHUP: a new token key, a changed host list or limit, a rotated admin password.
    pub fn reload(&self, config: &HostConfig, allowed_origins: Vec<String>) -> anyhow::Result<()> {
        let token_key = read_secret(&config.paths.token_key).context("token key")?;
        self.max_sockets.store(
            config.cluster.limits.chat_sockets as usize,
            Ordering::Relaxed,
        );
        self.admin_check.send_replace(());
        if let Ok(mut signer) = self.signer.write() {
            *signer = SessionSigner::new(token_key.as_bytes());
        }
        if let Ok(mut origins) = self.origins.write() {
            *origins = allowed_origins;
        }
        Ok(())
    }

    fn signer(&self) -> SessionSigner {
        streaming_core::sync::read(&self.signer).clone()
    }

    /// Resolves after a shutdown once every chat socket has closed (or after a few seconds):
    /// awaited beside the HTTP drain, so clients get their 1001 before the process exits.
    pub async fn closed(&self) {
        self.lifecycle.shutdown().await;
        let closing = self.connections.until_empty();
        if tokio::time::timeout(SHUTDOWN_CLOSE, closing).await.is_err() {
            tracing::warn!(
                open = self.connections.open(),
                "chat sockets still open after {SHUTDOWN_CLOSE:?}: dropping them"
            );
        }
    }

    /// Browser pages from these origins may open the chat socket.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.origins
            .read()
            .is_ok_and(|o| o.iter().any(|a| a == origin))
    }

    /// Retries a store operation through a failover, for at most the retry window.
    pub async fn retry<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnMut(sqlx::PgPool) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        retry_store(&self.db, self.retry_window, op).await
    }

    /// The user behind a session token. The database has the last word (logout, role changes);
    /// while it is failing over, a correctly signed, unexpired token is trusted as a viewer.
    pub async fn authenticate(&self, token: &str) -> Result<User, AuthError> {
        let claims = self.signer().verify(token, unix_now())?;
        if let Ok(cache) = self.sessions.lock()
            && let Some((user, at)) = cache.get(&claims.session)
            && at.elapsed() < SESSION_CACHE
        {
            return Ok(user.clone());
        }
        let session = claims.session;
        match retry_store(&self.db, Duration::from_secs(2), |pool| async move {
            store::session_user(&pool, session).await
        })
        .await
        {
            Ok(Some(user)) if user.id == claims.user_id => {
                if let Ok(mut cache) = self.sessions.lock() {
                    if cache.len() > 50_000 {
                        cache.retain(|_, (_, at)| at.elapsed() < SESSION_CACHE);
                    }
                    cache.insert(claims.session, (user.clone(), Instant::now()));
                }
                Ok(user)
            }
            Ok(_) => Err(AuthError::Revoked),
            Err(e) => {
                tracing::warn!("session check deferred, database unavailable: {e}");
                Ok(User {
                    id: claims.user_id,
                    name: claims.name,
                    role: UserRole::Viewer,
                })
            }
        }
    }

    fn forget_session(&self, session: uuid::Uuid) {
        if let Ok(mut cache) = self.sessions.lock() {
            cache.remove(&session);
        }
    }
}

async fn retry_store<T, F, Fut>(db: &Database, window: Duration, mut op: F) -> Result<T, StoreError>
where
    F: FnMut(sqlx::PgPool) -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    // Store errors that are not database errors (banned, name taken...) must not be retried:
    // carry them through `with_retry` as a successful outcome.
    let outcome = with_retry(db, window, |pool| {
        let attempt = op(pool);
        async move {
            match attempt.await {
                Err(StoreError::Db(e)) => Err(e),
                other => Ok(other),
            }
        }
    })
    .await;
    match outcome {
        Ok(inner) => inner,
        Err(e) => Err(StoreError::Db(e)),
    }
}

/// How often the admin password is checked again and old login attempts are dropped, besides
/// on each new primary and on SIGHUP.
const HOUSEKEEPING: Duration = Duration::from_secs(3600);

/// Database reads for chat replays that run at once on one broadcast.
const REPLAY_READS: usize = 4;

/// Migrations can wait on another starter's lock: give them time, and on timeout drop the
/// connection, which ends the session and any lock it holds.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);

async fn prepare_once(db: &Database, channels: &[String]) -> Result<(), StoreError> {
    let pool = db.dedicated()?;
    let result = tokio::time::timeout(PREPARE_TIMEOUT, store::prepare(&pool, channels)).await;
    // In the background: closing waits for the (possibly hung) connection to be released.
    tokio::spawn(async move { pool.close().await });
    match result {
        Ok(result) => result,
        Err(_) => Err(StoreError::Db(DbError::Timeout(PREPARE_TIMEOUT))),
    }
}

#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("cannot read the admin password: {0}")]
    Secret(#[from] streaming_core::secrets::SecretError),
    #[error(transparent)]
    Hash(#[from] password::HashError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes the `admin` account's password the secret file's: creates the account, or, when the
/// stored hash no longer verifies (the secret was rotated), stores the new hash and ends every
/// admin session. The password itself is never logged.
async fn sync_admin(db: &Database, secret: &std::path::Path) -> Result<(), AdminError> {
    let secret = read_secret(secret)?;
    let pool = db.pool().map_err(StoreError::from)?;
    let stored = store::admin_hash(&pool).await?;
    if let Some(stored) = &stored
        && password::verify(Some(stored.clone()), secret.clone()).await?
    {
        return Ok(());
    }
    let new_hash = password::hash(secret).await?;
    let changed = store::set_admin_password(&pool, stored.as_deref(), &new_hash).await?;
    match (stored.is_some(), changed) {
        (false, true) => tracing::info!("admin account created from the admin-password secret"),
        (true, true) => tracing::warn!(
            "admin password changed to the admin-password secret's; admin sessions revoked"
        ),
        // Another broadcast stored it first: checked again on the next round.
        (_, false) => {}
    }
    Ok(())
}

/// Each new primary gets the schema (migrations are advisory-locked, so broadcasts racing here
/// apply them once), the channels and the admin account; the fan-out waits for this. The
/// admin password is checked again on each new primary and on request (SIGHUP).
async fn prepare_each_primary(
    db: Database,
    channels: Vec<String>,
    admin_secret: PathBuf,
    mut admin_check: watch::Receiver<()>,
    prepared: watch::Sender<u64>,
    lifecycle: Lifecycle,
) {
    let mut generations = db.generations();
    loop {
        let generation = *generations.borrow_and_update();
        if db.pool().is_ok() {
            let result = prepare_once(&db, &channels).await;
            match result {
                Ok(()) => {
                    tracing::info!(
                        primary = db.primary().unwrap_or_default(),
                        "chat schema ready"
                    );
                    prepared.send_replace(generation);
                    loop {
                        admin_check.borrow_and_update();
                        // A hung primary must not hang this task: the next one needs it.
                        let synced =
                            tokio::time::timeout(PREPARE_TIMEOUT, sync_admin(&db, &admin_secret))
                                .await
                                .unwrap_or_else(|_| {
                                    Err(StoreError::Db(DbError::Timeout(PREPARE_TIMEOUT)).into())
                                });
                        if let Err(e) = synced {
                            tracing::error!("checking the admin password failed, retrying: {e}");
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                                () = lifecycle.shutdown() => return,
                            }
                            if generations.has_changed().unwrap_or(true) {
                                break;
                            }
                            continue;
                        }
                        if let Ok(pool) = db.pool() {
                            let forget = throttle::forget_old(&pool, &throttle::RULE);
                            match tokio::time::timeout(PREPARE_TIMEOUT, forget).await {
                                Ok(Ok(_)) => {}
                                Ok(Err(e)) => {
                                    tracing::warn!("dropping old login attempts failed: {e}")
                                }
                                Err(_) => tracing::warn!("dropping old login attempts timed out"),
                            }
                        }
                        tokio::select! {
                            r = generations.changed() => if r.is_err() { return } else { break },
                            r = admin_check.changed() => if r.is_err() { return },
                            () = tokio::time::sleep(HOUSEKEEPING) => {}
                            () = lifecycle.shutdown() => return,
                        }
                    }
                    continue;
                }
                Err(StoreError::Db(DbError::NoPrimary)) => {}
                Err(e) => tracing::error!("preparing the chat database failed, retrying: {e}"),
            }
        }
        tokio::select! {
            _ = generations.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = lifecycle.shutdown() => return,
        }
    }
}
