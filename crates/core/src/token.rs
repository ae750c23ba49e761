//! Viewer tokens: the sticky assignment of one viewer to one broadcast.
//!
//! Broadcasts are different origins, so the assignment travels as a bearer token in the `t` query
//! parameter (docs/architecture.md) instead of a cookie. Format: `base64url(claims).base64url(mac)`
//! where claims are `broadcast|channel|viewer|expires` and mac is HMAC-SHA256 over the viewer
//! domain tag and the first part with the key shared by LBs and broadcasts ([`crate::signed`]).
//! Any LB can check a token made by another.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::signed::{CodecError, Domain, SignedCodec};

/// Longest token we even try to decode; anything longer is garbage.
pub const MAX_TOKEN_LEN: usize = crate::signed::MAX_SIGNED_LEN;

/// The MAC domain of viewer tokens: a chat session token never verifies as one.
pub const VIEWER_DOMAIN: Domain = Domain {
    tag: b"streaming-cluster viewer v1\0",
    prefix: None,
};

/// How long a token lives without renewal; broadcasts renew it in every playlist they serve.
pub const TOKEN_TTL_SECS: u64 = 300;

/// Why a token was refused, worded for the 403 body a client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token: enter through the site URL to get one")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not match (forged or from another cluster)")]
    BadSignature,
    #[error("token expired: enter through the site URL to get a fresh one")]
    Expired,
    #[error("token is for channel {0:?}")]
    WrongChannel(String),
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewerClaims {
    pub broadcast: String,
    pub channel: String,
    /// Random id that makes "distinct viewers" countable without accounts.
    pub viewer: String,
    /// Unix seconds.
    pub expires: u64,
}

/// Signs and verifies viewer tokens with the key shared by LBs and broadcasts.
#[derive(Clone)]
pub struct TokenSigner {
    codec: SignedCodec,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(<key>)")
    }
}

impl TokenSigner {
    pub fn new(key: &[u8]) -> Self {
        Self {
            codec: SignedCodec::new(key, VIEWER_DOMAIN),
        }
    }

    pub fn sign(&self, claims: &ViewerClaims) -> String {
        let expires = claims.expires.to_string();
        self.codec
            .sign(&[&claims.broadcast, &claims.channel, &claims.viewer, &expires])
    }

    /// Checks signature and expiry; `now` is unix seconds.
    pub fn verify(&self, token: &str, now: u64) -> Result<ViewerClaims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let [broadcast, channel, viewer, expires] =
            self.codec.verify(token).map_err(|e| match e {
                CodecError::Malformed => TokenError::Malformed,
                CodecError::BadSignature => TokenError::BadSignature,
            })?;
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        if expires <= now {
            return Err(TokenError::Expired);
        }
        Ok(ViewerClaims {
            broadcast,
            channel,
            viewer,
            expires,
        })
    }
}

/// A fresh random viewer id (96 bits, base64url).
pub fn new_viewer_id() -> String {
    let bytes: [u8; 12] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Current unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(expires: u64) -> ViewerClaims {
        ViewerClaims {
            broadcast: "broadcast2".into(),
            channel: "test".into(),
            viewer: new_viewer_id(),
            expires,
        }
    }

    #[test]
    fn round_trip() {
        let signer = TokenSigner::new(b"k1");
        let c = claims(1000);
        assert_eq!(signer.verify(&signer.sign(&c), 999), Ok(c));
    }

    #[test]
    fn another_key_is_refused() {
        let token = TokenSigner::new(b"k1").sign(&claims(1000));
        assert_eq!(
            TokenSigner::new(b"k2").verify(&token, 1),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampered_claims_are_refused() {
        let signer = TokenSigner::new(b"k1");
        let token = signer.sign(&claims(1000));
        let (_, sig) = token.split_once('.').unwrap();
        let forged = format!(
            "{}.{sig}",
            URL_SAFE_NO_PAD.encode("broadcast1|test|x|99999999999")
        );
        assert_eq!(signer.verify(&forged, 1), Err(TokenError::BadSignature));
    }

    #[test]
    fn expired_is_refused() {
        let signer = TokenSigner::new(b"k1");
        assert_eq!(
            signer.verify(&signer.sign(&claims(1000)), 1000),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let signer = TokenSigner::new(b"k1");
        for junk in ["x", ".", "a.b", "%%%.%%%", "....", &"a".repeat(4000)] {
            assert!(matches!(
                signer.verify(junk, 1),
                Err(TokenError::Malformed | TokenError::BadSignature)
            ));
        }
        assert_eq!(signer.verify("", 1), Err(TokenError::Missing));
    }

    /// A known answer: the format and the viewer domain tag, as fuzz/seeds/viewer_token has it.
    #[test]
    fn known_token_verifies() {
        let signer = TokenSigner::new(b"fuzz key shared by lbs and broadcasts");
        let claims = ViewerClaims {
            broadcast: "broadcast2".into(),
            channel: "test".into(),
            viewer: "q3Zl1C9xW0aQb1hC".into(),
            expires: 1_800_000_300,
        };
        let token = "YnJvYWRjYXN0Mnx0ZXN0fHEzWmwxQzl4VzBhUWIxaEN8MTgwMDAwMDMwMA.xewYBSFc0X0hmPO-k020K6GUxPhB8yLBW5f6Vcr1Ks4";
        assert_eq!(signer.sign(&claims), token);
        assert_eq!(signer.verify(token, 1_800_000_000), Ok(claims));
    }
}
