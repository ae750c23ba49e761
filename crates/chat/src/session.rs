//! Account session tokens: bearer strings every broadcast can check.
//!
//! A token names a session row (revocable: logout deletes it) and carries the user and expiry
//! under an HMAC with the cluster's token key, domain-separated from viewer tokens. The signature
//! lets a broadcast recognise the user even while the database is failing over (a chat client
//! that reconnects then is not thrown out); the row is checked whenever the database answers.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Sessions last a week; logging in again makes a new one.
pub const SESSION_TTL_SECS: u64 = 7 * 24 * 3600;
const PREFIX: &str = "s1";
const DOMAIN: &[u8] = b"streaming-cluster session v1\0";
/// Longer strings are rejected before any decoding.
const MAX_TOKEN_LEN: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClaims {
    /// The `sessions.id` row (a UUID).
    pub session: uuid::Uuid,
    pub user_id: i64,
    /// Shown while the database cannot be asked (names are `[A-Za-z0-9_-]`, no `|`).
    pub name: String,
    pub expires: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("malformed session token")]
    Malformed,
    #[error("session token signature does not match (forged, or signed with another key)")]
    BadSignature,
    #[error("session expired: log in again")]
    Expired,
}

#[derive(Clone)]
pub struct SessionSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for SessionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSigner(<key>)")
    }
}

impl SessionSigner {
    pub fn new(key: &[u8]) -> Self {
        SessionSigner { key: key.to_vec() }
    }

    fn mac(&self) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(DOMAIN);
        mac
    }

    pub fn sign(&self, claims: &SessionClaims) -> String {
        let body = URL_SAFE_NO_PAD.encode(format!(
            "{}|{}|{}|{}",
            claims.session, claims.user_id, claims.name, claims.expires
        ));
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{PREFIX}.{body}.{sig}")
    }

    /// Checks signature and expiry (not revocation: that needs the database).
    pub fn verify(&self, token: &str, now: u64) -> Result<SessionClaims, SessionError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(SessionError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(PREFIX), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionError::Malformed);
        };
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| SessionError::Malformed)?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| SessionError::BadSignature)?;
        let body = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SessionError::Malformed)?;
        let body = String::from_utf8(body).map_err(|_| SessionError::Malformed)?;
        let mut fields = body.split('|');
        let (Some(session), Some(user), Some(name), Some(expires), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(SessionError::Malformed);
        };
        let claims = SessionClaims {
            session: uuid::Uuid::parse_str(session).map_err(|_| SessionError::Malformed)?,
            user_id: user.parse().map_err(|_| SessionError::Malformed)?,
            name: name.to_owned(),
            expires: expires.parse().map_err(|_| SessionError::Malformed)?,
        };
        if claims.expires <= now {
            return Err(SessionError::Expired);
        }
        Ok(claims)
    }
}

/// The bearer token of an `Authorization` header, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> SessionClaims {
        SessionClaims {
            session: uuid::Uuid::new_v4(),
            user_id: 42,
            name: "alice".into(),
            expires: 2_000,
        }
    }

    #[test]
    fn round_trip() {
        let s = SessionSigner::new(b"key");
        let c = claims();
        assert_eq!(s.verify(&s.sign(&c), 1_000), Ok(c));
    }

    #[test]
    fn forged_expired_and_garbage_tokens_are_refused() {
        let s = SessionSigner::new(b"key");
        let c = claims();
        let token = s.sign(&c);
        assert_eq!(
            SessionSigner::new(b"other").verify(&token, 1_000),
            Err(SessionError::BadSignature)
        );
        assert_eq!(s.verify(&token, 2_000), Err(SessionError::Expired));
        // Changing the user id inside the body breaks the signature.
        let forged_body = URL_SAFE_NO_PAD.encode(format!("{}|1|alice|2000", c.session));
        let sig = token.rsplit('.').next().unwrap();
        assert_eq!(
            s.verify(&format!("s1.{forged_body}.{sig}"), 1_000),
            Err(SessionError::BadSignature)
        );
        for garbage in [
            "",
            "s1",
            "s1..",
            "x.y.z",
            "s1.a.b.c",
            &"s".repeat(600),
            "s1.<script>.x",
        ] {
            assert!(s.verify(garbage, 1_000).is_err(), "{garbage:?}");
        }
    }
}
