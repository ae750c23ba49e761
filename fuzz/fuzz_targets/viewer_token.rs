//! Viewer tokens arrive in the `t` query parameter of every playlist and segment request.
//! The input, as a string, must be refused cleanly or be exactly a token we signed; the same
//! bytes also build claims that must survive sign-then-verify (or be refused cleanly when a
//! field holds the `|` separator, which the LB never puts there).

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use streaming_core::token::{MAX_TOKEN_LEN, TokenError, TokenSigner, ViewerClaims};

/// Key and clock the committed seed tokens were made with.
const KEY: &[u8] = b"fuzz key shared by lbs and broadcasts";
const NOW: u64 = 1_800_000_000;

#[derive(Debug, Arbitrary)]
struct Claims {
    broadcast: String,
    channel: String,
    viewer: String,
    expires: u64,
    now: u64,
}

fuzz_target!(|data: &[u8]| {
    let signer = TokenSigner::new(KEY);
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
    let claims = ViewerClaims {
        broadcast: c.broadcast,
        channel: c.channel,
        viewer: c.viewer,
        expires: c.expires,
    };
    let token = signer.sign(&claims);
    let has_separator = [&claims.broadcast, &claims.channel, &claims.viewer]
        .iter()
        .any(|f| f.contains('|'));
    let result = signer.verify(&token, c.now);
    if token.len() > MAX_TOKEN_LEN || has_separator {
        assert_eq!(result, Err(TokenError::Malformed));
    } else if claims.expires <= c.now {
        assert_eq!(result, Err(TokenError::Expired));
    } else {
        assert_eq!(result, Ok(claims));
    }
});
