//! The ffmpeg encode a source runs for each of its channels: a lavfi test pattern with a
//! burned-in wall clock, channel and host name plus a tone, encoded once and written as FLV to ffmpeg's stdout. The source process reads
//! those tags and publishes them over RTMPS to every ingest (`crate::supervisor`), so the stream
//! key is never on ffmpeg's command line and never travels in clear.
//!
//! Everything here is pure (config in, argument list out) so it is tested without ffmpeg.

use std::path::{Path, PathBuf};

use streaming_core::config::{HostConfig, Role};
use streaming_rtmp_publish::{Target, TargetError};

/// Font for the burned-in text (Debian `fonts-dejavu-core`).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Frequency of the test tone.
pub const TONE_HZ: u32 = 440;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("host {0} is not a source")]
    NotASource(String),
    #[error("source {host} publishes channel {channel:?} which the cluster does not define")]
    UnknownChannel { host: String, channel: String },
    #[error("channel {0} has an empty ladder")]
    EmptyLadder(String),
    #[error("no ingest in the cluster to publish to")]
    NoIngest,
    #[error("stream key: {0}")]
    Key(#[from] streaming_core::secrets::SecretError),
    #[error(transparent)]
    Target(#[from] TargetError),
}

/// Everything that decides the encode except the anchor (taken at each spawn).
///
/// Two specs compare equal exactly when a running encode can stay as it is after a reload.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodeSpec {
    pub host: String,
    pub channel: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// GOP length in frames: fps × segment duration, so every segment can start on a keyframe.
    pub gop: u32,
    pub preset: String,
    pub video_kbps: u32,
    pub audio_kbps: u32,
    /// The RTMPS endpoint of every ingest.
    pub ingests: Vec<Target>,
    /// The CA bundle the ingests' certificates are checked against.
    pub ca_cert: PathBuf,
    /// This host's address: the publishing connections come from it.
    pub address: std::net::IpAddr,
    pub stream_key: String,
}

impl std::fmt::Debug for EncodeSpec {
    // The stream key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodeSpec")
            .field("host", &self.host)
            .field("channel", &self.channel)
            .field("size", &format_args!("{}x{}", self.width, self.height))
            .field("fps", &self.fps)
            .field("gop", &self.gop)
            .field("preset", &self.preset)
            .field("ingests", &self.ingests)
            .finish_non_exhaustive()
    }
}

impl EncodeSpec {
    /// One encode per channel this source publishes, in the order `cluster.nix` lists them.
    pub fn all_from_config(config: &HostConfig) -> Result<Vec<Self>, SpecError> {
        let me = config.me();
        if me.role != Role::Source {
            return Err(SpecError::NotASource(me.name.clone()));
        }
        me.channels
            .iter()
            .map(|channel| Self::from_config(config, channel))
            .collect()
    }

    /// Derives the encode of `channel_name` from the host config and reads its stream key.
    pub fn from_config(config: &HostConfig, channel_name: &str) -> Result<Self, SpecError> {
        let me = config.me();
        let channel =
            config
                .cluster
                .channel(channel_name)
                .ok_or_else(|| SpecError::UnknownChannel {
                    host: me.name.clone(),
                    channel: channel_name.to_owned(),
                })?;
        // The top rendition: the source must carry at least what the ladder's best step shows.
        let top = channel
            .ladder
            .iter()
            .max_by_key(|r| u64::from(r.width) * u64::from(r.height))
            .ok_or_else(|| SpecError::EmptyLadder(channel.name.clone()))?;
        let ingests: Vec<_> = config
            .cluster
            .hosts_with_role(Role::Ingest)
            .map(Target::rtmps_of)
            .collect::<Result<_, _>>()?;
        if ingests.is_empty() {
            return Err(SpecError::NoIngest);
        }
        let key_path = config
            .paths
            .stream_keys_dir
            .join(format!("{}.key", channel.name));
        let stream_key = read_key(&key_path)?;
        let fps = channel.fps.max(1);
        Ok(Self {
            host: me.name.clone(),
            channel: channel.name.clone(),
            width: top.width,
            height: top.height,
            fps,
            gop: fps * config.cluster.timeline.segment_seconds.max(1),
            preset: channel.preset.clone(),
            // Twice the top rendition: the ingest re-encodes, so give it a clean picture.
            video_kbps: top.video_kbps.saturating_mul(2),
            audio_kbps: channel.audio_kbps,
            ingests,
            ca_cert: config.paths.ca_cert.clone(),
            address: me.address,
            stream_key,
        })
    }

