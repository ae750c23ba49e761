//! The local certificate authority of `streamctl up`: one CA, one leaf per host.
//!
//! Leaves carry the host's IP address (local URLs use addresses), its fqdn, and for LBs the site
//! name, so clients work with or without /etc/hosts entries. Existing files are kept while they
//! still verify against the CA for every one of those names, so re-running `up` does not make
//! browsers re-trust anything.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid name {0:?} for a certificate")]
    Name(String),
}

/// Who a leaf certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpec {
    pub host: String,
    pub address: IpAddr,
    /// DNS names: the fqdn, plus the site name for LBs.
    pub dns_names: Vec<String>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// The CA as files: `ca.crt` is given to every host and client, `ca.key` stays in the state dir.
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

const CA_NAME: &str = "streaming-cluster local CA";

/// The CA's parameters, rebuilt identically on every run so an existing `ca.key` can keep
/// signing without parsing the old certificate (the subject must stay the same).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(
        DnType::OrganizationName,
        "streaming-cluster (local, test only)",
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Creates the CA if missing, then every leaf that is missing or no longer valid.
/// Returns the hosts whose certificate was (re)issued.
pub fn ensure(ca: &CaFiles, leaves: &[LeafSpec]) -> Result<Vec<String>, PkiError> {
    let ca_key = if ca.cert.exists() && ca.key.exists() {
        KeyPair::from_pem(&read(&ca.key)?)?
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        write(&ca.key, key.serialize_pem().as_bytes(), true)?;
        write(&ca.cert, cert.pem().as_bytes(), false)?;
        key
    };
    let ca_cert_pem = read(&ca.cert)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut issued = Vec::new();
    for leaf in leaves {
        if leaf.cert_path.exists() && leaf.key_path.exists() && leaf_is_valid(&ca_cert_pem, leaf) {
            continue;
        }
        let (cert_pem, key_pem) = issue_leaf(&issuer, leaf)?;
        write(&leaf.key_path, key_pem.as_bytes(), true)?;
        write(&leaf.cert_path, cert_pem.as_bytes(), false)?;
        issued.push(leaf.host.clone());
    }
    Ok(issued)
}

/// The IP addresses a leaf names: the host's, and for a loopback host also 127.0.0.1, the
/// source address of every connection between loopback addresses. etcd checks a client's or
/// peer's certificate against the address the connection comes from.
fn leaf_addresses(spec: &LeafSpec) -> Vec<IpAddr> {
    let mut addresses = vec![spec.address];
    let loopback = IpAddr::from([127, 0, 0, 1]);
    if spec.address.is_loopback() && spec.address != loopback {
        addresses.push(loopback);
    }
    addresses
}

/// A leaf for `spec`, signed by `issuer`: (certificate PEM, key PEM).
pub fn issue_leaf(
    issuer: &Issuer<'_, KeyPair>,
    spec: &LeafSpec,
) -> Result<(String, String), PkiError> {
    let mut params = CertificateParams::new(spec.dns_names.clone())?;
    params
        .subject_alt_names
        .extend(leaf_addresses(spec).into_iter().map(SanType::IpAddress));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.host.as_str());
    params.distinguished_name = dn;
    params.is_ca = IsCa::NoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// True when the leaf verifies against the CA for its addresses and every DNS name, now and a
/// week from now.
pub fn leaf_is_valid(ca_cert_pem: &str, spec: &LeafSpec) -> bool {
    let Ok(leaf_pem) = std::fs::read_to_string(&spec.cert_path) else {
        return false;
    };
    let mut names: Vec<ServerName<'static>> = leaf_addresses(spec)
        .into_iter()
        .map(|a| ServerName::IpAddress(a.into()))
        .collect();
    for name in &spec.dns_names {
        match ServerName::try_from(name.clone()) {
            Ok(n) => names.push(n),
            Err(_) => return false,
        }
    }
    verifies(ca_cert_pem, &leaf_pem, &names)
}

