//! Account session tokens: bearer strings every broadcast can check.
//!
//! A token names a session row (revocable: logout deletes it) and carries the user and expiry
//! under an HMAC with the cluster's token key, domain-separated from viewer tokens. The signature
//! lets a broadcast recognise the user even while the database is failing over (a chat client
//! that reconnects then is not thrown out); the row is checked whenever the database answers.

use streaming_core::signed::{CodecError, Domain, SignedCodec};

/// Sessions last a week; logging in again makes a new one.
pub const SESSION_TTL_SECS: u64 = 7 * 24 * 3600;
/// The MAC domain and version prefix of session tokens: a viewer token never verifies as one.
pub const SESSION_DOMAIN: Domain = Domain {
    tag: b"streaming-cluster session v1\0",
    prefix: Some("s1"),
};

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
    codec: SignedCodec,
}

impl std::fmt::Debug for SessionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSigner(<key>)")
    }
}

impl SessionSigner {
    pub fn new(key: &[u8]) -> Self {
        SessionSigner {
            codec: SignedCodec::new(key, SESSION_DOMAIN),
        }
    }

    pub fn sign(&self, claims: &SessionClaims) -> String {
        self.codec.sign(&[
            &claims.session.to_string(),
            &claims.user_id.to_string(),
            &claims.name,
            &claims.expires.to_string(),
        ])
    }

    /// Checks signature and expiry (not revocation: that needs the database).
    pub fn verify(&self, token: &str, now: u64) -> Result<SessionClaims, SessionError> {
        let [session, user, name, expires] = self.codec.verify(token).map_err(|e| match e {
            CodecError::Malformed => SessionError::Malformed,
            CodecError::BadSignature => SessionError::BadSignature,
        })?;
        let claims = SessionClaims {
            session: uuid::Uuid::parse_str(&session).map_err(|_| SessionError::Malformed)?,
            user_id: user.parse().map_err(|_| SessionError::Malformed)?,
            name,
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
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use streaming_core::token::{TokenError, TokenSigner, ViewerClaims};

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

    /// Both kinds are signed with the cluster's one token key: only the domain tag keeps them
    /// apart, even when the bodies are made to look alike.
    #[test]
    fn viewer_and_session_tokens_never_verify_as_each_other() {
        let key = b"the cluster token key";
        let (sessions, viewers) = (SessionSigner::new(key), TokenSigner::new(key));
        let session = sessions.sign(&claims());
        assert!(viewers.verify(&session, 1_000).is_err());
        // The session body under the viewer format (no `s1.` prefix): the MAC still differs.
        let unprefixed = session.strip_prefix("s1.").unwrap();
        assert_eq!(
            viewers.verify(unprefixed, 1_000),
            Err(TokenError::BadSignature)
        );

        let viewer = viewers.sign(&ViewerClaims {
            broadcast: uuid::Uuid::new_v4().to_string(),
            channel: "42".into(),
            viewer: "alice".into(),
            expires: 2_000,
        });
        assert_eq!(
            sessions.verify(&format!("s1.{viewer}"), 1_000),
            Err(SessionError::BadSignature)
        );
        assert!(sessions.verify(&viewer, 1_000).is_err());
    }

    /// Session tokens issued before the shared codec (fuzz/seeds/session_token) still verify:
    /// logged-in users stay logged in across the upgrade.
    #[test]
    fn known_token_verifies() {
        let signer = SessionSigner::new(b"fuzz key of the cluster");
        let claims = SessionClaims {
            session: uuid::Uuid::from_u128(0x3a1f_6c2e_9d4b_4f0a_8e7c_1b2d_3e4f_5a6b),
            user_id: 42,
            name: "alice".into(),
            expires: 1_800_604_800,
        };
        let token = "s1.M2ExZjZjMmUtOWQ0Yi00ZjBhLThlN2MtMWIyZDNlNGY1YTZifDQyfGFsaWNlfDE4MDA2MDQ4MDA.kzqOTtghiCCrvXExX69ROvC6QXL2Y_VRSeQWj8AsYWc";
        assert_eq!(signer.sign(&claims), token);
        assert_eq!(signer.verify(token, 1_800_000_000), Ok(claims));
    }
}
