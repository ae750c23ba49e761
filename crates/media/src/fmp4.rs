//! Fragmented MP4 as HLS plays it (`EXT-X-MAP` + movie fragments): the init segment, and one
//! `moof` + `mdat` pair per track and part.

use bytes::Bytes;
use mp4_atom::{
    Audio, Avc1, Avcc, Dinf, Dref, Encode, Esds, Ftyp, Hdlr, Mdat, Mdhd, Mdia, Mfhd, Minf, Moof,
    Moov, Mp4a, Mvex, Mvhd, Smhd, Stbl, Stco, Stsc, Stsd, Stsz, Stts, Tfdt, Tfhd, Tkhd, Traf, Trak,
    Trex, Trun, TrunEntry, Url, Visual, Vmhd, esds,
};
use sha2::{Digest, Sha256};

use crate::aac::AudioConfig;

pub const VIDEO_TRACK: u32 = 1;
pub const AUDIO_TRACK: u32 = 2;
/// Video keeps MPEG-TS's clock, so no timestamp is ever rounded.
pub const VIDEO_TIMESCALE: u32 = 90_000;

/// Sample flags (ISO/IEC 14496-12 8.8.3.1): a sync sample depends on nothing; other pictures
/// depend on others and are not sync samples.
const SYNC_SAMPLE: u32 = 0x0200_0000;
const NON_SYNC_SAMPLE: u32 = 0x0101_0000;
/// `default-base-is-moof` in `tfhd`: sample offsets count from the fragment's own `moof`, so
/// parts can be cut, concatenated and served on their own.
const DEFAULT_BASE_IS_MOOF: u8 = 0x02;

#[derive(Debug, thiserror::Error)]
pub enum Fmp4Error {
    #[error("cannot write MP4 boxes: {0}")]
    Encode(#[from] mp4_atom::Error),
    #[error("a fragment needs at least one sample")]
    Empty,
}

/// What the init segment describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracks {
    pub width: u16,
    pub height: u16,
    pub sps: Vec<u8>,
    pub pps: Vec<u8>,
    pub audio: Option<AudioConfig>,
}

/// An init segment and its name, derived from its bytes: the same codec configuration gives the
/// same name on every ingest, so a broadcast that switches origin keeps its `EXT-X-MAP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSegment {
    pub name: String,
    pub bytes: Bytes,
}

