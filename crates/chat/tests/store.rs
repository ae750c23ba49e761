//! The chat store against a real PostgreSQL 15 (Debian's package, started here as a throwaway
//! server on 127.81.0.1): idempotent appends, gap-free ordering under concurrent writers,
//! sanctions, accounts. Failover itself is covered by streamctl's end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use streaming_chat::store::{self, Action, Event, StoreError, User, UserRole};

const BIN: &str = "/usr/lib/postgresql/15/bin";
const ADDR: &str = "127.81.0.1";

/// A PostgreSQL server in a temp dir, run as the `postgres` user (initdb refuses root).
struct TempPostgres {
    _dir: tempfile::TempDir,
    server: Child,
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn as_postgres(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
        .arg(program)
        .env("HOME", "/tmp");
    cmd
}

fn postgres_ids() -> (u32, u32) {
    let field = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("id postgres");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (field("-u"), field("-g"))
}

async fn start_postgres(port: u16) -> (TempPostgres, PgPool) {
    assert!(
        Path::new(BIN).join("postgres").exists(),
        "PostgreSQL 15 is missing: run scripts/setup-debian.sh (apt package postgresql-15)"
    );
    let dir = tempfile::Builder::new()
        .prefix("chat-store-")
        .tempdir()
        .unwrap();
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    let data: PathBuf = dir.path().join("data");
    let status = as_postgres(&Path::new(BIN).join("initdb"))
        .args(["-D"])
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "initdb failed");
    let server = as_postgres(&Path::new(BIN).join("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-h", ADDR, "-p", &port.to_string(), "-k"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pg = TempPostgres { _dir: dir, server };

    let admin = PgConnectOptions::new()
        .host(ADDR)
        .port(port)
        .username("postgres")
        .database("postgres");
    let started = Instant::now();
    let admin = loop {
        match PgPoolOptions::new()
            .max_connections(1)
            .connect_with(admin.clone())
            .await
        {
            Ok(pool) => break pool,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("PostgreSQL did not start: {e}"),
        }
    };
    sqlx::query("CREATE ROLE streaming LOGIN PASSWORD 'pw'")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE streaming OWNER streaming")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    (pg, app_pool(port).await)
}

async fn app_pool(port: u16) -> PgPool {
    PgPoolOptions::new()
        .max_connections(12)
        .connect_with(
            PgConnectOptions::new()
                .host(ADDR)
                .port(port)
                .username("streaming")
                .password("pw")
                .database("streaming"),
        )
        .await
        .unwrap()
}

async fn user(pool: &PgPool, name: &str) -> User {
    store::create_user(pool, name, "hash").await.unwrap()
}

fn message(text: &str) -> Action {
    Action::Message { text: text.into() }
}

#[tokio::test]
#[ignore = "needs PostgreSQL 15 (scripts/setup-debian.sh); run by scripts/test.sh"]
async fn chat_store_on_real_postgres() {
    let (_pg, pool) = start_postgres(55432).await;

    // Several services starting at once: the migrations apply once, nobody fails.
    let mut starters = Vec::new();
    for _ in 0..4 {
        let pool = app_pool(55432).await;
        starters.push(tokio::spawn(async move {
            store::prepare(&pool, &["test".into()], "$argon2id$admin").await
        }));
    }
    for s in starters {
        s.await.unwrap().expect("concurrent prepare");
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, store::MIGRATOR.iter().count() as i64);

    accounts(&pool).await;
    idempotent_appends(&pool).await;
    ordered_under_concurrency(&pool).await;
    moderation(&pool).await;
}

async fn accounts(pool: &PgPool) {
    let alice = user(pool, "Alice").await;
    assert_eq!(alice.role, UserRole::Viewer);
    assert!(matches!(
        store::create_user(pool, "aLiCe", "h").await,
        Err(StoreError::NameTaken)
    ));
    let (found, hash) = store::find_user(pool, "ALICE").await.unwrap().unwrap();
    assert_eq!((found.id, hash.as_str()), (alice.id, "hash"));
    assert!(store::find_user(pool, "nobody").await.unwrap().is_none());
    // SQL metacharacters are data.
    assert!(
        store::find_user(pool, "' OR '1'='1")
            .await
            .unwrap()
            .is_none()
    );

    let session = uuid::Uuid::new_v4();
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    store::create_session(pool, session, alice.id, later)
        .await
        .unwrap();
    assert_eq!(
        store::session_user(pool, session)
            .await
            .unwrap()
            .unwrap()
            .id,
        alice.id
    );
    store::delete_session(pool, session).await.unwrap();
    assert!(
        store::session_user(pool, session).await.unwrap().is_none(),
        "logout revokes"
    );

    let expired = uuid::Uuid::new_v4();
    let past = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    store::create_session(pool, expired, alice.id, past)
        .await
        .unwrap();
    assert!(store::session_user(pool, expired).await.unwrap().is_none());

    let (admin, _) = store::find_user(pool, "admin").await.unwrap().unwrap();
    assert_eq!(admin.role, UserRole::Admin, "created by prepare");
    let promoted = store::set_role(pool, "alice", UserRole::Moderator)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(promoted.role, UserRole::Moderator);
    store::set_role(pool, "alice", UserRole::Viewer)
        .await
        .unwrap();
}

async fn idempotent_appends(pool: &PgPool) {
    let bob = user(pool, "bob").await;
    let nasty = "<img src=x onerror=alert(1)> '; DROP TABLE chat_events; -- \u{1F600}";
    let first = store::append(pool, "test", &bob, "bob-1", &message(nasty))
        .await
        .unwrap();
    assert!(!first.duplicate);
    // The client did not get the ack and resends: same seq, one row.
    let again = store::append(pool, "test", &bob, "bob-1", &message(nasty))
        .await
        .unwrap();
    assert_eq!((again.seq, again.duplicate), (first.seq, true));
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM chat_events WHERE client_id = 'bob-1'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(rows, 1);
    // Another user may use the same client id.
    let carol = user(pool, "carol").await;
    let other = store::append(pool, "test", &carol, "bob-1", &message("hi"))
        .await
        .unwrap();
    assert_eq!(other.seq, first.seq + 1);

    let events = store::events_after(pool, "test", first.seq - 1, 10)
        .await
        .unwrap();
    match &events[0] {
        Event::Message { text, user, id, .. } => {
            assert_eq!(
                (text.as_str(), user.as_str(), id.as_str()),
                (nasty, "bob", "bob-1")
            );
        }
        other => panic!("expected a message, got {other:?}"),
    }
    assert!(matches!(
        store::append(pool, "nochannel", &bob, "x", &message("hi")).await,
        Err(StoreError::NotFound("channel"))
    ));
}

/// Writers on many connections; a reader that only ever asks "after my last seq" must see
/// every seq exactly once and in order: a visible seq never has an invisible predecessor.
async fn ordered_under_concurrency(pool: &PgPool) {
    let start = store::last_seq(pool, "test").await.unwrap();
    let (writers, each) = (8, 40);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let pool = pool.clone();
        let u = user(&pool, &format!("writer{w}")).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                store::append(&pool, "test", &u, &format!("w{w}-{i}"), &message("x"))
                    .await
                    .unwrap();
            }
        }));
    }
    let reader = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut last = start;
            let end = start + writers * each;
            let deadline = Instant::now() + Duration::from_secs(60);
            while last < end && Instant::now() < deadline {
                for e in store::events_after(&pool, "test", last, 500).await.unwrap() {
                    assert_eq!(e.seq(), last + 1, "the reader saw a gap");
                    last = e.seq();
                }
            }
            last
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(reader.await.unwrap(), start + writers * each);
}

