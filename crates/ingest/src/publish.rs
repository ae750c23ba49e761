//! The publish name of the shared runtime contract:
//! `<channel>?key=<stream key>&source=<source host>&anchor=<unix ms>` (source and anchor optional).

use std::collections::HashMap;
use std::path::Path;

use streaming_core::config::is_safe_name;
use streaming_core::secrets::{read_secret, secrets_equal};

/// What a publisher asked for, parsed from the RTMP publish name.
#[derive(Clone, PartialEq, Eq)]
pub struct PublishRequest {
    pub channel: String,
    pub key: String,
    pub source: Option<String>,
    /// Wall-clock unix ms of media timestamp 0, when the publisher knows it.
    pub anchor_ms: Option<u64>,
    /// `relayed=1`: a peer ingest forwards this stream; it is not relayed again.
    pub relayed: bool,
}

/// Source name given to a publisher that sends none (OBS): its relay carries it, so the peer
/// ranks it alike.
pub const PLAIN_SOURCE: &str = "publisher";

/// The publish name a relay uses towards a peer ingest: same channel, key, source and anchor,
/// plus `relayed=1`.
pub fn relay_publish_name(channel: &str, key: &str, source: &str, anchor_ms: u64) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("key", key)
        .append_pair("source", source)
        .append_pair("anchor", &anchor_ms.to_string())
        .append_pair("relayed", "1")
        .finish();
    format!("{channel}?{query}")
}

// The key must never reach a log line.
impl std::fmt::Debug for PublishRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishRequest")
            .field("channel", &self.channel)
            .field("source", &self.source)
            .field("anchor_ms", &self.anchor_ms)
            .field("relayed", &self.relayed)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishNameError {
    #[error("publish name has no valid channel (expected <channel>?key=...)")]
    BadChannel,
    #[error("publish name carries no stream key")]
    NoKey,
    #[error("anchor is not a unix time in ms")]
    BadAnchor,
    #[error("source is not a valid host name")]
    BadSource,
    #[error("anchor is more than a day ahead of or 49 days behind this ingest's clock")]
    AnchorOutOfRange,
}

/// Longest publish name we look at; anything longer is refused, not parsed.
pub const MAX_PUBLISH_NAME: usize = 1024;

/// How far an anchor may lie ahead of our clock: clocks are synchronised, so a day ahead is
/// already absurd.
pub const MAX_ANCHOR_AHEAD_MS: u64 = 24 * 3600 * 1000;
/// How far an anchor may lie behind: media timestamps are u32 milliseconds, so a publish cannot
/// reach now from an older anchor.
pub const MAX_ANCHOR_BEHIND_MS: u64 = u32::MAX as u64;

pub fn parse_publish_name(name: &str) -> Result<PublishRequest, PublishNameError> {
    parse_publish_name_at(name, streaming_hls::unix_now_ms())
}

/// [`parse_publish_name`] with the clock given; anchors far from `now_ms` are refused here so
/// that no arithmetic on them can overflow later.
pub fn parse_publish_name_at(name: &str, now_ms: u64) -> Result<PublishRequest, PublishNameError> {
    if name.len() > MAX_PUBLISH_NAME {
        return Err(PublishNameError::BadChannel);
    }
    let (channel, query) = name.split_once('?').unwrap_or((name, ""));
    if !is_safe_name(channel) {
        return Err(PublishNameError::BadChannel);
    }
    let (mut key, mut source, mut anchor_ms, mut relayed) = (None, None, None, false);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "key" => key = Some(v.into_owned()),
            "source" if !v.is_empty() => {
                if !is_safe_name(&v) {
                    return Err(PublishNameError::BadSource);
                }
                source = Some(v.into_owned());
            }
            "anchor" if !v.is_empty() => {
                let anchor = v.parse::<u64>().map_err(|_| PublishNameError::BadAnchor)?;
                if anchor > now_ms.saturating_add(MAX_ANCHOR_AHEAD_MS)
                    || anchor < now_ms.saturating_sub(MAX_ANCHOR_BEHIND_MS)
                {
                    return Err(PublishNameError::AnchorOutOfRange);
                }
                anchor_ms = Some(anchor);
            }
            "relayed" => relayed = v == "1",
            _ => {}
        }
    }
    let key = key
        .filter(|k| !k.is_empty())
        .ok_or(PublishNameError::NoKey)?;
    Ok(PublishRequest {
        channel: channel.to_owned(),
        key,
        source,
        anchor_ms,
        relayed,
    })
}