impl InitSegment {
    pub fn new(tracks: &Tracks) -> Result<Self, Fmp4Error> {
        let bytes = init_bytes(tracks)?;
        let digest = Sha256::digest(&bytes);
        let name = format!(
            "init-{}.mp4",
            digest[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        Ok(Self {
            name,
            bytes: Bytes::from(bytes),
        })
    }
}

fn init_bytes(tracks: &Tracks) -> Result<Vec<u8>, Fmp4Error> {
    let ftyp = Ftyp {
        major_brand: b"iso6".into(),
        minor_version: 0,
        compatible_brands: vec![b"iso6".into(), b"cmfc".into(), b"mp41".into()],
    };
    let mut trak = vec![video_trak(tracks)?];
    let mut trex = vec![Trex {
        track_id: VIDEO_TRACK,
        default_sample_description_index: 1,
        ..Default::default()
    }];
    if let Some(audio) = tracks.audio {
        trak.push(audio_trak(audio));
        trex.push(Trex {
            track_id: AUDIO_TRACK,
            default_sample_description_index: 1,
            ..Default::default()
        });
    }
    let moov = Moov {
        mvhd: Mvhd {
            timescale: 1000,
            rate: 1.into(),
            volume: 1.into(),
            next_track_id: AUDIO_TRACK + 1,
            ..Default::default()
        },
        mvex: Some(Mvex {
            trex,
            ..Default::default()
        }),
        trak,
        ..Default::default()
    };
    let mut out = Vec::new();
    ftyp.encode(&mut out)?;
    moov.encode(&mut out)?;
    Ok(out)
}

fn empty_stbl(stsd: Stsd) -> Stbl {
    Stbl {
        stsd,
        stts: Stts::default(),
        stsc: Stsc::default(),
        stsz: Stsz::default(),
        stco: Some(Stco::default()),
        ..Default::default()
    }
}

fn dinf() -> Dinf {
    Dinf {
        dref: Dref {
            urls: vec![Url {
                location: String::new(),
            }],
        },
    }
}

fn video_trak(tracks: &Tracks) -> Result<Trak, Fmp4Error> {
    let avc1 = Avc1 {
        visual: Visual {
            data_reference_index: 1,
            width: tracks.width,
            height: tracks.height,
            horizresolution: 72.into(),
            vertresolution: 72.into(),
            frame_count: 1,
            compressor: "".into(),
            depth: 24,
        },
        avcc: Avcc::new(&tracks.sps, &tracks.pps)?,
        btrt: None,
        colr: None,
        pasp: None,
        taic: None,
        fiel: None,
    };
    Ok(Trak {
        tkhd: Tkhd {
            track_id: VIDEO_TRACK,
            enabled: true,
            width: tracks.width.into(),
            height: tracks.height.into(),
            ..Default::default()
        },
        mdia: Mdia {
            mdhd: Mdhd {
                timescale: VIDEO_TIMESCALE,
                language: "und".into(),
                ..Default::default()
            },
            hdlr: Hdlr {
                handler: b"vide".into(),
                name: "video".into(),
            },
            minf: Minf {
                vmhd: Some(Vmhd::default()),
                dinf: dinf(),
                stbl: empty_stbl(Stsd {
                    codecs: vec![avc1.into()],
                }),
                ..Default::default()
            },
        },
        ..Default::default()
    })
}

fn audio_trak(audio: AudioConfig) -> Trak {
    let mp4a = Mp4a {
        audio: Audio {
            data_reference_index: 1,
            channel_count: u16::from(audio.channels.max(1)),
            sample_size: 16,
            sample_rate: (audio.sample_rate().min(u32::from(u16::MAX)) as u16).into(),
        },
        esds: Esds {
            es_desc: esds::EsDescriptor {
                es_id: AUDIO_TRACK as u16,
                dec_config: esds::DecoderConfig {
                    object_type_indication: 0x40,
                    stream_type: 5,
                    dec_specific: esds::DecoderSpecific {
                        profile: audio.object_type,
                        freq_index: audio.frequency_index,
                        chan_conf: audio.channels,
                    },
                    ..Default::default()
                },
                sl_config: esds::SLConfig {},
            },
        },
        btrt: None,
        taic: None,
    };
    Trak {
        tkhd: Tkhd {
            track_id: AUDIO_TRACK,
            alternate_group: 1,
            enabled: true,
            volume: 1.into(),
            ..Default::default()
        },
        mdia: Mdia {
            mdhd: Mdhd {
                timescale: audio.sample_rate(),
                language: "und".into(),
                ..Default::default()
            },
            hdlr: Hdlr {
                handler: b"soun".into(),
                name: "audio".into(),
            },
            minf: Minf {
                smhd: Some(Smhd::default()),
                dinf: dinf(),
                stbl: empty_stbl(Stsd {
                    codecs: vec![mp4a.into()],
                }),
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

/// One sample of a fragment, in its track's timescale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub decode_time: u64,
    pub duration: u32,
    /// Presentation minus decode time (B-frames).
    pub composition_offset: i32,
    pub sync: bool,
    pub data: Bytes,
}

/// One `moof` + `mdat` for one track. `sequence` numbers fragments (mfhd); the decode time of
/// the first sample becomes the fragment's `tfdt`.
pub fn fragment(sequence: u32, track_id: u32, samples: &[Sample]) -> Result<Vec<u8>, Fmp4Error> {
    let first = samples.first().ok_or(Fmp4Error::Empty)?;
    let entries = samples
        .iter()
        .map(|s| TrunEntry {
            duration: Some(s.duration),
            size: Some(s.data.len() as u32),
            flags: Some(if s.sync { SYNC_SAMPLE } else { NON_SYNC_SAMPLE }),
            cts: Some(s.composition_offset),
        })
        .collect();
    let mut moof = Moof {
        mfhd: Mfhd {
            sequence_number: sequence,
        },
        traf: vec![Traf {
            tfhd: Tfhd {
                track_id,
                ..Default::default()
            },
            tfdt: Some(Tfdt {
                base_media_decode_time: first.decode_time,
            }),
            trun: vec![Trun {
                data_offset: Some(0),
                entries,
            }],
            ..Default::default()
        }],
    };
    // The data offset counts from the moof's first byte to the first sample: moof + mdat header.
    let mut sized = Vec::new();
    moof.encode(&mut sized)?;
    moof.traf[0].trun[0].data_offset = Some(sized.len() as i32 + 8);
    let mut out =
        Vec::with_capacity(sized.len() + 8 + samples.iter().map(|s| s.data.len()).sum::<usize>());
    moof.encode(&mut out)?;
    set_default_base_is_moof(&mut out);
    let mdat = Mdat {
        data: samples
            .iter()
            .flat_map(|s| s.data.iter().copied())
            .collect(),
    };
    mdat.encode(&mut out)?;
    Ok(out)
}

/// Sets the `default-base-is-moof` flag of the one `tfhd` (mp4-atom has no field for it). The
/// layout is ours: moof header (8), mfhd (16), traf header (8), then tfhd with its version at 8
/// and flags at 9..12.
fn set_default_base_is_moof(moof: &mut [u8]) {
    const TFHD: usize = 8 + 16 + 8;
    if moof.get(TFHD + 4..TFHD + 8) == Some(&b"tfhd"[..]) {
        moof[TFHD + 9] |= DEFAULT_BASE_IS_MOOF;
    }
}

/// True when `data` starts with a movie fragment (`moof`): what a media segment or part of ours
/// starts with.
pub fn starts_with_fragment(data: &[u8]) -> bool {
    data.len() > 8 && &data[4..8] == b"moof"
}

/// Byte lengths of the parts of a segment of ours: a part starts at each video fragment.
pub fn part_lengths(data: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0usize;
    while at + 8 <= data.len() {
        let size =
            u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        if size < 8 || at + size > data.len() {
            break;
        }
        // moof (8) + mfhd (16) + traf header (8) + tfhd header (12), then the track id.
        let track = data
            .get(at + 44..at + 48)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if &data[at + 4..at + 8] == b"moof" && track == Some(VIDEO_TRACK) {
            starts.push(at);
        }
        at += size;
    }
    if at != data.len() || starts.first() != Some(&0) {
        return Vec::new();
    }
    starts
        .iter()
        .zip(starts.iter().skip(1).chain(std::iter::once(&data.len())))
        .map(|(start, end)| end - start)
        .collect()
}

/// Reads back the boxes of a fragment stream (tests and checks): (type, tfdt) per `moof`.
pub fn fragment_times(data: &[u8]) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut reader = std::io::Cursor::new(data);
    while (reader.position() as usize) < data.len() {
        match <mp4_atom::Any as mp4_atom::DecodeMaybe>::decode_maybe(&mut reader) {
            Ok(Some(mp4_atom::Any::Moof(moof))) => {
                for traf in moof.traf {
                    out.push((
                        traf.tfhd.track_id,
                        traf.tfdt.map_or(0, |t| t.base_media_decode_time),
                    ));
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    out
}
