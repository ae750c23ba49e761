//! HTTP checks against a local cluster: health, `/status`, and "does the stream play through an
//! LB", the condition `up` waits for.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

/// Longest playlist we read; a real one is a few KB.
pub const MAX_PLAYLIST_BYTES: usize = 256 * 1024;
/// Longest segment we read while checking playback.
pub const MAX_SEGMENT_BYTES: usize = 32 * 1024 * 1024;

/// A client that trusts the cluster CA and follows redirects (LB -> broadcast), like a player.
pub fn client(ca_cert: &Path, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    Ok(
        streaming_core::client::cluster_client_builder(ca_cert, timeout)?
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()?,
    )
}

/// GET with a body size limit; returns the final URL (after redirects) and the body.
pub async fn get_limited(
    client: &reqwest::Client,
    url: &str,
    limit: usize,
) -> anyhow::Result<(url::Url, bytes::Bytes)> {
    let mut response = client
        .get(url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {url}: {}", error_chain(&e.without_url())))?;
    let status = response.status();
    let final_url = response.url().clone();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        bail!(
            "GET {url}: {status} {}",
            body.chars().take(200).collect::<String>().trim()
        );
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            bail!("GET {url}: body larger than {limit} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    Ok((final_url, body.freeze()))
}

/// `GET /healthz` answered 200.
pub async fn healthy(client: &reqwest::Client, base_url: &str) -> Result<(), String> {
    match client.get(format!("{base_url}/healthz")).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            Err(format!(
                "{status} {}",
                body.trim().chars().take(120).collect::<String>()
            ))
        }
        Err(e) if e.is_timeout() => Err("timeout".into()),
        Err(e) if e.is_connect() => Err("no answer (connect failed)".into()),
        Err(e) => Err(error_chain(&e.without_url())),
    }
}

/// An error with its causes ("error sending request" alone says nothing).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `GET /status` with the ops token, as the typed document of the host's role
/// (`streaming_core::status`); `None` when it does not answer or answers something else.
pub async fn status<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    base_url: &str,
    token: Option<&str>,
) -> Option<T> {
    let mut request = client.get(format!("{base_url}/status"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.ok()?.error_for_status().ok()?;
    let body = streaming_core::client::read_limited(response, MAX_PLAYLIST_BYTES)
        .await
        .ok()?;
    serde_json::from_slice(&body).ok()
}

/// One full play through the LB: master -> first variant -> newest segment, which must be
/// fragmented MP4. Returns the segment's URL.
pub async fn plays(
    client: &reqwest::Client,
    lb_url: &str,
    channel: &str,
) -> anyhow::Result<String> {
    let master_url = format!("{lb_url}/live/{channel}/master.m3u8");
    let (master_at, master) = get_limited(client, &master_url, MAX_PLAYLIST_BYTES).await?;
    let master = std::str::from_utf8(&master).context("master playlist is not UTF-8")?;
    let variant = first_uri(master).context("master playlist lists no variant")?;
    let media_url = master_at.join(variant)?;
    let (media_at, media) = get_limited(client, media_url.as_str(), MAX_PLAYLIST_BYTES).await?;
    let media = std::str::from_utf8(&media).context("media playlist is not UTF-8")?;
    let segment = last_uri(media).context("media playlist lists no segment yet")?;
    let segment_url = media_at.join(segment)?;
    let (_, bytes) = get_limited(client, segment_url.as_str(), MAX_SEGMENT_BYTES).await?;
    if !streaming_media::fmp4::starts_with_fragment(&bytes) {
        bail!(
            "segment {segment_url} is not a fragmented MP4 segment ({} bytes)",
            bytes.len()
        );
    }
    Ok(segment_url.to_string())
}

/// URI lines of a playlist (non-empty, not tags).
fn uris(playlist: &str) -> impl Iterator<Item = &str> {
    playlist
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

pub fn first_uri(playlist: &str) -> Option<&str> {
    uris(playlist).next()
}

pub fn last_uri(playlist: &str) -> Option<&str> {
    uris(playlist).last()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playlist_uris() {
        let master = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\n360p/index.m3u8?t=a\n#EXT-X-STREAM-INF:BANDWIDTH=2\n240p/index.m3u8?t=a\n";
        assert_eq!(first_uri(master), Some("360p/index.m3u8?t=a"));
        let media = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n10.m4s?t=x\n#EXTINF:2.0,\n11.m4s?t=x\n\n";
        assert_eq!(last_uri(media), Some("11.m4s?t=x"));
        assert_eq!(last_uri("#EXTM3U\n"), None);
    }
}
