//! ADTS framing of AAC, as the MPEG-TS muxer writes it: each frame's header carries the codec
//! configuration an MP4 init segment needs (AudioSpecificConfig).

/// What an ADTS header says about the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioConfig {
    /// MPEG-4 audio object type (2 = AAC-LC).
    pub object_type: u8,
    pub frequency_index: u8,
    pub channels: u8,
}

/// Sampling frequencies by ADTS index (ISO/IEC 14496-3 table 1.18).
const FREQUENCIES: [u32; 13] = [
    96_000, 88_200, 64_000, 48_000, 44_100, 32_000, 24_000, 22_050, 16_000, 12_000, 11_025, 8_000,
    7_350,
];

/// Samples per AAC frame.
pub const SAMPLES_PER_FRAME: u32 = 1024;

impl AudioConfig {
    pub fn sample_rate(&self) -> u32 {
        FREQUENCIES[usize::from(self.frequency_index)]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdtsError {
    #[error("no ADTS sync word at byte {0}")]
    NoSync(usize),
    #[error("ADTS frame at byte {0} runs past the end of its packet")]
    Truncated(usize),
    #[error("ADTS frame at byte {0} has a reserved sampling frequency index")]
    BadFrequency(usize),
}

/// Splits one PES payload into raw AAC frames with their configuration.
pub fn frames(data: &[u8]) -> Result<Vec<(AudioConfig, &[u8])>, AdtsError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let h = data.get(at..at + 7).ok_or(AdtsError::Truncated(at))?;
        if h[0] != 0xFF || h[1] & 0xF0 != 0xF0 {
            return Err(AdtsError::NoSync(at));
        }
        let protection_absent = h[1] & 1 == 1;
        let config = AudioConfig {
            object_type: (h[2] >> 6) + 1,
            frequency_index: (h[2] >> 2) & 0x0F,
            channels: ((h[2] & 1) << 2) | (h[3] >> 6),
        };
        if usize::from(config.frequency_index) >= FREQUENCIES.len() {
            return Err(AdtsError::BadFrequency(at));
        }
        let length =
            (usize::from(h[3] & 0x03) << 11) | (usize::from(h[4]) << 3) | usize::from(h[5] >> 5);
        let header = if protection_absent { 7 } else { 9 };
        if length < header || at + length > data.len() {
            return Err(AdtsError::Truncated(at));
        }
        out.push((config, &data[at + header..at + length]));
        at += length;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ADTS header for AAC-LC, 48 kHz, stereo, around `payload`.
    pub(crate) fn adts(payload: &[u8]) -> Vec<u8> {
        let length = payload.len() + 7;
        let mut out = vec![
            0xFF,
            0xF1,
            (1 << 6) | (3 << 2),
            (2 << 6) | ((length >> 11) as u8 & 0x03),
            (length >> 3) as u8,
            ((length as u8 & 0x07) << 5) | 0x1F,
            0xFC,
        ];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn reads_frames_and_their_configuration() {
        let mut data = adts(&[1, 2, 3]);
        data.extend(adts(&[4, 5]));
        let got = frames(&data).unwrap();
        let lc48 = AudioConfig {
            object_type: 2,
            frequency_index: 3,
            channels: 2,
        };
        assert_eq!(got, vec![(lc48, &[1u8, 2, 3][..]), (lc48, &[4u8, 5][..])]);
        assert_eq!(lc48.sample_rate(), 48_000);
    }

    #[test]
    fn refuses_what_is_not_adts() {
        assert_eq!(frames(&[0, 1, 2, 3, 4, 5, 6, 7]), Err(AdtsError::NoSync(0)));
        let mut data = adts(&[1, 2, 3]);
        data.truncate(8);
        assert_eq!(frames(&data), Err(AdtsError::Truncated(0)));
        assert_eq!(frames(&[0xFF, 0xF1]), Err(AdtsError::Truncated(0)));
    }
}
