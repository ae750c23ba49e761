//! The one HMAC codec behind the cluster's bearer tokens (viewer tokens in [`crate::token`],
//! chat sessions in the chat crate).
//!
//! Format: `[prefix.]base64url(f1|f2|…|fn).base64url(mac)`, where mac is HMAC-SHA256 with the
//! cluster's token key over the domain tag and then the encoded body. Every kind of token has its
//! own [`Domain`]: the same key signs them all, and the tag is what keeps a token of one kind from
//! ever verifying as another. Parsing is bounded: anything longer than [`MAX_SIGNED_LEN`] is
//! refused before any decoding, and the MAC is checked (in constant time) before the body is
//! decoded.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Longest token we even try to decode; anything longer is garbage.
pub const MAX_SIGNED_LEN: usize = 512;

/// What kind of token a codec makes: its MAC domain tag and an optional leading version field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Domain {
    /// Mixed into the MAC before the body; distinct for every kind of token.
    pub tag: &'static [u8],
    /// Written before the body (`prefix.body.mac`) and required on verify.
    pub prefix: Option<&'static str>,
}

/// Why a token did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not match")]
    BadSignature,
}

/// Signs and verifies `|`-separated fields under one key and one domain.
#[derive(Clone)]
pub struct SignedCodec {
    key: Vec<u8>,
    domain: Domain,
}

impl std::fmt::Debug for SignedCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedCodec({:?}, <key>)", self.domain.prefix)
    }
}

impl SignedCodec {
    pub fn new(key: &[u8], domain: Domain) -> Self {
        Self {
            key: key.to_vec(),
            domain,
        }
    }

    fn mac(&self, body: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(self.domain.tag);
        mac.update(body.as_bytes());
        mac
    }

    /// The token for `fields`. A field holding `|` makes a token that will not verify (the field
    /// count no longer matches); callers never put one there.
    pub fn sign(&self, fields: &[&str]) -> String {
        let body = URL_SAFE_NO_PAD.encode(fields.join("|"));
        let sig = URL_SAFE_NO_PAD.encode(self.mac(&body).finalize().into_bytes());
        match self.domain.prefix {
            Some(prefix) => format!("{prefix}.{body}.{sig}"),
            None => format!("{body}.{sig}"),
        }
    }

    /// The `N` fields of a token this codec signed. Checks length, shape and signature only;
    /// what the fields mean (expiry included) is the caller's.
    pub fn verify<const N: usize>(&self, token: &str) -> Result<[String; N], CodecError> {
        if token.len() > MAX_SIGNED_LEN {
            return Err(CodecError::Malformed);
        }
        let signed = match self.domain.prefix {
            Some(prefix) => token
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('.'))
                .ok_or(CodecError::Malformed)?,
            None => token,
        };
        let (body, sig) = signed.split_once('.').ok_or(CodecError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| CodecError::Malformed)?;
        // verify_slice compares in constant time.
        self.mac(body)
            .verify_slice(&sig)
            .map_err(|_| CodecError::BadSignature)?;
        let body = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| CodecError::Malformed)?;
        let body = String::from_utf8(body).map_err(|_| CodecError::Malformed)?;
        let fields: Vec<String> = body.split('|').map(str::to_owned).collect();
        fields.try_into().map_err(|_| CodecError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Domain = Domain {
        tag: b"test a\0",
        prefix: None,
    };
    const B: Domain = Domain {
        tag: b"test b\0",
        prefix: None,
    };

    #[test]
    fn round_trip_with_and_without_prefix() {
        let codec = SignedCodec::new(b"k", A);
        let token = codec.sign(&["x", "y"]);
        assert_eq!(codec.verify::<2>(&token), Ok(["x".into(), "y".into()]));
        let prefixed = SignedCodec::new(
            b"k",
            Domain {
                tag: b"test a\0",
                prefix: Some("v1"),
            },
        );
        let token = prefixed.sign(&["x"]);
        assert!(token.starts_with("v1."));
        assert_eq!(prefixed.verify::<1>(&token), Ok(["x".into()]));
        assert_eq!(codec.verify::<1>(&token), Err(CodecError::Malformed));
    }

    #[test]
    fn another_domain_or_key_is_a_bad_signature() {
        let token = SignedCodec::new(b"k", A).sign(&["x"]);
        assert_eq!(
            SignedCodec::new(b"k", B).verify::<1>(&token),
            Err(CodecError::BadSignature)
        );
        assert_eq!(
            SignedCodec::new(b"other", A).verify::<1>(&token),
            Err(CodecError::BadSignature)
        );
    }

    #[test]
    fn wrong_field_count_and_garbage_are_malformed() {
        let codec = SignedCodec::new(b"k", A);
        assert_eq!(
            codec.verify::<2>(&codec.sign(&["x|y", "z"])),
            Err(CodecError::Malformed)
        );
        for junk in ["", "x", ".", "%%%.%%%", &"a".repeat(MAX_SIGNED_LEN + 1)] {
            assert!(codec.verify::<1>(junk).is_err(), "{junk:?}");
        }
    }
}
