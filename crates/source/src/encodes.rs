//! The source's encodes, one per channel it publishes: started together, and on reload
//! started, restarted or stopped one channel at a time, so a change to one channel never
//! interrupts another.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;
use streaming_core::lifecycle::Lifecycle;
use streaming_core::sync::lock;

use crate::encode::EncodeSpec;
use crate::supervisor::{EncodeStatus, Supervisor};

/// One running [`Supervisor`] per channel.
pub struct Encodes {
    lifecycle: Lifecycle,
    running: Mutex<BTreeMap<String, Supervisor>>,
}

/// One channel's encode as `/status` shows it.
#[derive(Debug, Serialize)]
pub struct ChannelEncode {
    pub healthy: bool,
    #[serde(flatten)]
    pub encode: EncodeStatus,
}

impl Encodes {
    /// Starts every encode; must be called on the runtime that runs the publishing.
    pub fn start(specs: Vec<EncodeSpec>, lifecycle: Lifecycle) -> std::io::Result<Self> {
        let encodes = Self {
            lifecycle,
            running: Mutex::new(BTreeMap::new()),
        };
        encodes.apply(specs)?;
        Ok(encodes)
    }

    /// Brings the running encodes in line with `specs`: a new channel starts, a changed one
    /// restarts, a removed one stops (on a thread of its own: stopping waits for ffmpeg),
    /// an unchanged one keeps running.
    pub fn apply(&self, specs: Vec<EncodeSpec>) -> std::io::Result<()> {
        let mut running = lock(&self.running);
        let wanted: Vec<String> = specs.iter().map(|s| s.channel.clone()).collect();
        for gone in running
            .keys()
            .filter(|c| !wanted.contains(c))
            .cloned()
            .collect::<Vec<_>>()
        {
            if let Some(supervisor) = running.remove(&gone) {
                tracing::info!(channel = %gone, "no longer published here: stopping its encode");
                std::thread::spawn(move || supervisor.stop());
            }
        }
        for spec in specs {
            match running.get(&spec.channel) {
                Some(supervisor) if supervisor.spec().as_ref() == Some(&spec) => {
                    tracing::info!(channel = %spec.channel, "encode unchanged, ffmpeg keeps running");
                }
                Some(supervisor) => {
                    tracing::info!(
                        ?spec,
                        "encode changed (ingests, key or picture), restarting ffmpeg"
                    );
                    supervisor.replace(spec);
                }
                None => {
                    tracing::info!(channel = %spec.channel, ingests = spec.ingests.len(), "publishing test pattern");
                    let channel = spec.channel.clone();
                    running.insert(channel, Supervisor::start(spec, self.lifecycle.clone())?);
                }
            }
        }
        Ok(())
    }

    /// Every channel's encode, for `/status`.
    pub fn statuses(&self) -> BTreeMap<String, ChannelEncode> {
        lock(&self.running)
            .iter()
            .map(|(channel, s)| {
                let encode = ChannelEncode {
                    healthy: s.is_healthy(),
                    encode: s.status(),
                };
                (channel.clone(), encode)
            })
            .collect()
    }

    /// Stops every encode and waits for their ffmpeg to end. Blocking.
    pub fn stop(&self) {
        let running = std::mem::take(&mut *lock(&self.running));
        let stopping: Vec<_> = running
            .into_values()
            .map(|supervisor| std::thread::spawn(move || supervisor.stop()))
            .collect();
        for thread in stopping {
            let _ = thread.join();
        }
    }
}
