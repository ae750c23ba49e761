//! Every SQL statement of accounts and chat. Statements are plain strings run with the `query`
//! functions (no compile-time checking: the build needs no database).
//!
//! The chat is an append-only log of events per channel numbered by `channels.last_seq`, taken
//! under its row lock in the inserting transaction: events become visible in `seq` order, so
//! "everything after seq N" never skips a late commit. Each event carries the client's id, unique
//! per user and channel, so a retry after a lost acknowledgement returns the stored event.

use serde::Serialize;
use sqlx::{PgPool, Postgres, Row, Transaction};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::db::DbError;

/// The NOTIFY channel broadcasts LISTEN on; the payload is the chat channel's name.
pub const NOTIFY_CHANNEL: &str = "chat_events";

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub use streaming_core::chat_protocol::{Event, UserRole};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub role: UserRole,
}

/// What a user asks to append to a channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Message { text: String },
    Delete { target: i64 },
    Mute { user: String, seconds: u32 },
    Ban { user: String },
    Unban { user: String },
}

impl Action {
    fn kind(&self) -> &'static str {
        match self {
            Action::Message { .. } => "message",
            Action::Delete { .. } => "delete",
            Action::Mute { .. } => "mute",
            Action::Ban { .. } => "ban",
            Action::Unban { .. } => "unban",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("you are banned from this channel")]
    Banned,
    #[error("you are muted until {0}")]
    Muted(String),
    #[error("only moderators may do that, and only to viewers (admins also to moderators)")]
    Forbidden,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("that name is taken")]
    NameTaken,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(DbError::Sql(e))
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Runs the migrations (sqlx holds a session-level advisory lock: concurrent starters wait for
/// the first) and creates the configured channels if missing. Give it a pool of its own
/// (`Database::dedicated`) and close that pool after.
pub async fn prepare(pool: &PgPool, channels: &[String]) -> Result<(), StoreError> {
    MIGRATOR
        .run(pool)
        .await
        .map_err(|e| StoreError::Db(DbError::Sql(e.into())))?;
    for name in channels {
        sqlx::query("INSERT INTO channels (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(name)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// The `admin` account's password hash, if the account exists.
pub async fn admin_hash(pool: &PgPool) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT password_hash FROM users WHERE name_key = 'admin'")
            .fetch_optional(pool)
            .await?,
    )
}

/// Gives the `admin` account `new_hash`: creates it when `old_hash` is `None`, else replaces
/// `old_hash` and ends every admin session. Compare-and-set, so broadcasts reading the same
/// new secret at once store it once; false when another got there first.
pub async fn set_admin_password(
    pool: &PgPool,
    old_hash: Option<&str>,
    new_hash: &str,
) -> Result<bool, StoreError> {
    let Some(old_hash) = old_hash else {
        let done = sqlx::query(
            "INSERT INTO users (name, name_key, password_hash, role) \
             VALUES ('admin', 'admin', $1, 'admin') ON CONFLICT (name_key) DO NOTHING",
        )
        .bind(new_hash)
        .execute(pool)
        .await?;
        return Ok(done.rows_affected() == 1);
    };
    let mut tx = pool.begin().await?;
    let id: Option<i64> = sqlx::query_scalar(
        "UPDATE users SET password_hash = $2, role = 'admin' \
         WHERE name_key = 'admin' AND password_hash = $1 RETURNING id",
    )
    .bind(old_hash)
    .bind(new_hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = id else {
        tx.rollback().await?;
        return Ok(false);
    };
    sqlx::query("DELETE FROM sessions WHERE user_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

fn user_from(row: &sqlx::postgres::PgRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: UserRole::parse(row.try_get::<&str, _>("role")?),
    })
}

/// Creates an account. A name that is taken is `NameTaken`, except when the row holds this
/// very hash: a salted hash is never made twice, so that row is this call's own earlier
/// attempt (committed, but its answer lost in a failover) and the retry answers with it.
pub async fn create_user(
    pool: &PgPool,
    name: &str,
    password_hash: &str,
) -> Result<User, StoreError> {
    let row = sqlx::query(
        "INSERT INTO users (name, name_key, password_hash) VALUES ($1, lower($1), $2) \
         ON CONFLICT (name_key) DO NOTHING RETURNING id, name, role",
    )
    .bind(name)
    .bind(password_hash)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = row {
        return Ok(user_from(&row)?);
    }
    let own = sqlx::query(
        "SELECT id, name, role FROM users WHERE name_key = lower($1) AND password_hash = $2",
    )
    .bind(name)
    .bind(password_hash)
    .fetch_optional(pool)
    .await?;
    match own {
        Some(row) => Ok(user_from(&row)?),
        None => Err(StoreError::NameTaken),
    }
}

/// The user and password hash for a name, case-insensitively.
pub async fn find_user(pool: &PgPool, name: &str) -> Result<Option<(User, String)>, StoreError> {
    let row =
        sqlx::query("SELECT id, name, role, password_hash FROM users WHERE name_key = lower($1)")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(match row {
        Some(row) => Some((user_from(&row)?, row.try_get("password_hash")?)),
        None => None,
    })
}

pub async fn create_session(
    pool: &PgPool,
    session: uuid::Uuid,
    user_id: i64,
    expires: OffsetDateTime,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO sessions (id, user_id, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(session)
    .bind(user_id)
    .bind(expires)
    .execute(pool)
    .await?;
    Ok(())
}

/// The session's user with their current role, if the session still exists.
pub async fn session_user(pool: &PgPool, session: uuid::Uuid) -> Result<Option<User>, StoreError> {
    let row = sqlx::query(
        "SELECT u.id, u.name, u.role FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE s.id = $1 AND s.expires_at > now()",
    )
    .bind(session)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some(row) => Some(user_from(&row)?),
        None => None,
    })
}

pub async fn delete_session(pool: &PgPool, session: uuid::Uuid) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM sessions WHERE id = $1")
        .bind(session)
        .execute(pool)
        .await?;
    Ok(())
}

/// Changes a role on behalf of `by` (an admin: the caller checks). An admin's own role may
/// only be changed by that admin: `Forbidden` otherwise; `None` when there is no such user.
pub async fn set_role(
    pool: &PgPool,
    by: &User,
    name: &str,
    role: UserRole,
) -> Result<Option<User>, StoreError> {
    let row = sqlx::query(
        "UPDATE users SET role = $2 WHERE name_key = lower($1) AND (role <> 'admin' OR id = $3) \
         RETURNING id, name, role",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(by.id)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = row {
        return Ok(Some(user_from(&row)?));
    }
    let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM users WHERE name_key = lower($1)")
        .bind(name)
        .fetch_optional(pool)
        .await?;
    match exists {
        Some(_) => Err(StoreError::Forbidden),
        None => Ok(None),
    }
}

/// Outcome of `append`: the event's sequence number, and whether it was already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: i64,
    pub duplicate: bool,
}

/// Appends one event idempotently: a `(user, client_id)` already stored answers with its seq.
/// Sanctions and roles are checked in the same transaction, against committed state.
pub async fn append(
    pool: &PgPool,
    channel: &str,
    actor: &User,
    client_id: &str,
    action: &Action,
) -> Result<Appended, StoreError> {
    let mut tx = pool.begin().await?;
    // The row lock serialises appends to this channel (and any retry of the same id).
    let seq: i64 = sqlx::query_scalar(
        "UPDATE channels SET last_seq = last_seq + 1 WHERE name = $1 RETURNING last_seq",
    )
    .bind(channel)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(StoreError::NotFound("channel"))?;
    let existing: Option<i64> = sqlx::query_scalar(
        "SELECT seq FROM chat_events WHERE channel = $1 AND user_id = $2 AND client_id = $3",
    )
    .bind(channel)
    .bind(actor.id)
    .bind(client_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(seq) = existing {
        tx.rollback().await?;
        return Ok(Appended {
            seq,
            duplicate: true,
        });
    }
    let role: String = sqlx::query_scalar("SELECT role FROM users WHERE id = $1")
        .bind(actor.id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("user"))?;
    let role = UserRole::parse(&role);
    let fields = action_fields(&mut tx, channel, actor, role, action).await?;
    insert_event(&mut tx, channel, seq, actor, client_id, action, &fields).await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(channel)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Appended {
        seq,
        duplicate: false,
    })
}

/// The columns of one event row beyond who, where and which kind.
#[derive(Debug, Default)]
struct EventFields<'a> {
    body: Option<&'a str>,
    target_seq: Option<i64>,
    target_user: Option<i64>,
    until: Option<OffsetDateTime>,
}

