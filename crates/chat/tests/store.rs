//! The chat store against a real PostgreSQL 15 (Debian's package, started here as a throwaway
//! server on 127.81.0.1): idempotent appends, gap-free ordering under concurrent writers,
//! sanctions and who may impose them, accounts, admin password rotation, the login throttle.
//! Failover itself is covered by streamctl's end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use streaming_chat::store::{self, Action, Event, StoreError, User, UserRole};
use streaming_chat::throttle::{self, KeyKind, Keys, RULE, Verdict};

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
            store::prepare(&pool, &["test".into()]).await
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
    assert!(
        store::set_admin_password(&pool, None, "$argon2id$admin")
            .await
            .unwrap()
    );
    assert!(
        !store::set_admin_password(&pool, None, "$argon2id$other")
            .await
            .unwrap(),
        "an existing admin is not created again"
    );

    accounts(&pool).await;
    admin_rotation(&pool).await;
    idempotent_appends(&pool).await;
    ordered_under_concurrency(&pool).await;
    moderation(&pool).await;
    let other_broadcast = app_pool(55432).await;
    parallel_guesses_take_one_slot_each(&pool, &other_broadcast).await;
    delays_grow(&pool).await;
    the_owner_is_not_locked_out(&pool).await;
    old_attempts_are_forgotten(&pool).await;
}

async fn accounts(pool: &PgPool) {
    let alice = user(pool, "Alice").await;
    assert_eq!(alice.role, UserRole::Viewer);
    assert!(matches!(
        store::create_user(pool, "aLiCe", "h").await,
        Err(StoreError::NameTaken)
    ));
    // The very same (salted, so never repeated) hash is a retry of the insert that made the
    // row: it answers with the account instead of a conflict.
    assert_eq!(
        store::create_user(pool, "alice", "hash").await.unwrap().id,
        alice.id
    );
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
    let promoted = store::set_role(pool, &admin, "alice", UserRole::Moderator)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(promoted.role, UserRole::Moderator);
    store::set_role(pool, &admin, "alice", UserRole::Viewer)
        .await
        .unwrap();
    assert!(
        store::set_role(pool, &admin, "nobody", UserRole::Viewer)
            .await
            .unwrap()
            .is_none()
    );
    // A second admin: the first cannot demote it, it can step down itself.
    let boss = user(pool, "boss").await;
    store::set_role(pool, &admin, "boss", UserRole::Admin)
        .await
        .unwrap();
    assert!(matches!(
        store::set_role(pool, &admin, "boss", UserRole::Viewer).await,
        Err(StoreError::Forbidden)
    ));
    let boss = User {
        role: UserRole::Admin,
        ..boss
    };
    let stepped = store::set_role(pool, &boss, "boss", UserRole::Viewer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stepped.role, UserRole::Viewer);
}

