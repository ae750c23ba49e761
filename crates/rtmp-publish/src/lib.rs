//! Publishing over RTMPS from inside the cluster (a source to every ingest, an ingest relaying
//! to its peers): the stream key only ever travels inside TLS verified against the cluster CA.
//!
//! - [`flv`]: reading an FLV byte stream (ffmpeg's `-f flv pipe:1`) tag by tag.
//! - [`publish`]: one RTMP client per target over rustls, each behind its own queue, with
//!   reconnects, codec headers resent and video resumed at a keyframe; or one connection to one
//!   target ([`publish_once`]), for a lone publisher that picks its next address itself.

pub mod flv;
pub mod publish;

pub use flv::{FlvError, FlvReader, Tag, TagKind};
pub use publish::{
    Backoff, Fanout, PublishError, PublishOptions, Stream, Target, TargetError, client_config,
    publish_once,
};
