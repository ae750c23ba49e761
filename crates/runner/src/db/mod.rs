//! The database role of a local cluster: etcd members, Patroni with its PostgreSQL (run as the
//! `postgres` OS user, initdb refuses root), and what others ask about them: which db host is
//! the primary, and how the services' role connects.
//!
//! Process model. A db host is one process group like every host. Its leader is a small
//! `streamctl db-host --config <host>.json` supervisor (its command line names the host's config,
//! so pid files, `live_pid`, `status` and `down` treat it as any host) whose children are the
//! host's etcd member and Patroni. Patroni starts the postmaster in a session of its own and
//! every PostgreSQL backend calls setsid too, so signalling the group is not enough:
//! [`host_processes`] adds the postmaster (from `postmaster.pid`) and whatever else names the
//! host's state directory, with all their descendants. The etcd witness of lb1 joins lb1's
//! group, so `kill lb1` takes it down as a real host failure would.
//!
//! Secrets never reach a command line: Patroni gets its passwords from the environment
//! (`PATRONI_*_PASSWORD`, which Patroni removes from its environment at start), and the
//! post-bootstrap script reads the services' password from a postgres-owned copy in the host's
//! state directory.
//!
//! Everything between hosts is TLS with the cluster CA: etcd requires a client certificate from
//! clients and peers, Patroni's REST API is HTTPS and wants a client certificate plus its
//! credentials for anything that changes state, and PostgreSQL accepts TCP connections only
//! over TLS. Patroni and PostgreSQL read postgres-owned copies of the host's certificate and key
//! (see [`db_tls_files`]); etcd runs as the runner and reads the host's files directly.

use std::time::Duration;

/// The OS user Patroni and PostgreSQL run as (created by Debian's postgresql packages).
pub const PG_OS_USER: &str = "postgres";
/// Patroni from PyPI in a venv over Debian's python3 (whose psycopg2 it uses), installed by
/// scripts/setup-debian.sh. Debian 12's own patroni 3.0.2 can take the leader key back after
/// a hang longer than the ttl and demote the new primary, losing acknowledged commits
/// (patroni/patroni#2689, fixed in 3.0.3). Pinned to the version nixpkgs ships (4.1.0), so the
/// local cluster fails over as NixOS hosts do; from 3.1 on the least ttl is 20 s.
pub const PYTHON: &str = "/opt/streaming-cluster/patroni/bin/python3";
pub const PATRONI: &str = "/opt/streaming-cluster/patroni/bin/patroni";
/// Server binaries when `STREAMCTL_PG_BIN_DIR` is unset (else the newest installed version).
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// One REST request to Patroni or etcd (a hung host must not stall `status` or `up`).
pub const REST_TIMEOUT: Duration = Duration::from_secs(2);
/// Patroni's `/patroni` document is a few hundred bytes.
const MAX_REST_BYTES: usize = 64 * 1024;
/// `sockaddr_un.sun_path` holds 107 bytes plus the NUL.
const MAX_SOCKET_PATH: usize = 107;
/// How long `down` lets etcd stop on SIGTERM after Patroni is gone (it can take ~9 s).
const ETCD_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long `up` waits for a streaming replica once the primary is there.
pub const REPLICA_GRACE: Duration = Duration::from_secs(20);
/// Patroni's REST API user for requests that change state. Its password is the PostgreSQL
/// superuser's: whoever holds that already controls the database entirely, so the API gains no
/// new holder and the cluster no new secret to hand out.
pub const RESTAPI_USER: &str = "patroni";
/// Processes that may belong to a db host although they are not in its group (the postmaster
/// and its helpers); an operator's `less <state>/hosts/db1/...` is not one of them.
const HOST_COMMANDS: &[&str] = &[
    "postgres",
    "etcd",
    "python3",
    "patroni",
    "pg_rewind",
    "pg_basebackup",
    "pg_ctl",
    "initdb",
    "psql",
    "setpriv",
    "pgbackrest",
];

mod backup;
mod host;
mod readiness;
mod rest;
mod settings;
mod signals;
mod sql;

