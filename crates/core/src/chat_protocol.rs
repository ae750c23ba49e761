//! The chat socket's wire protocol, `wss://<broadcast>/api/chat/<channel>`: JSON text frames,
//! one object each, its kind in `"type"`. The server (`streaming_chat`), every Rust client
//! (`streaming_clients::chat`) and the tests use these types; `web/chat.js` follows them, and a
//! test below reads it to check that it sends and handles exactly these frames.
//!
//! Client -> server ([`ClientFrame`]): first `hello {session, since}`, then `send {id, text}`,
//! the moderators' `delete {id, target}`, `mute {id, user, seconds}`, `ban {id, user}`,
//! `unban {id, user}`, and `ping`. Server -> client ([`ServerFrame`]): `welcome`, the channel's
//! events in seq order ([`Event`]: `message`, `delete`, `mute`, `ban`, `unban`), `ack {id,
//! seq}` once a write is committed, `error {id, code, message}`, `pong`.
//!
//! A client keeps the highest seq it saw and sends it as `since` after a reconnect (to any
//! broadcast): the gap is replayed and nothing is sent twice on one connection. Writes carry a
//! client-made id and may be resent after a reconnect: the database keeps one copy and the ack
//! repeats its seq. Both directions refuse fields they do not know, so a change on one side
//! that the other does not follow fails loudly (in tests) instead of being dropped.

use serde::{Deserialize, Serialize};

/// What an account may do in the chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserRole {
    Viewer,
    Moderator,
    Admin,
}

impl UserRole {
    pub fn as_str(self) -> &'static str {
        match self {
            UserRole::Viewer => "viewer",
            UserRole::Moderator => "moderator",
            UserRole::Admin => "admin",
        }
    }

    /// The role stored as text; anything unknown is the least privileged.
    pub fn parse(s: &str) -> Self {
        match s {
            "admin" => UserRole::Admin,
            "moderator" => UserRole::Moderator,
            _ => UserRole::Viewer,
        }
    }

    pub fn moderates(self) -> bool {
        matches!(self, UserRole::Moderator | UserRole::Admin)
    }

    fn rank(self) -> u8 {
        match self {
            UserRole::Viewer => 0,
            UserRole::Moderator => 1,
            UserRole::Admin => 2,
        }
    }

    /// Moderation goes down the ranks only: moderators act on viewers, admins on viewers and
    /// moderators, and nobody on an admin (an admin account is the operator's, managed through
    /// its secret or the database). Otherwise one rogue or stolen moderator account could
    /// silence every other moderator, and the admins.
    pub fn may_moderate(self, target: UserRole) -> bool {
        self.moderates() && target.rank() < self.rank()
    }
}

/// Who the socket is logged in as, in `welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    pub role: UserRole,
}

/// Client -> server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientFrame {
    /// The first frame: the session token (none: anonymous, read only) and the last seq seen.
    Hello {
        session: Option<String>,
        since: Option<i64>,
    },
    Send {
        id: String,
        text: String,
    },
    Delete {
        id: String,
        target: i64,
    },
    Mute {
        id: String,
        user: String,
        seconds: u32,
    },
    Ban {
        id: String,
        user: String,
    },
    Unban {
        id: String,
        user: String,
    },
    Ping,
}

/// One event of a channel's log, numbered by `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Event {
    Message {
        seq: i64,
        id: String,
        user: String,
        role: UserRole,
        /// As typed: data, escaped only by JSON; the page renders it as text.
        text: String,
        at: String,
    },
    Delete {
        seq: i64,
        /// The seq of the message deleted.
        target: i64,
        by: String,
    },
    Mute {
        seq: i64,
        user: String,
        until: String,
        by: String,
    },
    Ban {
        seq: i64,
        user: String,
        by: String,
    },
    Unban {
        seq: i64,
        user: String,
        by: String,
    },
}

