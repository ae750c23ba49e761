//! The master playlist: one variant per rendition of the ladder.

/// One line of the ladder as the master playlist announces it.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub name: String,
    pub bandwidth_bps: u64,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
}

/// H.264 Main profile level 4.0 (what the transcoder is told to produce) + AAC-LC.
pub const CODECS: &str = "avc1.4d4028,mp4a.40.2";

/// Renders the master playlist, best rendition first; `uri` maps a rendition name to its
/// media playlist URI.
pub fn render_master(variants: &[Variant], uri: impl Fn(&str) -> String) -> String {
    let mut sorted: Vec<&Variant> = variants.iter().collect();
    sorted.sort_by_key(|v| std::cmp::Reverse(v.bandwidth_bps));
    let mut out = String::from("#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    for v in sorted {
        out.push_str(&format!(
            "#EXT-X-STREAM-INF:BANDWIDTH={},RESOLUTION={}x{},FRAME-RATE={}.000,CODECS=\"{CODECS}\"\n{}\n",
            v.bandwidth_bps,
            v.width,
            v.height,
            v.fps,
            uri(&v.name)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_master;

    #[test]
    fn master_lists_every_rendition_best_first() {
        let variants = vec![
            Variant {
                name: "144p".into(),
                bandwidth_bps: 300_000,
                width: 256,
                height: 144,
                fps: 25,
            },
            Variant {
                name: "360p".into(),
                bandwidth_bps: 1_000_000,
                width: 640,
                height: 360,
                fps: 25,
            },
        ];
        let text = render_master(&variants, |name| format!("{name}/index.m3u8?t=x"));
        let parsed = parse_master(&text).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].uri, "360p/index.m3u8?t=x");
        assert_eq!(parsed[0].resolution, Some((640, 360)));
        assert_eq!(parsed[1].bandwidth, 300_000);
    }
}
