//! A chat WebSocket text frame from anyone (a `hello` needs no account): parsed into the
//! protocol's `ClientFrame` as the server does (an accepted frame must serialise back to one
//! that parses the same), and, as JSON under the same size cap, every string field through the
//! public validators the server's checks use, asserting what each validator promises.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use streaming_chat::limits::{
    MAX_FRAME_BYTES, MAX_MESSAGE_CHARS, check_name, check_password, check_text, valid_client_id,
};
use streaming_core::chat_protocol::ClientFrame;

fn check_string(s: &str) {
    if check_text(s).is_ok() {
        assert!(!s.trim().is_empty());
        assert!(s.chars().count() <= MAX_MESSAGE_CHARS);
        // Storable in PostgreSQL text and harmless in a terminal.
        assert!(!s.chars().any(|c| c.is_control() && c != '\n' && c != '\t'));
    }
    if valid_client_id(s) {
        // Echoed back in error frames and used as a key: must need no escaping anywhere.
        assert!((1..=64).contains(&s.len()));
        assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
    }
    if check_name(s).is_ok() {
        assert!((3..=32).contains(&s.len()));
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert!(!s.eq_ignore_ascii_case("admin"));
    }
    if check_password(s).is_ok() {
        assert!((8..=256).contains(&s.chars().count()));
    }
}

fn walk(value: &Value) {
    match value {
        Value::String(s) => check_string(s),
        Value::Array(items) => items.iter().for_each(walk),
        Value::Object(fields) => {
            for (key, v) in fields {
                check_string(key);
                walk(v);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = std::str::from_utf8(data) else {
        return;
    };
    check_string(frame);
    if frame.len() > MAX_FRAME_BYTES {
        return;
    }
    if let Ok(parsed) = serde_json::from_str::<ClientFrame>(frame) {
        let again = serde_json::to_string(&parsed).unwrap();
        assert_eq!(serde_json::from_str::<ClientFrame>(&again).unwrap(), parsed);
    }
    let Ok(value) = serde_json::from_str::<Value>(frame) else {
        return;
    };
    walk(&value);
});
