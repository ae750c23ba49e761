//! Chat session tokens arrive as `Authorization: Bearer` headers and in the WebSocket `hello`.
//! The input, as a string, must be refused cleanly or be exactly a token we signed; the same
//! bytes also build claims that must survive sign-then-verify (names never hold `|`).

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use streaming_chat::session::{SessionClaims, SessionError, SessionSigner};
use streaming_core::signed::MAX_SIGNED_LEN as MAX_TOKEN_LEN;

/// Key and clock the committed seed tokens were made with.
const KEY: &[u8] = b"fuzz key of the cluster";
const NOW: u64 = 1_800_000_000;

#[derive(Debug, Arbitrary)]
struct Claims {
    session: [u8; 16],
    user_id: i64,
    name: String,
    expires: u64,
    now: u64,
}

fuzz_target!(|data: &[u8]| {
    let signer = SessionSigner::new(KEY);
    if let Ok(token) = std::str::from_utf8(data)
        && let Ok(claims) = signer.verify(token, NOW)
    {
        assert!(claims.expires > NOW);
        assert_eq!(
            signer.sign(&claims),
            token,
            "accepted a token we did not sign"
        );
    }

    let Ok(c) = Claims::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let claims = SessionClaims {
        session: uuid::Uuid::from_bytes(c.session),
        user_id: c.user_id,
        name: c.name,
        expires: c.expires,
    };
    let token = signer.sign(&claims);
    let result = signer.verify(&token, c.now);
    if token.len() > MAX_TOKEN_LEN || claims.name.contains('|') {
        assert_eq!(result, Err(SessionError::Malformed));
    } else if claims.expires <= c.now {
        assert_eq!(result, Err(SessionError::Expired));
    } else {
        assert_eq!(result, Ok(claims));
    }
});
