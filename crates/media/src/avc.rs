//! H.264 access units from MPEG-TS (Annex B byte stream) as MP4 wants them: length-prefixed NAL
//! units, with the parameter sets moved to the init segment.

/// NAL unit types this module acts on (ITU-T H.264 table 7-1).
const IDR: u8 = 5;
const SPS: u8 = 7;
const PPS: u8 = 8;
const ACCESS_UNIT_DELIMITER: u8 = 9;

/// One picture, ready for an MP4 sample.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessUnit {
    /// NAL units, each prefixed with its 4-byte big-endian length.
    pub sample: Vec<u8>,
    pub keyframe: bool,
    pub sps: Option<Vec<u8>>,
    pub pps: Option<Vec<u8>>,
}

/// The NAL units of an Annex B byte stream (start codes removed, trailing zero bytes too).
pub fn nal_units(stream: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut units = Vec::with_capacity(starts.len());
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(stream.len(), |next| next - 3);
        let mut unit = &stream[start..end];
        while let [rest @ .., 0] = unit {
            unit = rest;
        }
        if !unit.is_empty() {
            units.push(unit);
        }
    }
    units
}

/// Converts one PES payload (one access unit, as ffmpeg's MPEG-TS muxer writes it).
pub fn access_unit(stream: &[u8]) -> AccessUnit {
    let mut au = AccessUnit::default();
    for unit in nal_units(stream) {
        match unit[0] & 0x1F {
            SPS => au.sps = Some(unit.to_vec()),
            PPS => au.pps = Some(unit.to_vec()),
            ACCESS_UNIT_DELIMITER => {}
            kind => {
                au.keyframe |= kind == IDR;
                au.sample
                    .extend_from_slice(&(unit.len() as u32).to_be_bytes());
                au.sample.extend_from_slice(unit);
            }
        }
    }
    au
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_annex_b_and_keeps_parameter_sets_apart() {
        let stream = [
            0, 0, 0, 1, 0x09, 0xF0, // AUD
            0, 0, 0, 1, 0x67, 0x4D, 0x40, 0x28, // SPS
            0, 0, 1, 0x68, 0xEE, // PPS
            0, 0, 1, 0x65, 0x88, 0x84, 0, // IDR slice with a trailing zero
        ];
        let au = access_unit(&stream);
        assert!(au.keyframe);
        assert_eq!(au.sps.as_deref(), Some(&[0x67, 0x4D, 0x40, 0x28][..]));
        assert_eq!(au.pps.as_deref(), Some(&[0x68, 0xEE][..]));
        assert_eq!(au.sample, vec![0, 0, 0, 3, 0x65, 0x88, 0x84]);
        let p = access_unit(&[0, 0, 1, 0x41, 0x9A]);
        assert!(!p.keyframe);
        assert_eq!(p.sample, vec![0, 0, 0, 2, 0x41, 0x9A]);
        assert_eq!(access_unit(&[1, 2, 3]), AccessUnit::default());
    }
}
