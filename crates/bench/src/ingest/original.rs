//! The original pipeline: nginx-rtmp receiving the publish, one `exec ffmpeg` per stream with
//! one output per rendition, pushed back to nginx-rtmp's `broadcast` application, which cuts
//! HLS. The arguments are those of aerogus/streaming-cluster, `ingest/nginx.conf` at commit
//! e15c499b9a891be22b053a0a425deddc3aeeb794 (lines 48-52): 720p, 480p and 360p from one
//! input. Its last output, the source copied as `$name_1080`, is left out: our ingest does not
//! pass the source through, so both pipelines make the same three renditions.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::bail;
use streaming_runner::procs;

/// One output of the original's `exec ffmpeg`.
#[derive(Debug, Clone, Copy)]
pub struct Rung {
    pub name: &'static str,
    pub width: u32,
    /// `-b:v`, which `-crf 23` overrides: the bitrate it asked for, not the one it got.
    pub video_kbps: u32,
    pub audio_kbps: u32,
}

/// The original's renditions, top first (its `exec` line lists them 360p first).
pub const LADDER: [Rung; 3] = [
    Rung {
        name: "720p",
        width: 1280,
        video_kbps: 2048,
        audio_kbps: 128,
    },
    Rung {
        name: "480p",
        width: 854,
        video_kbps: 1024,
        audio_kbps: 128,
    },
    Rung {
        name: "360p",
        width: 640,
        video_kbps: 768,
        audio_kbps: 96,
    },
];

/// The rendition's height as the original's `scale=W:trunc(ow/a/2)*2` makes it from a 16:9
/// input.
pub fn height_of(rung: &Rung) -> u32 {
    (rung.width * 9 / 16) / 2 * 2
}

/// The original's ffmpeg arguments after its input: one output per rung, in its order (360p,
/// 480p, 720p), each sent to `target(rung)`.
pub fn output_args(target: impl Fn(&Rung) -> String) -> Vec<String> {
    let mut args = vec!["-async".into(), "1".into(), "-vsync".into(), "-1".into()];
    for rung in LADDER.iter().rev() {
        args.extend(
            [
                "-c:v",
                "libx264",
                "-c:a",
                "aac",
                "-b:v",
                &format!("{}k", rung.video_kbps),
                "-b:a",
                &format!("{}k", rung.audio_kbps),
                "-vf",
                &format!("scale={}:trunc(ow/a/2)*2", rung.width),
                "-tune",
                "zerolatency",
                "-preset",
                "veryfast",
                "-g",
                "10",
                "-crf",
                "23",
                "-f",
                "flv",
            ]
            .map(String::from),
        );
        args.push(target(rung));
    }
    args
}

/// nginx with the RTMP module, run by us in the foreground, in its own process group.
pub struct NginxRtmp {
    child: Child,
    pub addr: SocketAddr,
    pub hls_dir: PathBuf,
}

impl NginxRtmp {
    /// Starts nginx-rtmp on `addr` with the original's applications; its files go to `work`.
    pub fn start(addr: SocketAddr, work: &Path, ffmpeg: &Path) -> anyhow::Result<Self> {
        let module = Path::new("/usr/lib/nginx/modules/ngx_rtmp_module.so");
        if !module.exists() {
            bail!(
                "nginx-rtmp is needed: apt-get install -y libnginx-mod-rtmp ({} missing)",
                module.display()
            );
        }
        // nginx started by root runs its worker (and so the exec'ed ffmpeg) as `nobody`,
        // which writes the HLS files.
        let hls_dir = work.join("hls");
        std::fs::create_dir_all(&hls_dir)?;
        std::fs::set_permissions(
            &hls_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )?;
        let conf = work.join("nginx-rtmp.conf");
        std::fs::write(&conf, nginx_conf(module, addr, work, &hls_dir, ffmpeg))?;
        let child = crate::serve::spawn_nginx(work, &conf, "nginx-rtmp")?;
        let nginx = Self {
            child,
            addr,
            hls_dir,
        };
        crate::serve::wait_listening(addr, &work.join("nginx-rtmp.out"), "nginx-rtmp")?;
        Ok(nginx)
    }

    /// The nginx master: every process of the pipeline (workers, exec'ed ffmpeg) descends
    /// from it.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Where a publisher sends the stream.
    pub fn publish_url(&self) -> String {
        format!("rtmp://{}/ingest/test", self.addr)
    }

    pub fn stop(&mut self) {
        procs::stop_group(self.pid(), Duration::from_secs(3));
        let _ = self.child.wait();
    }
}

impl Drop for NginxRtmp {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// The original's nginx.conf (rtmp part) with our address and paths: the `ingest`
/// application exec'ing the ladder, the `broadcast` application writing HLS (3 s fragments,
/// 60 s playlists). One worker where the original had `worker_processes auto` with
/// `rtmp_auto_push on`: with two workers here the exec'ed ffmpeg, started as the publish
/// begins, asked the worker that did not yet have the stream and failed at once
/// (`Input/output error`); one stream needs one worker anyway.
fn nginx_conf(module: &Path, addr: SocketAddr, work: &Path, hls: &Path, ffmpeg: &Path) -> String {
    let w = work.display();
    let outputs = output_args(|rung| format!("rtmp://{addr}/broadcast/$name_{}", rung.name))
        .into_iter()
        .map(|a| {
            if a.contains(['(', ')', '*']) {
                format!("\"{a}\"")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "load_module {};\ndaemon off;\nmaster_process on;\nworker_processes 1;\n\
         pid {w}/nginx-rtmp.pid;\nevents {{}}\n\
         rtmp {{\n  server {{\n    listen {addr};\n    chunk_size 4096;\n\
             application ingest {{\n      live on;\n      record off;\n      allow play 127.0.0.0/8;\n\
               exec {} -i rtmp://{addr}/$app/$name {outputs};\n    }}\n\
             application broadcast {{\n      live on;\n      hls on;\n      hls_path {};\n\
               hls_fragment 3;\n      hls_playlist_length 60;\n    }}\n  }}\n}}\n",
        module.display(),
        ffmpeg.display(),
        hls.display(),
    )
}
