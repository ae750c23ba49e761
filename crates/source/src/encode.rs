//! The one ffmpeg encode a source runs: a lavfi test pattern with a burned-in wall clock and host
//! name plus a tone, encoded once and fanned out to every ingest with the `tee` muxer.
//!
//! The fan-out uses tee's fifo mode with recovery (DESIGN.md section 8 "Source fan-out"): each
//! output gets its own queue and thread, a failed output is reopened every
//! [`RECOVERY_WAIT_SECS`] for ever, and a slow output drops packets instead of blocking the
//! encoder. Verified against Debian's ffmpeg 5.1: an RTMP receiver that goes away and comes back
//! gets the stream again without the encoder restarting.
//!
//! Everything here is pure (config in, argument list out) so it is tested without ffmpeg.

use std::path::Path;

use streaming_core::config::{HostConfig, Role};

/// Font for the burned-in text (Debian `fonts-dejavu-core`).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Seconds between two reconnection attempts to an ingest that went away.
pub const RECOVERY_WAIT_SECS: u32 = 1;

/// Packets queued per output before a stuck output starts dropping (about 4 s at 25 fps + audio).
pub const FIFO_QUEUE_PACKETS: u32 = 200;

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
    /// `(ingest name, "host:port")` of every RTMP output.
    pub ingests: Vec<(String, String)>,
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
    /// Derives the encode from the host config and reads the channel's stream key.
    pub fn from_config(config: &HostConfig) -> Result<Self, SpecError> {
        let me = config.me();
        if me.role != Role::Source {
            return Err(SpecError::NotASource(me.name.clone()));
        }
        let channel_name = me.channel.clone().unwrap_or_default();
        let channel =
            config
                .cluster
                .channel(&channel_name)
                .ok_or_else(|| SpecError::UnknownChannel {
                    host: me.name.clone(),
                    channel: channel_name.clone(),
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
            .map(|h| (h.name.clone(), h.socket(h.ports.rtmp).to_string()))
            .collect();
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
            stream_key,
        })
    }

    /// The publish URL for one ingest (the shared runtime contract's query parameters).
    pub fn publish_url(&self, ingest_addr: &str, anchor_ms: u64) -> String {
        format!(
            "rtmp://{ingest_addr}/live/{}?key={}&source={}&anchor={anchor_ms}",
            self.channel,
            query_escape(&self.stream_key),
            query_escape(&self.host)
        )
    }

    /// The tee muxer's output list: one fifo-backed FLV output per ingest, failures ignored.
    pub fn tee_outputs(&self, anchor_ms: u64) -> String {
        self.ingests
            .iter()
            .map(|(_, addr)| {
                format!(
                    "[f=flv:onfail=ignore:flvflags=no_duration_filesize]{}",
                    tee_escape(&self.publish_url(addr, anchor_ms))
                )
            })
            .collect::<Vec<_>>()
            .join("|")
    }

    /// ffmpeg's arguments (without the program name) for an encode whose media time 0 is
    /// wall-clock `anchor_ms`.
    pub fn ffmpeg_args(&self, anchor_ms: u64) -> Vec<String> {
        let drawtext = format!(
            "drawtext=fontfile={FONT}:text='%{{localtime}}  {host}':x=16:y=16:fontsize={size}:\
             fontcolor=white:box=1:boxcolor=black@0.6:boxborderw=6",
            host = filter_escape(&self.host),
            size = (self.height / 14).max(10),
        );
        let fifo_options = format!(
            "attempt_recovery=1:recover_any_error=1:max_recovery_attempts=0:\
             recovery_wait_time={RECOVERY_WAIT_SECS}:drop_pkts_on_overflow=1:\
             restart_with_keyframe=1:queue_size={FIFO_QUEUE_PACKETS}"
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
            // FLV needs the codec headers up front; the tee muxer does not ask for them itself.
            "-flags",
            "+global_header",
            "-f",
            "tee",
            "-use_fifo",
            "1",
            "-fifo_options",
            &fifo_options,
            &self.tee_outputs(anchor_ms),
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

/// tee splits its output list with `av_get_token`: `|`, `\` and `'` must be escaped.
fn tee_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '|' | '\\' | '\'' | '[' | ']') {
            out.push('\\');
        }
        out.push(c);
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
            ingests: vec![
                ("ingest1".into(), "127.80.4.1:1935".into()),
                ("ingest2".into(), "127.80.4.2:1935".into()),
            ],
            stream_key: "k3y/+=".into(),
        }
    }

    #[test]
    fn publish_url_follows_the_contract() {
        assert_eq!(
            spec().publish_url("127.80.4.1:1935", 1_700_000_000_123),
            "rtmp://127.80.4.1:1935/live/test?key=k3y%2F%2B%3D&source=source1&anchor=1700000000123"
        );
    }

    #[test]
    fn one_fifo_output_per_ingest() {
        let outputs = spec().tee_outputs(5);
        let parts: Vec<_> = outputs.split('|').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts[0].starts_with("[f=flv:onfail=ignore"));
        assert!(parts[1].ends_with(
            "rtmp://127.80.4.2:1935/live/test?key=k3y%2F%2B%3D&source=source1&anchor=5"
        ));
    }

    #[test]
    fn args_fix_the_gop_and_enable_recovery() {
        let args = spec().ffmpeg_args(7);
        let after = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(after("-g"), "50");
        assert_eq!(after("-keyint_min"), "50");
        assert_eq!(after("-profile:v"), "main");
        assert_eq!(after("-ar"), "48000");
        assert_eq!(after("-use_fifo"), "1");
        assert!(after("-fifo_options").contains("attempt_recovery=1"));
        assert!(after("-fifo_options").contains("recover_any_error=1"));
        assert!(args.last().unwrap().contains("anchor=7"));
        assert!(after("-vf").contains("%{localtime}"));
        assert!(after("-vf").contains("source1"));
    }

    #[test]
    fn key_stays_out_of_debug_output() {
        assert!(!format!("{:?}", spec()).contains("k3y"));
    }

    #[test]
    fn escaping() {
        assert_eq!(tee_escape("a|b'c"), "a\\|b\\'c");
        assert_eq!(filter_escape("host':x=1"), "hostx1");
    }
}