/// Checks that `actor` (with `role`, as committed) may do `action` and applies its side effect
/// (a sanction row), inside the append's transaction; returns what the event row records.
async fn action_fields<'a>(
    tx: &mut Transaction<'_, Postgres>,
    channel: &str,
    actor: &User,
    role: UserRole,
    action: &'a Action,
) -> Result<EventFields<'a>, StoreError> {
    match action {
        Action::Message { text } => {
            check_sanctions(tx, channel, actor.id).await?;
            Ok(EventFields {
                body: Some(text.as_str()),
                ..EventFields::default()
            })
        }
        Action::Delete { target } => {
            let target_seq = deletable(tx, channel, actor, role, *target).await?;
            Ok(EventFields {
                target_seq: Some(target_seq),
                ..EventFields::default()
            })
        }
        Action::Mute { user, .. } | Action::Ban { user } | Action::Unban { user } => {
            let (target_user, until) = moderate(tx, channel, role, user, action).await?;
            Ok(EventFields {
                target_user: Some(target_user),
                until,
                ..EventFields::default()
            })
        }
    }
}

/// The seq of the message a moderator may delete: their own, or one by a user their role
/// outranks.
async fn deletable(
    tx: &mut Transaction<'_, Postgres>,
    channel: &str,
    actor: &User,
    role: UserRole,
    target: i64,
) -> Result<i64, StoreError> {
    if !role.moderates() {
        return Err(StoreError::Forbidden);
    }
    let found = sqlx::query(
        "SELECT e.seq, e.user_id, u.role FROM chat_events e JOIN users u ON u.id = e.user_id \
         WHERE e.channel = $1 AND e.seq = $2 AND e.kind = 'message'",
    )
    .bind(channel)
    .bind(target)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or(StoreError::NotFound("message"))?;
    let author: i64 = found.try_get("user_id")?;
    let author_role = UserRole::parse(found.try_get::<&str, _>("role")?);
    // Anyone who moderates may take back their own message.
    if author != actor.id && !role.may_moderate(author_role) {
        return Err(StoreError::Forbidden);
    }
    Ok(found.try_get::<i64, _>("seq")?)
}

