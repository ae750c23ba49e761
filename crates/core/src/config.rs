//! The configuration schema of every service.
//!
//! These types are the single source of truth for what the Nix generator (`nix/generate.nix`)
//! emits: each host receives one JSON document, [`HostConfig`], holding the whole cluster view
//! plus the paths that belong to that host. Unknown fields are refused so that a typo in
//! `cluster.nix` or a drift between generator and binaries fails loudly at start, not silently.
//!
//! Every host sees the whole cluster on purpose: an LB needs every broadcast, a broadcast needs
//! every ingest, a source needs every ingest. A topology change is a new config plus SIGHUP.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors met while loading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not a valid host config: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("config file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The role a host plays; one service binary per role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Lb,
    Broadcast,
    Db,
    Ingest,
    Source,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Lb => "lb",
            Role::Broadcast => "broadcast",
            Role::Db => "db",
            Role::Ingest => "ingest",
            Role::Source => "source",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one host's service reads at start and on SIGHUP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// This host's name, one of `cluster.hosts[].name`.
    pub name: String,
    pub cluster: ClusterConfig,
    pub paths: HostPaths,
    pub telemetry: TelemetryConfig,
    /// Hosts that carry an etcd member (db hosts and the witness): its flags.
    pub etcd: Option<EtcdConfig>,
    /// Db hosts: Patroni's own configuration, passed through to its config file untouched.
    pub patroni: Option<serde_json::Value>,
    /// Db hosts: pgBackRest's stanza, config file path and settings (`global` and
    /// `stanza_options`, rendered as pgbackrest.conf's two sections).
    #[serde(default)]
    pub pgbackrest: Option<serde_json::Value>,
}

/// One etcd member as the runner (or the NixOS module) starts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub client_url: String,
    pub peer_url: String,
    /// `name=peer_url,...` for every member.
    pub initial_cluster: String,
    pub cluster_token: String,
}

/// The accounts and chat database every broadcast uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Database name, owned by `user`.
    pub name: String,
    /// The services' login role; its password is `paths.db_password`.
    pub user: String,
    /// Patroni's leader lease in seconds: the write outage after a primary dies is about this.
    pub ttl: u32,
}

/// Files this host reads. Secrets are paths, never values, so they stay out of the Nix store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPaths {
    /// Writable directory for the service's own files (ingest work files, caches).
    pub state_dir: PathBuf,
    /// Where per-host log files go; `None` logs to stderr only (journald in production).
    pub log_dir: Option<PathBuf>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// CA bundle that signs every cluster host's certificate (peer-to-peer HTTPS).
    pub ca_cert: PathBuf,
    /// HMAC key shared by LBs and broadcasts for viewer tokens.
    pub token_key: PathBuf,
    /// Bearer secret that broadcasts present to the ingests' origin API.
    pub cluster_key: PathBuf,
    /// Directory of `<channel>.key` files holding each channel's stream key.
    pub stream_keys_dir: PathBuf,
    /// Password of the services' database role.
    pub db_password: PathBuf,
    /// Db hosts: PostgreSQL superuser password (Patroni, pg_rewind).
    pub db_superuser_password: PathBuf,
    /// Db hosts: password of the streaming replication role.
    pub db_replication_password: PathBuf,
    /// Password of the `admin` account created at first start.
    pub admin_password: PathBuf,
    /// Bearer token that opens `/status` and `/metrics` to callers outside the cluster's host
    /// addresses (Prometheus, `streamctl status`). Without it only cluster hosts may read them.
    #[serde(default)]
    pub metrics_token: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Log JSON lines instead of human-readable text.
    pub json_logs: bool,
    /// OTLP/HTTP endpoint for traces, e.g. `http://collector:4318`; `None` disables export.
    pub otlp_endpoint: Option<String>,
}