impl Event {
    pub fn seq(&self) -> i64 {
        match self {
            Event::Message { seq, .. }
            | Event::Delete { seq, .. }
            | Event::Mute { seq, .. }
            | Event::Ban { seq, .. }
            | Event::Unban { seq, .. } => *seq,
        }
    }
}

/// Server -> client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ServerFrame {
    /// The answer to `hello`, before the replay.
    Welcome {
        channel: String,
        /// The broadcast serving this socket (a client avoids it after a failure).
        broadcast: String,
        /// `None`: anonymous, or a session the server could not check right now.
        user: Option<Member>,
        last_seq: Option<i64>,
    },
    Ack {
        id: String,
        seq: i64,
    },
    /// `id`: the write it answers, if any; `code` is stable, `message` for people.
    Error {
        id: Option<String>,
        code: String,
        message: String,
    },
    Pong,
    #[serde(untagged)]
    Event(Event),
}

impl ServerFrame {
    /// The frame as sent on the socket.
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// One of each server frame.
    fn every_server_frame() -> Vec<ServerFrame> {
        let by = || "mod".to_owned();
        vec![
            ServerFrame::Welcome {
                channel: "test".into(),
                broadcast: "broadcast1".into(),
                user: Some(Member {
                    name: "alice".into(),
                    role: UserRole::Moderator,
                }),
                last_seq: Some(3),
            },
            ServerFrame::Ack {
                id: "a-1".into(),
                seq: 4,
            },
            ServerFrame::Error {
                id: None,
                code: "rate_limited".into(),
                message: "slow down".into(),
            },
            ServerFrame::Pong,
            ServerFrame::Event(Event::Message {
                seq: 5,
                id: "a-2".into(),
                user: "alice".into(),
                role: UserRole::Viewer,
                text: "<b>hi</b>".into(),
                at: "2026-12-02T00:00:00Z".into(),
            }),
            ServerFrame::Event(Event::Delete {
                seq: 6,
                target: 5,
                by: by(),
            }),
            ServerFrame::Event(Event::Mute {
                seq: 7,
                user: "bob".into(),
                until: "2026-12-02T00:10:00Z".into(),
                by: by(),
            }),
            ServerFrame::Event(Event::Ban {
                seq: 8,
                user: "bob".into(),
                by: by(),
            }),
            ServerFrame::Event(Event::Unban {
                seq: 9,
                user: "bob".into(),
                by: by(),
            }),
        ]
    }

    fn every_client_frame() -> Vec<ClientFrame> {
        vec![
            ClientFrame::Hello {
                session: None,
                since: Some(2),
            },
            ClientFrame::Send {
                id: "a-1".into(),
                text: "hi".into(),
            },
            ClientFrame::Delete {
                id: "op-1".into(),
                target: 5,
            },
            ClientFrame::Mute {
                id: "op-2".into(),
                user: "bob".into(),
                seconds: 600,
            },
            ClientFrame::Ban {
                id: "op-3".into(),
                user: "bob".into(),
            },
            ClientFrame::Unban {
                id: "op-4".into(),
                user: "bob".into(),
            },
            ClientFrame::Ping,
        ]
    }

    /// `type` -> the other keys, of each frame as JSON.
    fn shapes<T: Serialize>(frames: &[T]) -> BTreeMap<String, BTreeSet<String>> {
        frames
            .iter()
            .map(|f| {
                let v = serde_json::to_value(f).unwrap();
                let object = v.as_object().unwrap();
                let keys = object.keys().filter(|k| *k != "type").cloned().collect();
                (object["type"].as_str().unwrap().to_owned(), keys)
            })
            .collect()
    }

