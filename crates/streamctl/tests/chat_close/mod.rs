//! The chat socket's close handshake through a real broadcast (RFC 6455 section 5.5.1): a
//! client's Close is answered with the same code and the broadcast ends the TCP connection at
//! once, after a welcome, in the middle of a long replay from PostgreSQL and while the
//! client's write waits for a row lock; the write closed on is stored exactly once after a
//! resend. The SIGTERM side (1001 to every socket) is checked where the test stops the cluster.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use streaming_clients::chat::{Net, Target, Ws};
use streaming_core::config::HostConfig;
use streaming_runner::db;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::{hello, post, reply, send};

/// A close handshake must be over well within this (the server answers at once; its own
/// linger, for clients that do not answer, is 2 s).
const CLOSE_BOUND_S: f64 = 2.0;
/// Events written straight into the log for a replay far longer than a close takes.
const BULK: usize = 3000;

/// How a socket ended, seen by the client.
#[derive(Debug)]
pub struct Ended {
    /// The server's close code, `None` when the connection ended without one (1006).
    pub code: Option<u16>,
    /// Data frames that arrived before the server's Close.
    pub frames: usize,
    pub close_s: f64,
    pub eof_s: f64,
}

/// Reads until the server's Close and the end of the connection (tungstenite answers a
/// server's Close on the next read), for at most 10 s.
pub async fn read_to_end(ws: &mut Ws) -> Ended {
    let started = Instant::now();
    let mut ended = Ended {
        code: None,
        frames: 0,
        close_s: f64::NAN,
        eof_s: f64::NAN,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the broadcast ends the connection within 10 s")
        {
            Some(Ok(Message::Close(frame))) => {
                ended.code = frame.map(|f| u16::from(f.code));
                ended.close_s = started.elapsed().as_secs_f64();
            }
            Some(Ok(Message::Text(_))) if ended.code.is_none() => ended.frames += 1,
            Some(Ok(_)) => {}
            // Without a Close tungstenite reports "reset without closing handshake" here.
            Some(Err(e)) => {
                eprintln!("chat close: the connection ended without a handshake: {e}");
                ended.eof_s = started.elapsed().as_secs_f64();
                return ended;
            }
            None => {
                ended.eof_s = started.elapsed().as_secs_f64();
                return ended;
            }
        }
    }
}

async fn close_with(ws: &mut Ws, code: u16) -> Ended {
    let bye = Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: "bye".into(),
    }));
    ws.send(bye).await.expect("send Close");
    read_to_end(ws).await
}

fn assert_answered(what: &str, ended: &Ended, code: u16) {
    eprintln!(
        "chat close: {what}: Close {:?} after {:.1} ms, EOF after {:.1} ms, {} data frames before it",
        ended.code,
        ended.close_s * 1e3,
        ended.eof_s * 1e3,
        ended.frames
    );
    assert_eq!(ended.code, Some(code), "{what}: the server echoes the code");
    assert!(
        ended.eof_s < CLOSE_BOUND_S,
        "{what}: EOF {:.2} s after the Close",
        ended.eof_s
    );
}

pub async fn chat_closes_cleanly(state: &Path, configs: &[HostConfig]) {
    let net = Net::new(Target::resolve(None, state, None, None).unwrap()).unwrap();
    let broadcasts = net.discover().await.unwrap();
    let base = &broadcasts[0].base;
    let primary = db::primary(configs).await.expect("a primary");
    let psql = |sql: &str| db::psql_app(configs, &primary, sql, Duration::from_secs(20));
    let tag = std::process::id();
    let name = format!("Closer_{tag}");
    let (status, body) = post(
        &net,
        base.join("/api/account/register").unwrap(),
        json!({"name": name, "password": "correct horse"}),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let session = body["session"].as_str().unwrap().to_owned();

    // After the welcome, with the codes a page sends (1000) and a browser leaving one (1001).
    for code in [1000, 1001] {
        let (mut ws, welcome) = hello(&net, base, Some(&session), None).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        let ended = close_with(&mut ws, code).await;
        assert_answered(&format!("{code} after the welcome"), &ended, code);
    }

    // In the middle of a replay from the database: thousands of events written straight into
    // the log (the hub's ring holds 2000, so a logged-in `since: 0` reads PostgreSQL).
    psql(&format!(
        "WITH c AS (UPDATE channels SET last_seq = last_seq + {BULK} WHERE name = 'test' \
         RETURNING last_seq) \
         INSERT INTO chat_events (channel, seq, kind, user_id, client_id, body) \
         SELECT 'test', c.last_seq - {BULK} + g, 'message', u.id, 'bulk-' || g, repeat('x', 400) \
         FROM c, users u, generate_series(1, {BULK}) g WHERE u.name_key = lower('{name}'); \
         SELECT pg_notify('chat_events', 'test')"
    ))
    .expect("bulk events");
    let (mut ws, welcome) = hello(&net, base, Some(&session), Some(0)).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the replay starts")
        .unwrap()
        .unwrap();
    let first: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert!(first["seq"].is_u64(), "an event: {first}");
    let ended = close_with(&mut ws, 1000).await;
    assert_answered("1000 during a replay", &ended, 1000);
    assert!(
        ended.frames + 1 < BULK,
        "the replay went on after the Close: {} events",
        ended.frames + 1
    );

    // While the client's write waits for the database: another session holds the channel's
    // row lock, which every append takes.
    let locker = {
        let (configs, primary) = (configs.to_vec(), primary.clone());
        std::thread::spawn(move || {
            db::psql_app(
                &configs,
                &primary,
                "BEGIN; SELECT 1 FROM channels WHERE name = 'test' FOR UPDATE; \
                 SELECT pg_sleep(4); COMMIT",
                Duration::from_secs(20),
            )
        })
    };
    let waited = Instant::now();
    while psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'").unwrap() != "1"
    {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the lock holder did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let id = format!("close-{tag}");
    let (mut ws, _) = hello(&net, base, Some(&session), None).await;
    send(
        &mut ws,
        json!({"type": "send", "id": id, "text": "sent, then closed"}),
    )
    .await;
    let ended = close_with(&mut ws, 1000).await;
    assert_answered("1000 while a write waits", &ended, 1000);
    assert!(
        !locker.is_finished(),
        "the close waited for the database (the lock is held for 4 s)"
    );
    locker.join().unwrap().expect("the lock holder");
    // Resent under the same id after a reconnect, as every client does with what was not
    // acked: one ack, one stored copy.
    let (mut ws, _) = hello(&net, base, Some(&session), None).await;
    send(
        &mut ws,
        json!({"type": "send", "id": id, "text": "sent, then closed"}),
    )
    .await;
    let ack = reply(&mut ws).await.expect("ack");
    assert_eq!(ack["type"], "ack", "{ack}");
    let stored = psql(&format!(
        "SELECT count(*) || ' ' || min(seq) FROM chat_events WHERE client_id = '{id}'"
    ))
    .unwrap();
    assert_eq!(
        stored,
        format!("1 {}", ack["seq"]),
        "stored once, at the acked seq"
    );
    close_with(&mut ws, 1000).await;
}

/// A socket on the first broadcast, for the shutdown's 1001.
pub async fn open_socket(state: &Path) -> Ws {
    let net = Net::new(Target::resolve(None, state, None, None).unwrap()).unwrap();
    let broadcasts = net.discover().await.unwrap();
    let (ws, welcome) = hello(&net, &broadcasts[0].base, None, None).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    ws
}