/// The whole cluster as every host sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The public name both LBs answer for, e.g. `streaming-cluster.test`.
    pub site: String,
    /// `local`, `vm` or `production`.
    pub profile: String,
    /// Public entry URLs of the site (the LBs), in preference order.
    pub site_urls: Vec<String>,
    pub timeline: TimelineConfig,
    pub hosts: Vec<HostEntry>,
    pub channels: Vec<ChannelConfig>,
    pub database: DatabaseConfig,
    /// What one outside client may hold or ask for (`limits` in `cluster.nix`).
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// Limits that keep one client, or a few hundred, from stopping, filling or fooling a host.
/// Every listener faces the internet in production; docs/security.md explains each value.
/// Any field left out of `cluster.nix` takes the default below.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// A new HTTPS connection must finish its TLS handshake and send its first request's
    /// headers within this; later requests' headers too.
    pub http_header_seconds: u32,
    /// A keep-alive HTTPS connection with no request in flight is closed after this.
    pub http_idle_seconds: u32,
    /// Open HTTPS connections per listener.
    pub http_connections: u32,
    /// Open HTTPS connections from one address (households and offices share one).
    pub http_connections_per_address: u32,
    /// `/api/assign` and the LB's entry redirects, per client address.
    pub assign_rate: RateLimit,
    /// Account endpoints (register, login), per client address.
    pub account_rate: RateLimit,
    /// Open RTMP and RTMPS connections per ingest.
    pub rtmp_connections: u32,
    /// Open RTMP and RTMPS connections from one address.
    pub rtmp_connections_per_address: u32,
    /// An RTMP connection that has not been accepted as a publisher by then is closed.
    pub rtmp_publish_seconds: u32,
    /// New connections to the LBs' publish address, per client address (a publisher
    /// reconnects every few seconds at most; each forwarded connection costs an ingest a TLS
    /// handshake).
    pub rtmp_connect_rate: RateLimit,
    /// Chat WebSockets per broadcast.
    pub chat_sockets: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            http_header_seconds: 10,
            http_idle_seconds: 60,
            http_connections: 16384,
            http_connections_per_address: 256,
            assign_rate: RateLimit {
                burst: 20,
                per_minute: 60,
            },
            account_rate: RateLimit {
                burst: 10,
                per_minute: 20,
            },
            rtmp_connections: 64,
            rtmp_connections_per_address: 8,
            rtmp_publish_seconds: 5,
            rtmp_connect_rate: RateLimit {
                burst: 10,
                per_minute: 30,
            },
            chat_sockets: 4096,
        }
    }
}

/// A token bucket: `burst` requests at once, then `per_minute` spread over each minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub burst: u32,
    pub per_minute: u32,
}

/// The shared HLS timeline (docs/architecture.md): slot k covers wall-clock [k·D, (k+1)·D).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineConfig {
    /// Segment duration D in seconds.
    pub segment_seconds: u32,
    /// Segments listed in each media playlist.
    pub playlist_segments: u32,
    /// Segments a broadcast keeps in memory (at least `playlist_segments`).
    pub cache_segments: u32,
    /// How long a higher-priority source must have delivered without a gap before the ingests
    /// go back to it (rounded up to whole segments).
    pub primary_return_seconds: u32,
    /// Low-latency HLS part duration P in milliseconds (docs/latency.md).
    #[serde(default = "default_part_ms")]
    pub part_ms: u32,
    /// How far behind the newest part players start: PART-HOLD-BACK in parts (at least 2, the
    /// spec's minimum). The default, 5 (2.0 s of 0.4 s parts), is the lowest that kept every
    /// row of the failover matrix at 0 s of stall (docs/latency.md).
    #[serde(default = "default_part_hold_back_parts")]
    pub part_hold_back_parts: u32,
}

fn default_part_ms() -> u32 {
    400
}

fn default_part_hold_back_parts() -> u32 {
    5
}

impl TimelineConfig {
    /// `primary_return_seconds` in whole slots, at least one.
    pub fn primary_return_slots(&self) -> u32 {
        self.primary_return_seconds
            .div_ceil(self.segment_seconds.max(1))
            .max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    pub https: u16,
    pub rtmp: u16,
    pub rtmps: u16,
    pub patroni: u16,
    pub postgres: u16,
    pub etcd_client: u16,
    pub etcd_peer: u16,
}

/// One entry of `cluster.nix` after the generator filled in addresses and ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    pub name: String,
    pub role: Role,
    /// DNS name, e.g. `broadcast1.streaming-cluster.test`.
    pub fqdn: String,
    /// Address the host's services bind and peers connect to.
    pub address: IpAddr,
    pub ports: Ports,
    /// Base HTTPS URL other hosts and viewers use, e.g. `https://127.77.2.1:8443`.
    pub url: String,
    /// Broadcasts: uplink that caps how many viewers the LBs send here.
    pub uplink_mbps: Option<u32>,
    /// CPU cores of the machine, when declared: `streamctl plan` checks the measured cost of
    /// its load against them (nothing at run time reads it).
    #[serde(default)]
    pub cores: Option<u32>,
    /// Broadcasts: the ingest pulled first (spread across broadcasts by the generator).
    pub preferred_ingest: Option<String>,
    /// Sources: the channels this source publishes, one encode each.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Sources: lower is preferred, for every channel the source publishes.
    pub priority: Option<u32>,
    /// Non-db host carrying the third etcd member.
    pub etcd_witness: bool,
    /// Draining hosts get no new viewers; existing ones move at their next request.
    pub drain: bool,
}