/// A rotated secret replaces the stored hash once (compare-and-set) and ends admin sessions.
async fn admin_rotation(pool: &PgPool) {
    let (admin, old) = store::find_user(pool, "admin").await.unwrap().unwrap();
    let session = uuid::Uuid::new_v4();
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    store::create_session(pool, session, admin.id, later)
        .await
        .unwrap();
    assert!(
        store::set_admin_password(pool, Some(&old), "$argon2id$new")
            .await
            .unwrap()
    );
    assert_eq!(
        store::admin_hash(pool).await.unwrap().as_deref(),
        Some("$argon2id$new")
    );
    assert!(
        store::session_user(pool, session).await.unwrap().is_none(),
        "admin sessions end with the old password"
    );
    // A second broadcast that read the same new secret finds the hash already replaced.
    assert!(
        !store::set_admin_password(pool, Some(&old), "$argon2id$new-too")
            .await
            .unwrap()
    );
    assert_eq!(
        store::admin_hash(pool).await.unwrap().as_deref(),
        Some("$argon2id$new")
    );
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
    store::set_role(pool, &admin, "mod", UserRole::Moderator)
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

    // Down the ranks only: a moderator neither bans, mutes nor unbans another moderator, nor
    // deletes a moderator's or an admin's message; an admin acts on a moderator.
    let other_mod = user(pool, "mod2").await;
    store::set_role(pool, &admin, "mod2", UserRole::Moderator)
        .await
        .unwrap();
    let other_mod = User {
        role: UserRole::Moderator,
        ..other_mod
    };
    for (id, action) in [
        (
            "m5",
            Action::Ban {
                user: "mod2".into(),
            },
        ),
        (
            "m6",
            Action::Mute {
                user: "MOD2".into(),
                seconds: 60,
            },
        ),
        (
            "m7",
            Action::Unban {
                user: "mod2".into(),
            },
        ),
    ] {
        assert!(
            matches!(
                store::append(pool, "test", &moderator, id, &action).await,
                Err(StoreError::Forbidden)
            ),
            "{action:?}"
        );
    }
    let said = store::append(pool, "test", &other_mod, "o1", &message("mod talk"))
        .await
        .unwrap();
    let decreed = store::append(pool, "test", &admin, "a2", &message("admin talk"))
        .await
        .unwrap();
    for (id, target) in [("m8", said.seq), ("m9", decreed.seq)] {
        assert!(matches!(
            store::append(pool, "test", &moderator, id, &Action::Delete { target }).await,
            Err(StoreError::Forbidden)
        ));
    }
    let own = store::append(pool, "test", &moderator, "m10", &message("oops"))
        .await
        .unwrap();
    store::append(
        pool,
        "test",
        &moderator,
        "m11",
        &Action::Delete { target: own.seq },
    )
    .await
    .expect("a moderator takes back their own message");
    store::append(
        pool,
        "test",
        &admin,
        "a3",
        &Action::Delete { target: said.seq },
    )
    .await
    .expect("an admin deletes a moderator's message");
    store::append(
        pool,
        "test",
        &admin,
        "a4",
        &Action::Ban {
            user: "mod2".into(),
        },
    )
    .await
    .expect("an admin bans a moderator");
    assert!(matches!(
        store::append(pool, "test", &other_mod, "o2", &message("x")).await,
        Err(StoreError::Banned)
    ));
    let boss = store::find_user(pool, "boss").await.unwrap().unwrap().0;
    store::set_role(pool, &admin, "boss", UserRole::Admin)
        .await
        .unwrap();
    assert!(
        matches!(
            store::append(pool, "test", &admin, "a5", &Action::Ban { user: boss.name }).await,
            Err(StoreError::Forbidden)
        ),
        "nobody acts on an admin, not even another admin"
    );
}

async fn verdict(pool: &PgPool, keys: &Keys, rule: &throttle::Rule) -> Verdict {
    throttle::attempt(pool, keys, rule).await.unwrap()
}

fn keys(name: &str, address: &str) -> Keys {
    Keys::new(name, address.parse().unwrap())
}

/// Lets a waiting key's time run out, as if its wait had passed.
async fn wait_passes(pool: &PgPool, key: &str) {
    sqlx::query("UPDATE login_throttle SET next_at = now() WHERE key = $1")
        .bind(key)
        .execute(pool)
        .await
        .unwrap();
}

/// 50 guesses at once on one name from one address, through two pools (two broadcasts): the
/// five free attempts are let through and all the others refused, never more. The first wait
/// is long here so the outcome cannot depend on how fast the guesses run.
async fn parallel_guesses_take_one_slot_each(a: &PgPool, b: &PgPool) {
    let rule = throttle::Rule {
        pair: throttle::Allowance {
            first_wait: Duration::from_secs(600),
            ..RULE.pair
        },
        ..RULE
    };
    let guess = keys("victim", "198.51.100.1");
    let started = Instant::now();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let pool = if i % 2 == 0 { a.clone() } else { b.clone() };
            let guess = guess.clone();
            tokio::spawn(async move { throttle::attempt(&pool, &guess, &rule).await.unwrap() })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Verdict::Allowed => allowed += 1,
            Verdict::Refused { wait_secs, by } => {
                assert_eq!(by, KeyKind::Pair);
                assert!((1..=600).contains(&wait_secs), "{wait_secs}");
            }
        }
    }
    eprintln!(
        "50 parallel guesses over two pools: {allowed} checked, {} refused, in {:.0} ms",
        50 - allowed,
        started.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(allowed, RULE.pair.free);
}

