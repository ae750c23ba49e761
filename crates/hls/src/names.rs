//! File names of a rendition, the same on ingests and broadcasts: `<seq>.m4s` for segment
//! `seq`, `<seq>.<part>.m4s` for its parts, and the init segments' own content-derived names
//! (`init-<16 hex>.mp4`).

/// What a file name of a rendition asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum File {
    Playlist,
    Segment(u64),
    Part(u64, u32),
    Init,
}

impl File {
    /// The file a name asks for; `None` for anything that is not a name of ours.
    pub fn of(name: &str) -> Option<Self> {
        if name == PLAYLIST {
            Some(Self::Playlist)
        } else if let Some(seq) = parse_segment(name) {
            Some(Self::Segment(seq))
        } else if let Some((seq, part)) = parse_part(name) {
            Some(Self::Part(seq, part))
        } else {
            is_init(name).then_some(Self::Init)
        }
    }
}

/// The media playlist of a rendition.
pub const PLAYLIST: &str = "index.m3u8";

/// The file name of segment `seq`.
pub fn segment(seq: u64) -> String {
    format!("{seq}.m4s")
}

/// `<seq>.m4s` with a plain decimal seq; anything else is not a segment name of ours.
pub fn parse_segment(file: &str) -> Option<u64> {
    let digits = file.strip_suffix(".m4s")?;
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The file name of part `part` of segment `seq`.
pub fn part(seq: u64, part: u32) -> String {
    format!("{seq}.{part}.m4s")
}

/// `<seq>.<part>.m4s` with plain decimal numbers.
pub fn parse_part(file: &str) -> Option<(u64, u32)> {
    let (seq, part) = file.strip_suffix(".m4s")?.split_once('.')?;
    let plain = |n: &str, max: usize| {
        !n.is_empty() && n.len() <= max && n.bytes().all(|b| b.is_ascii_digit())
    };
    if !plain(seq, 19) || !plain(part, 4) {
        return None;
    }
    Some((seq.parse().ok()?, part.parse().ok()?))
}

/// True for an init segment name as streaming-media makes them.
pub fn is_init(file: &str) -> bool {
    file.strip_prefix("init-")
        .and_then(|rest| rest.strip_suffix(".mp4"))
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_nothing_else_passes() {
        assert_eq!(parse_segment(&segment(882_000_000)), Some(882_000_000));
        for bad in [
            "",
            ".m4s",
            "+1.m4s",
            "1.m4s.m4s",
            "99999999999999999999.m4s",
            "1.ts",
            "../1.m4s",
        ] {
            assert_eq!(parse_segment(bad), None, "{bad}");
        }
        assert_eq!(parse_part(&part(882_000_000, 3)), Some((882_000_000, 3)));
        assert_eq!(parse_segment(&part(1, 3)), None);
        assert_eq!(parse_part(&segment(1)), None);
        for bad in ["1..m4s", ".1.m4s", "1.+1.m4s", "1.99999.m4s", "1.2.3.m4s"] {
            assert_eq!(parse_part(bad), None, "{bad}");
        }
        assert!(is_init("init-0123456789abcdef.mp4"));
        assert_eq!(File::of("index.m3u8"), Some(File::Playlist));
        assert_eq!(File::of("7.m4s"), Some(File::Segment(7)));
        assert_eq!(File::of("7.2.m4s"), Some(File::Part(7, 2)));
        assert_eq!(File::of("init-0123456789abcdef.mp4"), Some(File::Init));
        assert_eq!(File::of("index.m3u8.bak"), None);
        for bad in [
            "init-.mp4",
            "init-0123456789abcdeg.mp4",
            "init-0123456789abcdef.mp4/",
            "x.mp4",
        ] {
            assert!(!is_init(bad), "{bad}");
        }
    }
}