/// Mute, ban or unban `user` in the channel, if `role` outranks theirs: returns the target's id
/// and, for a mute, its end.
async fn moderate(
    tx: &mut Transaction<'_, Postgres>,
    channel: &str,
    role: UserRole,
    user: &str,
    action: &Action,
) -> Result<(i64, Option<OffsetDateTime>), StoreError> {
    if !role.moderates() {
        return Err(StoreError::Forbidden);
    }
    let row = sqlx::query("SELECT id, name, role FROM users WHERE name_key = lower($1)")
        .bind(user)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound("user"))?;
    let target = user_from(&row)?;
    if !role.may_moderate(target.role) {
        return Err(StoreError::Forbidden);
    }
    let mut until = None;
    match action {
        Action::Mute { seconds, .. } => {
            let end = OffsetDateTime::now_utc() + time::Duration::seconds(i64::from(*seconds));
            until = Some(end);
            sanction(
                tx,
                channel,
                target.id,
                "muted_until = EXCLUDED.muted_until",
                false,
                Some(end),
            )
            .await?;
        }
        Action::Ban { .. } => {
            sanction(tx, channel, target.id, "banned = true", true, None).await?;
        }
        _ => {
            sanction(
                tx,
                channel,
                target.id,
                "banned = false, muted_until = NULL",
                false,
                None,
            )
            .await?;
        }
    }
    Ok((target.id, until))
}