impl HostEntry {
    /// `host:port` for a given port of this host, bracketing IPv6 addresses.
    pub fn socket(&self, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.address, port)
    }
}

/// One live channel and its ABR ladder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    pub fps: u32,
    /// x264 preset for the ladder (`ultrafast` on small local machines).
    pub preset: String,
    pub audio_kbps: u32,
    pub ladder: Vec<Rendition>,
}

impl ChannelConfig {
    /// Bandwidth of the top rendition in bits per second, as announced in the master playlist.
    pub fn top_bandwidth_bps(&self) -> u64 {
        self.ladder
            .iter()
            .map(Rendition::bandwidth_bps_with(self.audio_kbps))
            .max()
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rendition {
    /// Path-safe name such as `360p`.
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub video_kbps: u32,
}

impl Rendition {
    /// Peak bandwidth estimate (video + audio + 10 % container overhead) for `BANDWIDTH`.
    pub fn bandwidth_bps_with(audio_kbps: u32) -> impl Fn(&Rendition) -> u64 {
        move |r| u64::from(r.video_kbps + audio_kbps) * 1100
    }
}

/// A host drained at run time: while this file exists in its state directory, the host reads
/// its own entry as drained whatever the config says (a rolling upgrade of NixOS hosts creates
/// it and reloads the service, so no config has to be redeployed; docs/deploy.md).
pub const DRAIN_FLAG: &str = "draining";

impl HostConfig {
    /// Reads and validates a host config file (and the [`DRAIN_FLAG`] beside its state).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: HostConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        config.validate().map_err(|reason| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        let mut config = config;
        if config.paths.state_dir.join(DRAIN_FLAG).exists() {
            let name = config.name.clone();
            if let Some(me) = config.cluster.hosts.iter_mut().find(|h| h.name == name) {
                me.drain = true;
            }
        }
        Ok(config)
    }

    /// Checks what serde cannot: references between entries and path-safe names.
    pub fn validate(&self) -> Result<(), String> {
        self.cluster.validate()?;
        if self.cluster.host(&self.name).is_none() {
            return Err(format!(
                "host {:?} is not in the cluster's host list",
                self.name
            ));
        }
        Ok(())
    }

    /// This host's own entry (validated to exist).
    pub fn me(&self) -> &HostEntry {
        self.cluster.host(&self.name).expect("validated at load")
    }
}

impl ClusterConfig {
    pub fn host(&self, name: &str) -> Option<&HostEntry> {
        self.hosts.iter().find(|h| h.name == name)
    }

    pub fn hosts_with_role(&self, role: Role) -> impl Iterator<Item = &HostEntry> {
        self.hosts.iter().filter(move |h| h.role == role)
    }

    /// Every way in: each LB's own URL, in config order. In production the site name resolves
    /// to every LB, but a browser's fallback between a name's addresses does not skip an LB
    /// that accepts connections and never answers (hung), so clients get each LB by its own
    /// name and time every attempt out themselves. A host list without LBs keeps `site_urls`.
    pub fn lb_urls(&self) -> Vec<String> {
        let lbs: Vec<String> = self
            .hosts_with_role(Role::Lb)
            .map(|h| h.url.trim_end_matches('/').to_owned())
            .collect();
        if lbs.is_empty() {
            self.site_urls.clone()
        } else {
            lbs
        }
    }

    pub fn channel(&self, name: &str) -> Option<&ChannelConfig> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// The channel of the site's front page: the first one declared.
    pub fn default_channel(&self) -> Option<&ChannelConfig> {
        self.channels.first()
    }

    /// The top rendition's bandwidth of the costliest channel: a new viewer may pick any
    /// channel and any rendition, so room for "one more viewer" is counted in this unit.
    pub fn costliest_top_bandwidth_bps(&self) -> u64 {
        self.channels
            .iter()
            .map(ChannelConfig::top_bandwidth_bps)
            .max()
            .unwrap_or(0)
    }

