//! Where a simulated viewer or chat client connects from.
//!
//! Real viewers come from their own machines, and every public listener limits what one address
//! may hold or ask for (`limits` in `cluster.nix`). On a loopback cluster every socket would leave
//! from 127.0.0.1 and the simulated crowd would share one allowance, so each simulated client
//! takes its own loopback address instead: third octet 100 and up, which no host uses (hosts are
//! `<prefix>.<role 1-5>.<n>`).

use std::net::{IpAddr, Ipv4Addr};

use url::Url;

/// The address client number `index` binds to when `target` is a loopback IPv4 address; `None`
/// (the kernel's choice) for anything else, where a bound loopback address could not route.
pub fn simulated(target: &Url, index: usize) -> Option<IpAddr> {
    let url::Host::Ipv4(ip) = target.host()? else {
        return None;
    };
    if !ip.is_loopback() {
        return None;
    }
    let block = u8::try_from(100 + index / 250).ok()?;
    let host = (index % 250 + 1) as u8;
    Some(Ipv4Addr::new(127, ip.octets()[1], block, host).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_get_one_address_per_client() {
        let lb = Url::parse("https://127.77.1.1:8443/").unwrap();
        assert_eq!(simulated(&lb, 0), Some("127.77.100.1".parse().unwrap()));
        assert_eq!(simulated(&lb, 251), Some("127.77.101.2".parse().unwrap()));
        assert_ne!(simulated(&lb, 3), simulated(&lb, 4));
        let public = Url::parse("https://streaming-cluster.test/").unwrap();
        assert_eq!(simulated(&public, 0), None);
        let remote = Url::parse("https://192.0.2.11/").unwrap();
        assert_eq!(simulated(&remote, 0), None);
    }
}
