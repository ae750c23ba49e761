//! `streamctl publish`: FLV on stdin (ffmpeg's `-f flv pipe:1`) published over RTMPS, with the
//! stream key read from a file, so that a publisher made of ffmpeg has its key on no command
//! line and checks the server's certificate against a CA.
//!
//! One connection, as one run of a publisher: it ends when stdin does (exit 0) or when the
//! connection fails (exit 1, ffmpeg then gets a broken pipe). A shell loop around
//! `ffmpeg ... | streamctl publish ...` reconnects, as OBS does after a drop.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use streaming_rtmp_publish::{
    Backoff, FlvError, FlvReader, PublishOptions, Stream, Tag, TagKind, Target, client_config,
    publish_once,
};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

/// Tags read ahead of the connection (a few seconds of video).
pub const QUEUE_TAGS: usize = 256;

/// Why [`forward_media`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum MediaEnd {
    /// The FLV input ended.
    InputEnded,
    /// The publishing side dropped its receiver (its connection is gone).
    ReceiverGone,
}

/// Reads FLV from `input` and sends its media tags to `tx`, until either side ends. Media
/// only: the script tag (onMetaData) has no place in the publish.
pub async fn forward_media(
    input: impl AsyncRead + Unpin,
    tx: mpsc::Sender<Tag>,
) -> Result<MediaEnd, FlvError> {
    let mut flv = FlvReader::new(input);
    while let Some(tag) = flv.next_tag().await? {
        if matches!(tag.kind, TagKind::Audio | TagKind::Video) && tx.send(tag).await.is_err() {
            return Ok(MediaEnd::ReceiverGone);
        }
    }
    Ok(MediaEnd::InputEnded)
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Where to publish, without the key: `rtmps://<host>:<port>/<app>/<channel>`. The
    /// server's certificate must carry `<host>`.
    #[arg(long)]
    pub to: String,
    /// The file holding the channel's stream key.
    #[arg(long)]
    pub key_file: PathBuf,
    /// The CA bundle the server's certificate is checked against.
    #[arg(long)]
    pub ca_file: PathBuf,
}

/// What `--to` names.
#[derive(Debug, PartialEq)]
struct Destination {
    target: Target,
    app: String,
    channel: String,
}

fn destination(to: &str) -> anyhow::Result<Destination> {
    let url = url::Url::parse(to).with_context(|| format!("--to {to:?} is not a URL"))?;
    anyhow::ensure!(url.scheme() == "rtmps", "--to must be an rtmps:// URL");
    anyhow::ensure!(
        url.query().is_none(),
        "--to carries no query: the key comes from --key-file"
    );
    let host = url.host().context("--to names no host")?;
    let server_name = match host {
        url::Host::Domain(d) => rustls_pki_types::ServerName::try_from(d.to_owned())?,
        url::Host::Ipv4(ip) => rustls_pki_types::ServerName::from(std::net::IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => rustls_pki_types::ServerName::from(std::net::IpAddr::V6(ip)),
    };
    let addr = url
        .socket_addrs(|| Some(1936))
        .with_context(|| format!("resolving {to}"))?
        .into_iter()
        .next()
        .context("--to resolves to no address")?;
    let mut path = url.path_segments().context("--to has no path")?;
    let (Some(app), Some(channel), None) = (path.next(), path.next(), path.next()) else {
        anyhow::bail!("--to must end in /<app>/<channel>");
    };
    anyhow::ensure!(
        !app.is_empty() && !channel.is_empty(),
        "--to must end in /<app>/<channel>"
    );
    Ok(Destination {
        target: Target {
            name: host.to_string(),
            addr,
            server_name,
        },
        app: app.to_owned(),
        channel: channel.to_owned(),
    })
}

pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let to = destination(&args.to)?;
    let key = streaming_core::secrets::read_secret(&args.key_file)
        .with_context(|| format!("stream key {}", args.key_file.display()))?;
    let options = PublishOptions {
        tls: client_config(&args.ca_file)
            .with_context(|| format!("CA {}", args.ca_file.display()))?,
        app: to.app.clone(),
        queue_tags: QUEUE_TAGS,
        backoff: Backoff {
            first: std::time::Duration::ZERO,
            max: std::time::Duration::ZERO,
        },
        failures_metric: "publish_failures_total",
        bind: None,
    };
    let stream = Stream {
        label: to.channel.clone(),
        publish_name: format!(
            "{}?{}",
            to.channel,
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("key", &key)
                .finish()
        ),
    };
    let (tx, mut rx) = mpsc::channel(QUEUE_TAGS);
    let input = async move {
        forward_media(tokio::io::stdin(), tx)
            .await
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("FLV on stdin: {e}"))
    };
    let target = to.target.clone();
    let publishing = async move {
        let ended = publish_once(&target, &stream, &options, &mut rx).await;
        // Stops the reading: a failed connection is the end of this run.
        drop(rx);
        ended
    };
    let (input, published) = tokio::join!(input, publishing);
    published.with_context(|| format!("publishing to {}", to.target.name))?;
    input
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_name_host_app_and_channel_and_never_a_key() {
        let d = destination("rtmps://127.0.0.1:1936/live/test").unwrap();
        assert_eq!(d.target.addr, "127.0.0.1:1936".parse().unwrap());
        assert_eq!((d.app.as_str(), d.channel.as_str()), ("live", "test"));
        assert_eq!(
            destination("rtmps://127.0.0.1/live/test")
                .unwrap()
                .target
                .addr
                .port(),
            1936
        );
        for bad in [
            "rtmp://127.0.0.1:1935/live/test",
            "rtmps://127.0.0.1:1936/live/test?key=secret",
            "rtmps://127.0.0.1:1936/live",
            "rtmps://127.0.0.1:1936/live/test/more",
            "not a url",
        ] {
            assert!(destination(bad).is_err(), "{bad}");
        }
    }
}