    /// Sources of a channel, best first.
    pub fn sources_of(&self, channel: &str) -> Vec<&HostEntry> {
        let mut sources: Vec<_> = self
            .hosts_with_role(Role::Source)
            .filter(|h| h.channels.iter().any(|c| c == channel))
            .collect();
        sources.sort_by_key(|h| (h.priority.unwrap_or(u32::MAX), h.name.clone()));
        sources
    }

    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for host in &self.hosts {
            if !is_safe_name(&host.name) {
                return Err(format!("host name {:?} must be [a-z0-9-]+", host.name));
            }
            if !names.insert(&host.name) {
                return Err(format!("host {:?} appears twice", host.name));
            }
            match host.role {
                Role::Broadcast if host.uplink_mbps.unwrap_or(0) == 0 => {
                    return Err(format!("broadcast {} needs uplink_mbps > 0", host.name));
                }
                Role::Source => {
                    if host.channels.is_empty() {
                        return Err(format!("source {} publishes no channel", host.name));
                    }
                    if let Some(unknown) = host.channels.iter().find(|c| self.channel(c).is_none())
                    {
                        return Err(format!(
                            "source {} publishes unknown channel {unknown:?}",
                            host.name
                        ));
                    }
                }
                _ => {}
            }
        }
        for host in &self.hosts {
            if let Some(ingest) = &host.preferred_ingest
                && self.host(ingest).map(|h| h.role) != Some(Role::Ingest)
            {
                return Err(format!(
                    "{}: preferred_ingest {ingest:?} is not an ingest",
                    host.name
                ));
            }
        }
        if self.timeline.segment_seconds == 0 || self.timeline.playlist_segments < 3 {
            return Err("timeline needs segment_seconds >= 1 and playlist_segments >= 3".into());
        }
        let t = &self.timeline;
        if t.part_ms < 100 || t.part_ms > t.segment_seconds * 1000 || t.part_hold_back_parts < 2 {
            return Err(
                "timeline needs 100 ms <= part_ms <= segment_seconds and part_hold_back_parts >= 2"
                    .into(),
            );
        }
        if self.timeline.cache_segments < self.timeline.playlist_segments {
            return Err("timeline.cache_segments must be >= playlist_segments".into());
        }
        for channel in &self.channels {
            if !is_safe_name(&channel.name) {
                return Err(format!(
                    "channel name {:?} must be [a-z0-9-]+",
                    channel.name
                ));
            }
            if channel.ladder.is_empty() {
                return Err(format!("channel {} has an empty ladder", channel.name));
            }
            for r in &channel.ladder {
                if !is_safe_name(&r.name) || r.width % 2 != 0 || r.height % 2 != 0 {
                    return Err(format!(
                        "rendition {:?} of {}: name must be [a-z0-9-]+ and sizes even",
                        r.name, channel.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Names end up in paths and URLs; keeping them to `[a-z0-9-]` rules out traversal and quoting.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_flag_in_the_state_dir_drains_the_host_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mut json = crate::fixture::host_config(
            "broadcast1",
            vec![
                crate::fixture::host("broadcast1", "broadcast", "127.0.0.1"),
                crate::fixture::host("broadcast2", "broadcast", "127.0.0.2"),
            ],
        );
        json["paths"]["state_dir"] = dir.path().to_str().unwrap().into();
        for host in json["cluster"]["hosts"].as_array_mut().unwrap() {
            host["uplink_mbps"] = 1000.into();
        }
        let file = dir.path().join("config.json");
        std::fs::write(&file, json.to_string()).unwrap();
        assert!(!HostConfig::load(&file).unwrap().me().drain);
        std::fs::write(dir.path().join(DRAIN_FLAG), "").unwrap();
        let drained = HostConfig::load(&file).unwrap();
        assert!(drained.me().drain);
        assert!(
            !drained.cluster.host("broadcast2").unwrap().drain,
            "only itself"
        );
    }

    #[test]
    fn primary_return_is_whole_slots() {
        let timeline = |seconds| TimelineConfig {
            segment_seconds: 2,
            playlist_segments: 6,
            cache_segments: 12,
            primary_return_seconds: seconds,
            part_ms: 400,
            part_hold_back_parts: 3,
        };
        assert_eq!(timeline(6).primary_return_slots(), 3);
        assert_eq!(timeline(7).primary_return_slots(), 4);
        assert_eq!(timeline(0).primary_return_slots(), 1);
    }

    #[test]
    fn safe_names() {
        assert!(is_safe_name("broadcast1"));
        assert!(is_safe_name("360p"));
        assert!(!is_safe_name("../etc"));
        assert!(!is_safe_name("Test"));
        assert!(!is_safe_name(""));
    }
}