/// Checks `leaf_pem` against `ca_pem` for each name with rustls' own WebPKI verifier.
pub fn verifies(ca_pem: &str, leaf_pem: &str, names: &[ServerName<'static>]) -> bool {
    use rustls_pki_types::pem::PemObject;
    let Ok(ca) = CertificateDer::from_pem_slice(ca_pem.as_bytes()) else {
        return false;
    };
    let Ok(leaf) = CertificateDer::from_pem_slice(leaf_pem.as_bytes()) else {
        return false;
    };
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(ca).is_err() {
        return false;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()
    else {
        return false;
    };
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let now = UnixTime::since_unix_epoch(since_epoch);
    let week_later =
        UnixTime::since_unix_epoch(since_epoch + std::time::Duration::from_secs(7 * 86400));
    names.iter().all(|name| {
        [now, week_later].into_iter().all(|at| {
            verifier
                .verify_server_cert(&leaf, &[], name, &[], at)
                .is_ok()
        })
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file, private ones with mode 0600.
pub fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), PkiError> {
    crate::files::write_file(path, bytes, private).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, address: &str) -> LeafSpec {
        LeafSpec {
            host: "lb1".into(),
            address: address.parse().unwrap(),
            dns_names: vec![
                "lb1.streaming-cluster.test".into(),
                "streaming-cluster.test".into(),
            ],
            cert_path: dir.join("lb1.crt"),
            key_path: dir.join("lb1.key"),
        }
    }

    #[test]
    fn leaf_verifies_against_the_ca_for_every_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaFiles {
            cert: dir.path().join("ca.crt"),
            key: dir.path().join("ca.key"),
        };
        let leaf = spec(dir.path(), "127.80.1.1");
        assert_eq!(
            ensure(&ca, std::slice::from_ref(&leaf)).unwrap(),
            vec!["lb1".to_owned()]
        );
        let ca_pem = std::fs::read_to_string(&ca.cert).unwrap();
        let leaf_pem = std::fs::read_to_string(&leaf.cert_path).unwrap();
        assert!(leaf_is_valid(&ca_pem, &leaf));
        let other: ServerName<'static> = ServerName::try_from("evil.example").unwrap();
        assert!(!verifies(&ca_pem, &leaf_pem, &[other]));
        let other_ip = ServerName::IpAddress("127.80.1.2".parse::<IpAddr>().unwrap().into());
        assert!(!verifies(&ca_pem, &leaf_pem, &[other_ip]));
        // Loopback connections arrive from 127.0.0.1, which etcd checks client certificates
        // against.
        let source = ServerName::IpAddress("127.0.0.1".parse::<IpAddr>().unwrap().into());
        assert!(verifies(&ca_pem, &leaf_pem, &[source]));
        // Private keys are 0600.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&leaf.key_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn valid_leaves_are_kept_and_changed_ones_reissued() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaFiles {
            cert: dir.path().join("ca.crt"),
            key: dir.path().join("ca.key"),
        };
        let leaf = spec(dir.path(), "127.80.1.1");
        ensure(&ca, std::slice::from_ref(&leaf)).unwrap();
        let first = std::fs::read_to_string(&leaf.cert_path).unwrap();
        // Second run: nothing to do, same file; the CA was reloaded from its key.
        assert!(ensure(&ca, std::slice::from_ref(&leaf)).unwrap().is_empty());
        assert_eq!(first, std::fs::read_to_string(&leaf.cert_path).unwrap());
        // A new address (another prefix) needs a new leaf, still signed by the same CA.
        let moved = spec(dir.path(), "127.81.1.1");
        assert_eq!(ensure(&ca, std::slice::from_ref(&moved)).unwrap().len(), 1);
        let ca_pem = std::fs::read_to_string(&ca.cert).unwrap();
        assert!(leaf_is_valid(&ca_pem, &moved));
    }

    #[test]
    fn a_leaf_from_another_ca_is_not_valid() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let ca = CaFiles {
            cert: dir.path().join("ca.crt"),
            key: dir.path().join("ca.key"),
        };
        let ca2 = CaFiles {
            cert: other.path().join("ca.crt"),
            key: other.path().join("ca.key"),
        };
        let leaf = spec(dir.path(), "127.80.1.1");
        ensure(&ca2, std::slice::from_ref(&leaf)).unwrap();
        let ca_pem = {
            ensure(&ca, &[]).unwrap();
            std::fs::read_to_string(&ca.cert).unwrap()
        };
        assert!(!leaf_is_valid(&ca_pem, &leaf));
        assert_eq!(ensure(&ca, std::slice::from_ref(&leaf)).unwrap().len(), 1);
        assert!(leaf_is_valid(&ca_pem, &leaf));
    }
}