    #[test]
    fn frames_round_trip_and_the_wire_names_are_the_documented_ones() {
        for frame in every_server_frame() {
            let back: ServerFrame = serde_json::from_str(&frame.to_json()).unwrap();
            assert_eq!(back, frame);
        }
        for frame in every_client_frame() {
            let back: ClientFrame =
                serde_json::from_str(&serde_json::to_string(&frame).unwrap()).unwrap();
            assert_eq!(back, frame);
        }
        let server: Vec<String> = shapes(&every_server_frame()).into_keys().collect();
        assert_eq!(
            server,
            [
                "ack", "ban", "delete", "error", "message", "mute", "pong", "unban", "welcome"
            ]
        );
        let message = serde_json::to_value(&every_server_frame()[4]).unwrap();
        assert_eq!(message["text"], "<b>hi</b>", "text stays data");
        assert_eq!(message["role"], "viewer");
    }

    #[test]
    fn unknown_frames_and_fields_are_refused() {
        for bad in [
            r#"{"type":"stats","viewers":4}"#,
            r#"{"type":"ack","id":"a","seq":1,"extra":true}"#,
            r#"{"type":"message","seq":1,"id":"a","user":"u","role":"viewer","text":"t","at":"x","color":"red"}"#,
            r#"{"type":"ack","id":"a"}"#,
        ] {
            assert!(serde_json::from_str::<ServerFrame>(bad).is_err(), "{bad}");
        }
        for bad in [
            r#"{"type":"send","id":"a","text":"t","html":true}"#,
            r#"{"type":"send","id":"a"}"#,
            r#"{"type":"shout","text":"t"}"#,
        ] {
            assert!(serde_json::from_str::<ClientFrame>(bad).is_err(), "{bad}");
        }
    }

    /// The object literals `web/chat.js` sends (`{ type: '...', key, key: value }`): type -> keys.
    /// Our own file, written in one style: `send({ type: 'x', ... })` and `modOp({ type: ... })`
    /// (which adds the `id`).
    fn sent_by_page(js: &str) -> BTreeMap<String, BTreeSet<String>> {
        let mut sent = BTreeMap::new();
        for (at, _) in js.match_indices("{ type: '") {
            let literal = &js[at..];
            let Some(end) = literal.find('}') else {
                continue;
            };
            let body = &literal[2..end];
            let mut kind = String::new();
            let mut keys = BTreeSet::new();
            for field in body.split(',') {
                let field = field.trim();
                let key = field.split(':').next().unwrap_or_default().trim();
                if key == "type" {
                    kind = field.split('\'').nth(1).unwrap_or_default().to_owned();
                } else if !key.is_empty() {
                    keys.insert(key.to_owned());
                }
            }
            if js[..at].ends_with("modOp(") {
                keys.insert("id".to_owned());
            }
            sent.entry(kind).or_insert_with(BTreeSet::new).extend(keys);
        }
        sent
    }

    /// The `case 'x':` labels of the page's frame switch (`function onEvent`).
    fn handled_by_page(js: &str) -> BTreeSet<String> {
        let start = js.find("function onEvent(").expect("chat.js has onEvent");
        let body = &js[start..];
        let end = body.find("\n  }\n").unwrap_or(body.len());
        body[..end]
            .split("case '")
            .skip(1)
            .filter_map(|c| c.split('\'').next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_page_speaks_this_protocol() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../web/chat.js");
        let js = std::fs::read_to_string(path).unwrap();
        let clients = shapes(&every_client_frame());
        let sent = sent_by_page(&js);
        assert!(
            sent.contains_key("hello") && sent.contains_key("send"),
            "{sent:?}"
        );
        for (kind, keys) in &sent {
            let known = clients
                .get(kind)
                .unwrap_or_else(|| panic!("chat.js sends {kind:?}, not a ClientFrame"));
            assert_eq!(keys, known, "chat.js's {kind:?} frame");
        }
        let servers = shapes(&every_server_frame());
        let handled = handled_by_page(&js);
        for kind in &handled {
            assert!(
                servers.contains_key(kind),
                "chat.js handles {kind:?}, never sent"
            );
        }
        for kind in servers.keys() {
            // A pong only answers a ping, which the page does not send.
            let needed = kind != "pong" || sent.contains_key("ping");
            assert!(
                !needed || handled.contains(kind),
                "chat.js ignores {kind:?}"
            );
        }
    }
}