pub use backup::*;
pub use host::*;
pub use readiness::*;
pub use rest::*;
pub use settings::*;
pub use signals::*;
pub use sql::*;

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use serde_json::{Value, json};
    use std::os::unix::fs::PermissionsExt as _;
    use streaming_core::config::{EtcdConfig, HostPaths};

    use super::sql::percent_encode;
    use super::*;

    #[test]
    fn patroni_roles_and_streaming_replicas() {
        let primary = json!({
            "state": "running", "role": "master", "timeline": 2,
            "replication": [
                {"usename": "replicator", "application_name": "db2", "state": "streaming",
                 "sync_state": "sync"},
                {"usename": "replicator", "application_name": "db3", "state": "catchup"}
            ]
        });
        let m = parse_member(&primary).unwrap();
        assert_eq!(m.role, "primary");
        assert_eq!(m.state, "running");
        assert_eq!(m.timeline, Some(2));
        assert_eq!(m.streaming, vec!["db2".to_owned()]);
        let clone = json!({"state": "running", "role": "master", "replication": [
            {"application_name": "pg_basebackup", "state": "streaming"}]});
        assert_eq!(
            parse_member(&clone).unwrap().streaming,
            vec!["pg_basebackup"]
        );
        let replica = json!({"state": "running", "role": "replica", "sync_standby": true});
        let m = parse_member(&replica).unwrap();
        assert_eq!((m.role.as_str(), m.sync_standby), ("replica", true));
        assert!(m.streaming.is_empty());
        assert_eq!(parse_member(&json!({"state": "running"})), None);
        assert_eq!(parse_member(&json!("x")), None);
    }

    #[test]
    fn etcd_flags_name_the_member_and_new_cluster() {
        let etcd = EtcdConfig {
            name: "db1".into(),
            data_dir: "/s/hosts/db1/etcd".into(),
            client_url: "https://127.78.3.1:2379".into(),
            peer_url: "https://127.78.3.1:2380".into(),
            initial_cluster: "db1=https://127.78.3.1:2380,lb1=https://127.78.1.1:2380".into(),
            cluster_token: "t".into(),
        };
        let paths = HostPaths {
            state_dir: "/s/hosts/db1".into(),
            log_dir: None,
            tls_cert: "/s/tls/db1.crt".into(),
            tls_key: "/s/tls/db1.key".into(),
            ca_cert: "/s/tls/ca.crt".into(),
            token_key: "/s/k".into(),
            cluster_key: "/s/c".into(),
            stream_keys_dir: "/s/sk".into(),
            db_password: "/s/p".into(),
            db_superuser_password: "/s/su".into(),
            db_replication_password: "/s/r".into(),
            admin_password: "/s/a".into(),
            metrics_token: None,
        };
        let args = etcd_args(&etcd, &paths);
        let flag = |name: &str| {
            let at = args.iter().position(|a| a == name).unwrap();
            args[at + 1].clone()
        };
        assert_eq!(flag("--data-dir"), "/s/hosts/db1/etcd");
        assert_eq!(flag("--listen-client-urls"), "https://127.78.3.1:2379");
        assert_eq!(
            flag("--initial-advertise-peer-urls"),
            "https://127.78.3.1:2380"
        );
        // Client and peer TLS, both requiring a certificate from the cluster CA.
        assert_eq!(flag("--cert-file"), "/s/tls/db1.crt");
        assert_eq!(flag("--peer-key-file"), "/s/tls/db1.key");
        assert_eq!(flag("--trusted-ca-file"), "/s/tls/ca.crt");
        assert_eq!(flag("--peer-trusted-ca-file"), "/s/tls/ca.crt");
        assert!(args.contains(&"--client-cert-auth".to_owned()));
        assert!(args.contains(&"--peer-client-cert-auth".to_owned()));
        assert!(args.contains(&"--pre-vote".to_owned()));
        assert_eq!(flag("--initial-cluster-state"), "new");
        assert_eq!(flag("--heartbeat-interval"), "100");
        assert_eq!(flag("--election-timeout"), "1000");
        assert!(!args.iter().any(|a| a.starts_with("http://")), "{args:?}");
    }

    #[test]
    fn post_bootstrap_keeps_the_password_out_of_argv_and_quotes_names() {
        let script = post_bootstrap_script(Path::new("/usr/lib/pg bin/psql"), "streaming", "o'k");
        assert!(script.contains("exec '/usr/lib/pg bin/psql' -X"));
        assert!(script.contains(r"-v role='o'\''k'"));
        assert!(script.contains("\\set pw `cat app-password`"));
        assert!(script.contains(r#"CREATE ROLE :"role" LOGIN PASSWORD :'pw';"#));
        assert!(script.contains(r#"CREATE DATABASE :"db" OWNER :"role";"#));
        // The heredoc is quoted: the shell expands nothing in the SQL.
        assert!(script.contains("<<'SQL'"));
        assert!(script.contains("ON_ERROR_STOP=1"));
    }

    /// The generator's db1 section plus this machine's parts: no password anywhere in the file
    /// Patroni reads, the script path quoted for shlex, fast clones.
    #[test]
    fn patroni_settings_from_the_generator() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let state = tempfile::tempdir().unwrap();
        let configs = crate::cluster::evaluate(
            &root.join("nix/generate.nix"),
            &root.join("cluster.nix"),
            state.path(),
            "127.80",
        )
        .unwrap();
        let db1 = &configs["db1"];
        let script = db1.paths.state_dir.join("post bootstrap.sh");
        let settings = patroni_settings(db1, Path::new("/pg/bin"), &script).unwrap();
        assert_eq!(settings["postgresql"]["bin_dir"], "/pg/bin");
        assert_eq!(
            settings["bootstrap"]["post_bootstrap"],
            sh_quote(&script.to_string_lossy())
        );
        assert_eq!(
            settings["postgresql"]["basebackup"],
            json!([{"checkpoint": "fast"}])
        );
        assert_eq!(settings["name"], "db1");
        assert_eq!(settings["restapi"]["listen"], "127.80.3.1:8008");
        // TLS everywhere, with postgres-owned copies of the host's files.
        let tls = db1.paths.state_dir.join("tls");
        let copies: Vec<PathBuf> = db_tls_files(db1)
            .unwrap()
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        assert_eq!(
            copies,
            ["cert.pem", "key.pem", "ca.pem"].map(|f| tls.join(f))
        );
        assert_eq!(settings["restapi"]["verify_client"], "optional");
        assert_eq!(settings["etcd3"]["protocol"], "https");
        assert_eq!(settings["etcd3"]["cert"], settings["restapi"]["certfile"]);
        // Its own etcd member only: a host cut off from the others loses the DCS with it.
        assert_eq!(
            settings["etcd3"]["hosts"],
            serde_json::json!(["127.80.3.1:2379"])
        );
        assert_eq!(settings["etcd3"]["use_proxies"], true);
        let pg = &settings["postgresql"];
        assert_eq!(pg["parameters"]["ssl"], "on");
        assert_eq!(
            pg["parameters"]["ssl_key_file"],
            settings["restapi"]["keyfile"]
        );
        for user in ["superuser", "replication", "rewind"] {
            assert_eq!(
                pg["authentication"][user]["sslmode"], "verify-full",
                "{user}"
            );
        }
        for hba in [&pg["pg_hba"], &settings["bootstrap"]["pg_hba"]] {
            let lines: Vec<&str> = hba
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                lines
                    .iter()
                    .all(|l| l.starts_with("local ") || l.starts_with("hostssl ")),
                "{lines:?}"
            );
        }
        assert!(!settings.to_string().contains("password"), "{settings}");
        let dirs = pg_dirs(db1).unwrap();
        assert_eq!(dirs.data_dir, db1.paths.state_dir.join("pgdata"));
        assert_eq!(dirs.socket_dir, Some(db1.paths.state_dir.join("run")));
        // The witness runs etcd only; broadcasts run neither.
        assert!(configs["lb1"].etcd.is_some() && configs["lb1"].patroni.is_none());
        assert!(configs["broadcast1"].etcd.is_none());
        assert!(pg_dirs(&configs["lb1"]).is_err());
        let url = app_database_url(&configs.values().cloned().collect::<Vec<_>>(), "db2");
        // No secrets were created in this state dir: a clear error, not a URL without password.
        assert!(url.is_err());
    }

    #[test]
    fn sh_quote_survives_quotes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn urls_encode_what_needs_it() {
        assert_eq!(percent_encode("abc-1_2.3~"), "abc-1_2.3~");
        assert_eq!(percent_encode("p@ss:w/rd"), "p%40ss%3Aw%2Frd");
    }

    #[test]
    fn ancestors_get_the_search_bit() {
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        let inner = closed.join("inner/host");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let changed = open_ancestors(&inner).unwrap();
        assert!(changed.contains(&closed), "{changed:?}");
        let mode = std::fs::metadata(&closed).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o701);
        // Idempotent: nothing left to open.
        assert!(!open_ancestors(&inner).unwrap().contains(&closed));
    }
}
