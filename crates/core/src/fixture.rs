//! Host configs for the unit tests of every crate, as the generator writes them, so each test
//! states only what it varies (built with the `test-fixtures` feature, from dev-dependencies).

use serde_json::{Value, json};

/// One host entry: `role` at `addr`, the default ports, no role extras, not drained. Tests set
/// what they need on the returned JSON (`drain`, `uplink_mbps`, a port).
pub fn host(name: &str, role: &str, addr: &str) -> Value {
    json!({
        "name": name, "role": role, "fqdn": format!("{name}.streaming-cluster.test"),
        "address": addr,
        "ports": {"https": 8443, "rtmp": 1935, "rtmps": 1936, "patroni": 8008, "postgres": 5432,
                  "etcd_client": 2379, "etcd_peer": 2380},
        "url": format!("https://{addr}:8443"), "uplink_mbps": null, "preferred_ingest": null,
        "channels": [], "priority": null, "etcd_witness": false, "drain": false
    })
}

/// The config of host `me` in a cluster of `hosts`: one channel `test` with a 360p rendition,
/// 2 s segments, every secret path `/x`. Tests change fields on the JSON, then parse it.
pub fn host_config(me: &str, hosts: Vec<Value>) -> Value {
    json!({
        "name": me,
        "cluster": {
            "site": "streaming-cluster.test", "profile": "local", "site_urls": [],
            "timeline": {"segment_seconds": 2, "playlist_segments": 6, "cache_segments": 12,
                         "primary_return_seconds": 6},
            "hosts": hosts,
            "channels": [{"name": "test", "fps": 25, "preset": "ultrafast", "audio_kbps": 96,
                          "ladder": [{"name": "360p", "width": 640, "height": 360, "video_kbps": 800}]}],
            "database": {"name": "streaming", "user": "streaming", "ttl": 20}
        },
        "paths": {"state_dir": "/x", "log_dir": null, "tls_cert": "/x", "tls_key": "/x", "ca_cert": "/x",
                  "token_key": "/x", "cluster_key": "/x", "stream_keys_dir": "/x", "db_password": "/x",
                  "db_superuser_password": "/x", "db_replication_password": "/x", "admin_password": "/x"},
        "telemetry": {"json_logs": false, "otlp_endpoint": null}
    })
}