/// After the free attempts each wait doubles: 1 s, 2 s, 4 s.
async fn delays_grow(pool: &PgPool) {
    let guess = keys("grow", "198.51.100.2");
    for _ in 0..RULE.pair.free {
        assert_eq!(verdict(pool, &guess, &RULE).await, Verdict::Allowed);
    }
    for expected in [1, 2, 4] {
        assert_eq!(
            verdict(pool, &guess, &RULE).await,
            Verdict::Refused {
                wait_secs: expected,
                by: KeyKind::Pair
            }
        );
        wait_passes(pool, "pair:grow|198.51.100.2").await;
        assert_eq!(verdict(pool, &guess, &RULE).await, Verdict::Allowed);
    }
    assert_eq!(
        verdict(pool, &guess, &RULE).await,
        Verdict::Refused {
            wait_secs: 8,
            by: KeyKind::Pair
        }
    );
    // Refused attempts were not counted: the wait did not grow while it was hammered.
    for _ in 0..20 {
        assert!(matches!(
            verdict(pool, &guess, &RULE).await,
            Verdict::Refused {
                wait_secs: 1..=8,
                ..
            }
        ));
    }
}

/// Failures from many addresses slow the name down for new addresses, never for an address
/// the owner has logged in from; one address spraying names is slowed down by its own key.
async fn the_owner_is_not_locked_out(pool: &PgPool) {
    let home = keys("owner", "203.0.113.1");
    assert_eq!(verdict(pool, &home, &RULE).await, Verdict::Allowed);
    throttle::succeeded(pool, &home, &RULE).await.unwrap();

    for i in 0..RULE.name.free {
        let attacker = keys("owner", &format!("192.0.2.{}", i + 1));
        assert_eq!(verdict(pool, &attacker, &RULE).await, Verdict::Allowed);
    }
    assert!(matches!(
        verdict(pool, &keys("owner", "192.0.2.200"), &RULE).await,
        Verdict::Refused {
            by: KeyKind::Name,
            ..
        }
    ));
    assert_eq!(
        verdict(pool, &home, &RULE).await,
        Verdict::Allowed,
        "the owner's address is not held up by the name-wide delay"
    );
    throttle::succeeded(pool, &home, &RULE).await.unwrap();
    let counts: i32 = sqlx::query_scalar(
        "SELECT failures FROM login_throttle WHERE key = 'pair:owner|203.0.113.1'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(counts, 0);

    // One address, many names: its own key stops it, other addresses are unaffected.
    for i in 0..RULE.address.free {
        assert_eq!(
            verdict(pool, &keys(&format!("name{i}"), "198.51.100.9"), &RULE).await,
            Verdict::Allowed
        );
    }
    assert!(matches!(
        verdict(pool, &keys("another", "198.51.100.9"), &RULE).await,
        Verdict::Refused {
            by: KeyKind::Address,
            ..
        }
    ));
    assert_eq!(
        verdict(pool, &keys("another", "198.51.100.10"), &RULE).await,
        Verdict::Allowed
    );

    // An attempt whose password could not be checked gives its count back.
    let busy = keys("busy", "198.51.100.11");
    assert_eq!(verdict(pool, &busy, &RULE).await, Verdict::Allowed);
    throttle::withdrawn(pool, &busy).await.unwrap();
    let counts: Vec<i32> = sqlx::query_scalar(
        "SELECT failures FROM login_throttle WHERE key IN          ('pair:busy|198.51.100.11', 'name:busy', 'addr:198.51.100.11')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(counts, [0, 0, 0]);
}

/// Keys quiet for an hour are dropped (trusted pairs are kept); a dropped key starts over.
async fn old_attempts_are_forgotten(pool: &PgPool) {
    sqlx::query(
        "UPDATE login_throttle SET last_at = now() - interval '2 hours',          next_at = now() - interval '1 hour'",
    )
    .execute(pool)
    .await
    .unwrap();
    let dropped = throttle::forget_old(pool, &RULE).await.unwrap();
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM login_throttle")
        .fetch_all(pool)
        .await
        .unwrap();
    assert!(dropped > 100, "{dropped}");
    assert_eq!(left, ["pair:owner|203.0.113.1"], "trusted pairs stay");
    assert_eq!(
        verdict(pool, &keys("grow", "198.51.100.2"), &RULE).await,
        Verdict::Allowed
    );
}