/// The event row itself, at the seq the append claimed.
async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    channel: &str,
    seq: i64,
    actor: &User,
    client_id: &str,
    action: &Action,
    fields: &EventFields<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO chat_events (channel, seq, kind, user_id, client_id, body, target_seq, target_user, until) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(channel)
    .bind(seq)
    .bind(action.kind())
    .bind(actor.id)
    .bind(client_id)
    .bind(fields.body)
    .bind(fields.target_seq)
    .bind(fields.target_user)
    .bind(fields.until)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn check_sanctions(
    tx: &mut Transaction<'_, Postgres>,
    channel: &str,
    user_id: i64,
) -> Result<(), StoreError> {
    let row = sqlx::query(
        "SELECT banned, muted_until FROM sanctions WHERE channel = $1 AND user_id = $2",
    )
    .bind(channel)
    .bind(user_id)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(row) = row {
        if row.try_get::<bool, _>("banned")? {
            return Err(StoreError::Banned);
        }
        if let Some(until) = row.try_get::<Option<OffsetDateTime>, _>("muted_until")?
            && until > OffsetDateTime::now_utc()
        {
            return Err(StoreError::Muted(rfc3339(until)));
        }
    }
    Ok(())
}

/// Upserts a sanctions row; `update` is one of three fixed SET clauses (never user input).
async fn sanction(
    tx: &mut Transaction<'_, Postgres>,
    channel: &str,
    user_id: i64,
    update: &'static str,
    banned: bool,
    muted_until: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "INSERT INTO sanctions (channel, user_id, banned, muted_until) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (channel, user_id) DO UPDATE SET {update}"
    ))
    .bind(channel)
    .bind(user_id)
    .bind(banned)
    .bind(muted_until)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

const EVENT_COLUMNS: &str = "SELECT e.seq, e.kind, e.client_id, e.body, e.target_seq, e.until, e.created_at, \
     u.name AS actor, u.role AS actor_role, t.name AS target_name \
     FROM chat_events e JOIN users u ON u.id = e.user_id LEFT JOIN users t ON t.id = e.target_user";

/// Events with `seq > after`, oldest first, at most `limit`.
pub async fn events_after(
    pool: &PgPool,
    channel: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<Event>, StoreError> {
    let rows = sqlx::query(&format!(
        "{EVENT_COLUMNS} WHERE e.channel = $1 AND e.seq > $2 ORDER BY e.seq LIMIT $3"
    ))
    .bind(channel)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(event_from).collect()
}

/// The highest sequence number of a channel (0 when empty).
pub async fn last_seq(pool: &PgPool, channel: &str) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT last_seq FROM channels WHERE name = $1")
            .bind(channel)
            .fetch_optional(pool)
            .await?
            .unwrap_or(0),
    )
}

fn event_from(row: &sqlx::postgres::PgRow) -> Result<Event, StoreError> {
    let seq: i64 = row.try_get("seq")?;
    let by: String = row.try_get("actor")?;
    let target_name: Option<String> = row.try_get("target_name")?;
    let kind: &str = row.try_get("kind")?;
    Ok(match kind {
        "message" => Event::Message {
            seq,
            id: row.try_get("client_id")?,
            user: by,
            role: UserRole::parse(row.try_get::<&str, _>("actor_role")?),
            text: row
                .try_get::<Option<String>, _>("body")?
                .unwrap_or_default(),
            at: rfc3339(row.try_get("created_at")?),
        },
        "delete" => Event::Delete {
            seq,
            target: row.try_get::<Option<i64>, _>("target_seq")?.unwrap_or(0),
            by,
        },
        "mute" => Event::Mute {
            seq,
            user: target_name.unwrap_or_default(),
            until: row
                .try_get::<Option<OffsetDateTime>, _>("until")?
                .map(rfc3339)
                .unwrap_or_default(),
            by,
        },
        "ban" => Event::Ban {
            seq,
            user: target_name.unwrap_or_default(),
            by,
        },
        _ => Event::Unban {
            seq,
            user: target_name.unwrap_or_default(),
            by,
        },
    })
}