    /// The RTMP publish name (the shared runtime contract's query parameters): the same for
    /// every ingest, and secret, since it carries the key.
    pub fn publish_name(&self, anchor_ms: u64) -> String {
        format!(
            "{}?key={}&source={}&anchor={anchor_ms}",
            self.channel,
            query_escape(&self.stream_key),
            query_escape(&self.host)
        )
    }

    /// ffmpeg's arguments (without the program name). The anchor is not among them: media
    /// time 0 is whenever ffmpeg starts, and the anchor travels in the publish name.
    pub fn ffmpeg_args(&self) -> Vec<String> {
        let drawtext = format!(
            "drawtext=fontfile={FONT}:text='%{{localtime}}  {channel} from {host}':x=16:y=16:\
             fontsize={size}:fontcolor=white:box=1:boxcolor=black@0.6:boxborderw=6",
            channel = filter_escape(&self.channel),
            host = filter_escape(&self.host),
            size = (self.height / 14).max(10),
        );
        let vk = self.video_kbps;
        let args = [
            "-hide_banner",
            "-nostdin",
            "-re",
            "-f",
            "lavfi",
            "-i",
            &format!(
                "testsrc2=size={}x{}:rate={}",
                self.width, self.height, self.fps
            ),
            "-re",
            "-f",
            "lavfi",
            "-i",
            &format!("sine=frequency={TONE_HZ}:sample_rate=48000"),
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-vf",
            &drawtext,
            "-c:v",
            "libx264",
            "-preset",
            &self.preset,
            "-tune",
            "zerolatency",
            "-profile:v",
            "main",
            "-pix_fmt",
            "yuv420p",
            "-g",
            &self.gop.to_string(),
            "-keyint_min",
            &self.gop.to_string(),
            "-sc_threshold",
            "0",
            "-b:v",
            &format!("{vk}k"),
            "-maxrate",
            &format!("{vk}k"),
            "-bufsize",
            &format!("{}k", vk * 2),
            "-c:a",
            "aac",
            "-ar",
            "48000",
            "-ac",
            "2",
            "-b:a",
            &format!("{}k", self.audio_kbps),
            "-f",
            "flv",
            // A pipe cannot seek back to patch these in.
            "-flvflags",
            "no_duration_filesize",
            // Every packet at once: the pipe's buffer would otherwise delay media by up to
            // 32 KiB, which at low bitrates is a large part of a segment.
            "-flush_packets",
            "1",
            "pipe:1",
        ];
        args.iter().map(|s| s.to_string()).collect()
    }
}

fn read_key(path: &Path) -> Result<String, streaming_core::secrets::SecretError> {
    streaming_core::secrets::read_secret(path)
}

/// Percent-escapes everything but unreserved characters for a query value.
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// drawtext text inside single quotes in a filtergraph: keep only harmless characters.
fn filter_escape(value: &str) -> String {
    value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ' '))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> EncodeSpec {
        EncodeSpec {
            host: "source1".into(),
            channel: "test".into(),
            width: 640,
            height: 360,
            fps: 25,
            gop: 50,
            preset: "ultrafast".into(),
            video_kbps: 1600,
            audio_kbps: 96,
            ingests: vec![],
            ca_cert: "/nonexistent/ca.crt".into(),
            address: [127, 0, 0, 1].into(),
            stream_key: "k3y/+=".into(),
        }
    }

    #[test]
    fn publish_name_follows_the_contract() {
        assert_eq!(
            spec().publish_name(1_700_000_000_123),
            "test?key=k3y%2F%2B%3D&source=source1&anchor=1700000000123"
        );
    }

    #[test]
    fn args_fix_the_gop_and_write_flv_to_stdout() {
        let args = spec().ffmpeg_args();
        let after = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(after("-g"), "50");
        assert_eq!(after("-keyint_min"), "50");
        assert_eq!(after("-profile:v"), "main");
        assert_eq!(after("-ar"), "48000");
        assert_eq!(after("-f"), "lavfi");
        assert_eq!(
            args[args.len() - 7..],
            [
                "-f",
                "flv",
                "-flvflags",
                "no_duration_filesize",
                "-flush_packets",
                "1",
                "pipe:1"
            ]
            .map(String::from)
        );
        assert!(after("-vf").contains("%{localtime}"));
        assert!(after("-vf").contains("source1"));
    }

    #[test]
    fn no_secret_on_the_command_line() {
        let args = spec().ffmpeg_args().join(" ");
        assert!(!args.contains("k3y"), "{args}");
        assert!(!args.contains("key="), "{args}");
    }

    #[test]
    fn key_stays_out_of_debug_output() {
        assert!(!format!("{:?}", spec()).contains("k3y"));
    }

    #[test]
    fn escaping() {
        assert_eq!(filter_escape("host':x=1"), "hostx1");
    }
}
