//! Secrets are files (agenix or systemd credentials in production, `streamctl up` locally),
//! read at start and on SIGHUP. They are never logged.

use std::path::Path;

/// No secret of ours is longer; a bigger file is a mistake (a certificate, a log) not a key.
pub const MAX_SECRET_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("secret {path} is empty or larger than {MAX_SECRET_BYTES} bytes")]
    BadSize { path: String },
}

/// Reads a secret file and trims surrounding whitespace (editors add newlines).
pub fn read_secret(path: &Path) -> Result<String, SecretError> {
    let shown = path.display().to_string();
    let len = std::fs::metadata(path)
        .map_err(|source| SecretError::Read {
            path: shown.clone(),
            source,
        })?
        .len();
    if len > MAX_SECRET_BYTES {
        return Err(SecretError::BadSize { path: shown });
    }
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        path: shown.clone(),
        source,
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(SecretError::BadSize { path: shown });
    }
    Ok(text.to_owned())
}

/// Compares two secrets in constant time.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}