async fn moderation(pool: &PgPool) {
    let (admin, _) = store::find_user(pool, "admin").await.unwrap().unwrap();
    let moderator = user(pool, "mod").await;
    store::set_role(pool, "mod", UserRole::Moderator)
        .await
        .unwrap();
    let troll = user(pool, "troll").await;

    // A viewer cannot moderate, and nobody moderates an admin.
    assert!(matches!(
        store::append(
            pool,
            "test",
            &troll,
            "t1",
            &Action::Ban { user: "mod".into() }
        )
        .await,
        Err(StoreError::Forbidden)
    ));
    assert!(matches!(
        store::append(
            pool,
            "test",
            &moderator,
            "m0",
            &Action::Ban {
                user: "admin".into()
            }
        )
        .await,
        Err(StoreError::Forbidden)
    ));

    let bad = store::append(pool, "test", &troll, "t2", &message("spam"))
        .await
        .unwrap();
    let deleted = store::append(
        pool,
        "test",
        &moderator,
        "m1",
        &Action::Delete { target: bad.seq },
    )
    .await
    .unwrap();
    let events = store::events_after(pool, "test", deleted.seq - 1, 1)
        .await
        .unwrap();
    assert_eq!(
        events[0],
        Event::Delete {
            seq: deleted.seq,
            target: bad.seq,
            by: "mod".into()
        }
    );

    store::append(
        pool,
        "test",
        &moderator,
        "m2",
        &Action::Mute {
            user: "TROLL".into(),
            seconds: 600,
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        store::append(pool, "test", &troll, "t3", &message("still here")).await,
        Err(StoreError::Muted(_))
    ));
    store::append(
        pool,
        "test",
        &moderator,
        "m3",
        &Action::Ban {
            user: "troll".into(),
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        store::append(pool, "test", &troll, "t4", &message("x")).await,
        Err(StoreError::Banned)
    ));
    // A refused message takes no sequence number.
    let before = store::last_seq(pool, "test").await.unwrap();
    let _ = store::append(pool, "test", &troll, "t5", &message("x")).await;
    assert_eq!(store::last_seq(pool, "test").await.unwrap(), before);

    store::append(
        pool,
        "test",
        &admin,
        "a1",
        &Action::Unban {
            user: "troll".into(),
        },
    )
    .await
    .unwrap();
    store::append(pool, "test", &troll, "t6", &message("sorry"))
        .await
        .unwrap();
    assert!(matches!(
        store::append(
            pool,
            "test",
            &moderator,
            "m4",
            &Action::Delete { target: 999_999 }
        )
        .await,
        Err(StoreError::NotFound("message"))
    ));
}