/// Why a publish is refused; `Display` is the operator's log text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown channel")]
    UnknownChannel,
    #[error("wrong stream key")]
    WrongKey,
    #[error("bad publish name: {0}")]
    BadName(PublishNameError),
    #[error("connection already publishes")]
    AlreadyPublishing,
}

/// The stream keys of every configured channel, read from `<dir>/<channel>.key`.
#[derive(Default, Clone)]
pub struct StreamKeys {
    keys: HashMap<String, String>,
}

impl StreamKeys {
    /// Loads the key of each channel; a missing or unreadable key file is logged and leaves that
    /// channel refusing every publish (never open by accident).
    pub fn load<'a>(dir: &Path, channels: impl IntoIterator<Item = &'a str>) -> Self {
        let mut keys = HashMap::new();
        for channel in channels {
            match read_secret(&dir.join(format!("{channel}.key"))) {
                Ok(key) => {
                    keys.insert(channel.to_owned(), key);
                }
                Err(e) => tracing::error!(
                    channel,
                    "stream key unavailable, channel refuses publishers: {e}"
                ),
            }
        }
        Self { keys }
    }

    pub fn from_map(keys: HashMap<String, String>) -> Self {
        Self { keys }
    }

    /// Checks a publish request against the channel's key in constant time.
    pub fn check(&self, request: &PublishRequest) -> Result<(), Refusal> {
        let expected = self
            .keys
            .get(&request.channel)
            .ok_or(Refusal::UnknownChannel)?;
        if secrets_equal(&request.key, expected) {
            Ok(())
        } else {
            Err(Refusal::WrongKey)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_000_100_000;

    fn parse_publish_name(name: &str) -> Result<PublishRequest, PublishNameError> {
        parse_publish_name_at(name, NOW)
    }

    #[test]
    fn parses_the_contract_form() {
        let r =
            parse_publish_name("test?key=s3cr%2Bt&source=source1&anchor=1764000000123").unwrap();
        assert_eq!(r.channel, "test");
        assert_eq!(r.key, "s3cr+t");
        assert_eq!(r.source.as_deref(), Some("source1"));
        assert_eq!(r.anchor_ms, Some(1_764_000_000_123));
        // OBS sends only the key.
        let r = parse_publish_name("test?key=abc").unwrap();
        assert_eq!((r.source, r.anchor_ms, r.relayed), (None, None, false));
    }

    #[test]
    fn relay_name_round_trips() {
        let name = relay_publish_name("test", "k3y/+=&", PLAIN_SOURCE, 1_764_000_000_123);
        let r = parse_publish_name(&name).unwrap();
        assert_eq!(r.key, "k3y/+=&");
        assert_eq!(r.source.as_deref(), Some(PLAIN_SOURCE));
        assert_eq!(r.anchor_ms, Some(1_764_000_000_123));
        assert!(r.relayed);
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(parse_publish_name("test"), Err(PublishNameError::NoKey));
        assert_eq!(
            parse_publish_name("test?key="),
            Err(PublishNameError::NoKey)
        );
        assert_eq!(
            parse_publish_name("../x?key=a"),
            Err(PublishNameError::BadChannel)
        );
        assert_eq!(
            parse_publish_name("test?key=a&anchor=soon"),
            Err(PublishNameError::BadAnchor)
        );
        assert_eq!(
            parse_publish_name("test?key=a&source=A/B"),
            Err(PublishNameError::BadSource)
        );
        assert_eq!(
            parse_publish_name(&"a".repeat(2000)),
            Err(PublishNameError::BadChannel)
        );
        for anchor in [u64::MAX, NOW + MAX_ANCHOR_AHEAD_MS + 1, 0, NOW - (1 << 32)] {
            assert_eq!(
                parse_publish_name(&format!("test?key=a&anchor={anchor}")),
                Err(PublishNameError::AnchorOutOfRange),
                "{anchor}"
            );
        }
        assert!(parse_publish_name(&format!("test?key=a&anchor={}", NOW + 1000)).is_ok());
    }

    #[test]
    fn keys_are_checked_per_channel() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("test.key"), "right\n").unwrap();
        let keys = StreamKeys::load(dir.path(), ["test", "other"]);
        let mut r = parse_publish_name("test?key=right").unwrap();
        assert_eq!(keys.check(&r), Ok(()));
        r.key = "wrong".into();
        assert_eq!(keys.check(&r), Err(Refusal::WrongKey));
        r.channel = "other".into(); // key file missing: refused, not open
        assert_eq!(keys.check(&r), Err(Refusal::UnknownChannel));
    }
}
