# Turns cluster.nix into one JSON-ready config per host (the schema is HostConfig in
# crates/core/src/config.rs). Builtins only, so the local runner evaluates it with
# `nix-instantiate --eval --strict --json nix/generate.nix --argstr profile local --argstr stateDir DIR`
# and the NixOS modules import the very same function.
{
  cluster ? import ../cluster.nix,
  # local: loopback addresses 127.77.<role>.<n>, files under stateDir.
  # vm: the NixOS VM test's addresses and paths. production: cluster.nix addresses, port 443.
  profile ? "local",
  stateDir ? "/var/lib/streaming-cluster",
  # Local profile only: first two octets of the loopback addresses, so a test cluster can run
  # beside a developer's cluster (127.77 by contract; tests may pick another).
  addressPrefix ? "127.77",
  jsonLogs ? false,
  otlpEndpoint ? null,
}:
let
  inherit (builtins) filter length elemAt match head listToAttrs map toString genList;

  roleNumbers = { lb = 1; broadcast = 2; db = 3; ingest = 4; source = 5; };

  # broadcast3 -> 3: addresses and ingest preference follow the number in the name, so removing
  # a host never renumbers the others.
  hostNumber = name:
    let m = match "[a-z-]*([0-9]+)" name;
    in if m == null then throw "host name ${name} must end with a number" else builtins.fromJSON (head m);

  small = profile != "production";

  vmAddress = host: "192.168.1.${toString (roleNumbers.${host.role} * 20 + hostNumber host.name)}";

  address = host:
    if profile == "local" then "${addressPrefix}.${toString roleNumbers.${host.role}}.${toString (hostNumber host.name)}"
    else if profile == "vm" then vmAddress host
    else if profile == "production" then host.address
    else throw "unknown profile ${profile} (local, vm, production)";

  ports = {
    https = if profile == "production" then 443 else 8443;
    rtmp = 1935;
    rtmps = 1936;
    patroni = 8008;
    postgres = 5432;
    etcd_client = 2379;
    etcd_peer = 2380;
  };

  fqdn = host: "${host.name}.${cluster.site}";

  url = host:
    if profile == "local" then "https://${address host}:${toString ports.https}"
    else if profile == "production" then "https://${fqdn host}"
    else "https://${fqdn host}:${toString ports.https}";

  # camelCase (cluster.nix) to snake_case (the JSON schema), one level of nesting deep: the
  # Rust side refuses unknown fields, so a misspelt limit fails at start.
  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  snakeName = builtins.replaceStrings upper (map (c: "_" + builtins.replaceStrings upper [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ] c) upper);
  snakeAttrs = attrs: listToAttrs (map (k: {
    name = snakeName k;
    value = let v = attrs.${k}; in if builtins.isAttrs v then snakeAttrs v else v;
  }) (builtins.attrNames attrs));

  byRole = role: filter (h: h.role == role) cluster.hosts;
  ingests = byRole "ingest";
  dbHosts = byRole "db";
  # etcd runs on every db host plus the witness, so two db hosts still have a quorum of three.
  etcdHosts = dbHosts ++ filter (h: h.etcdWitness or false) cluster.hosts;
  runsEtcd = host: builtins.elem host.name (map (h: h.name) etcdHosts);

  database = {
    name = cluster.database.name or "streaming";
    user = cluster.database.user or "streaming";
    # Patroni 3.1 and later (nixpkgs ships 4.x; scripts/setup-debian.sh installs the same
    # version) raise a ttl under 20 s to 20 s without a word, and the services derive their
    # write retry window from this value: one under 20 would be a lie, so it is refused.
    ttl =
      let ttl = cluster.database.ttl or 20; in
      if ttl < 20 then throw "database.ttl = ${toString ttl}: Patroni's minimum is 20 s" else ttl;
    loopWait = cluster.database.loopWait or 1;
    retryTimeout = cluster.database.retryTimeout or 3;
  };

  # Broadcasts prefer ingests in turn, so the pull load is spread and one ingest's death moves
  # only half of them.
  preferredIngest = host:
    if host.role != "broadcast" || length ingests == 0 then null
    else (elemAt ingests (builtins.sub (hostNumber host.name) 1 - (builtins.div (builtins.sub (hostNumber host.name) 1) (length ingests)) * (length ingests))).name;

  hostEntry = host: {
    inherit (host) name role;
    fqdn = fqdn host;
    address = address host;
    inherit ports;
    url = url host;
    uplink_mbps = host.uplinkMbps or null;
    cores = host.cores or null;
    preferred_ingest = preferredIngest host;
    channels = host.channels or [ ];
    priority = host.priority or null;
    etcd_witness = host.etcdWitness or false;
    drain = host.drain or false;
  };

  channel = c: {
    inherit (c) name fps;
    preset = if small then c.smallPreset or c.preset else c.preset;
    audio_kbps = c.audioKbps;
    ladder = map (r: {
      inherit (r) name width height;
      video_kbps = r.videoKbps;
    }) (if small then c.smallLadder or c.ladder else c.ladder);
  };

  clusterView = {
    inherit (cluster) site;
    inherit profile;
    site_urls =
      if profile == "production" then [ "https://${cluster.site}" ]
      else map url (byRole "lb");
    timeline = {
      segment_seconds = cluster.timeline.segmentSeconds;
      playlist_segments = cluster.timeline.playlistSegments;
      cache_segments = cluster.timeline.cacheSegments;
      primary_return_seconds = cluster.timeline.primaryReturnSeconds or 6;
      part_ms = builtins.floor ((cluster.timeline.partSeconds or 0.4) * 1000 + 0.5);
      part_hold_back_parts = cluster.timeline.partHoldBackParts or 5;
    };
    hosts = map hostEntry cluster.hosts;
    channels = map channel cluster.channels;
    database = { inherit (database) name user ttl; };
    limits = snakeAttrs (cluster.limits or { });
  };

  # Local runs keep every file under the runner's state dir; deployed hosts use the NixOS
  # modules' paths (state directory, agenix secrets, ACME or test-CA certificates).
  paths = host:
    if profile == "local" then {
      state_dir = "${stateDir}/hosts/${host.name}";
      log_dir = "${stateDir}/logs";
      tls_cert = "${stateDir}/tls/${host.name}.crt";
      tls_key = "${stateDir}/tls/${host.name}.key";
      ca_cert = "${stateDir}/tls/ca.crt";
      token_key = "${stateDir}/secrets/token.key";
      cluster_key = "${stateDir}/secrets/cluster.key";
      stream_keys_dir = "${stateDir}/secrets/stream-keys";
      db_password = "${stateDir}/secrets/db-password";
      db_superuser_password = "${stateDir}/secrets/db-superuser-password";
      db_replication_password = "${stateDir}/secrets/db-replication-password";
      admin_password = "${stateDir}/secrets/admin-password";
      metrics_token = "${stateDir}/secrets/metrics-token";
    } else {
      state_dir = stateDir;
      log_dir = null;
      tls_cert = "/run/streaming-cluster/tls/cert.pem";
      tls_key = "/run/streaming-cluster/tls/key.pem";
      ca_cert = "/run/streaming-cluster/tls/ca.pem";
      token_key = "/run/agenix/token-key";
      cluster_key = "/run/agenix/cluster-key";
      stream_keys_dir = "/run/agenix/stream-keys";
      db_password = "/run/agenix/db-password";
      db_superuser_password = "/run/agenix/db-superuser-password";
      db_replication_password = "/run/agenix/db-replication-password";
      admin_password = "/run/agenix/admin-password";
      metrics_token = "/run/agenix/metrics-token";
    };

  # etcd member flags (the witness on lb1 included). Clients and peers alike speak TLS and must
  # show a certificate from the cluster CA: the host's own (paths.tls_cert), so a stranger who
  # reaches the port can neither read nor rewrite Patroni's leader key.
  etcdUrl = host: port: "https://${address host}:${toString port}";
  etcdConfig = host: {
    inherit (host) name;
    data_dir = "${(paths host).state_dir}/etcd";
    client_url = etcdUrl host ports.etcd_client;
    peer_url = etcdUrl host ports.etcd_peer;
    initial_cluster = builtins.concatStringsSep "," (map (h: "${h.name}=${etcdUrl h ports.etcd_peer}") etcdHosts);
    cluster_token = "${cluster.site}-etcd";
  };

  # Patroni and PostgreSQL run as their own OS user, which may not read the host's key where the
  # services find it: each db host gets private copies here (the runner, or the db module,
  # installs them before Patroni starts).
  dbTlsDir = host: if profile == "local" then "${(paths host).state_dir}/tls" else "/run/patroni/tls";
  dbTls = host: {
    cert = "${dbTlsDir host}/cert.pem";
    key = "${dbTlsDir host}/key.pem";
    ca = "${dbTlsDir host}/ca.pem";
  };
  # Every connection Patroni makes to a PostgreSQL (its own, a replica's stream, pg_rewind)
  # checks the server's certificate and name against the cluster CA.
  pgClientTls = host: { sslmode = "verify-full"; sslrootcert = (dbTls host).ca; };

  # Who may connect to PostgreSQL: locally every loopback connection arrives from 127.0.0.1.
  # Only over TLS (hostssl): a plaintext attempt matches no line and is refused.
  clientCidrs =
    if profile == "local" then [ "127.0.0.0/8" ]
    else map (h: "${address h}/32") cluster.hosts;
  hbaLines = [ "local all all peer" ]
    ++ map (cidr: "hostssl replication replicator ${cidr} scram-sha-256") clientCidrs
    ++ map (cidr: "hostssl all all ${cidr} scram-sha-256") clientCidrs;

  # pgBackRest (docs/backup.md): one repository for every db host, so whichever is primary
  # archives its WAL there and a backup taken on one restores on the other. Locally a directory
  # in the state dir both db hosts' postgres user share; on NixOS the db module's repository
  # (a shared path or S3, `services.streaming-cluster.db.backup`), whose settings it merges in.
  # The runner and the module render `global` and `stanza` as pgbackrest.conf's two sections.
  backupStanza = "${cluster.site}-db";
  pgbackrestConfig = host: {
    stanza = backupStanza;
    config_file =
      if profile == "local" then "${(paths host).state_dir}/pgbackrest.conf"
      else "/etc/pgbackrest/pgbackrest.conf";
    global = {
      repo1-path = if profile == "local" then "${stateDir}/backup/repo" else "/var/lib/pgbackrest";
      # Two full backups kept (each with its incrementals); WAL older than the oldest kept
      # full backup is expired with it.
      repo1-retention-full = cluster.database.backupRetentionFull or 2;
      lock-path = "${(paths host).state_dir}/pgbackrest/lock";
      log-path = "${(paths host).state_dir}/pgbackrest/log";
      spool-path = "${(paths host).state_dir}/pgbackrest/spool";
      log-level-console = "info";
      log-level-file = "detail";
      compress-type = "zst";
      # A backup starts at once (checkpoint now), not at the next spread checkpoint.
      start-fast = "y";
    };
    stanza_options = {
      pg1-path = "${(paths host).state_dir}/pgdata";
      pg1-port = ports.postgres;
      pg1-socket-path = "${(paths host).state_dir}/run";
      pg1-user = "postgres";
    };
  };
  # Locally the repository is created by the first `streamctl backup` (stanza-create): until
  # then a segment is let go instead of failing, which would keep every segment in pg_wal and
  # retry at each shutdown (slower failovers in every test cluster). WAL from before the first
  # base backup could not be replayed onto anything anyway. Deployed hosts always push: their
  # backup units create the stanza, and a failing archive there is a signal to act on.
  pushCommand = host:
    "pgbackrest --config=${(pgbackrestConfig host).config_file} --stanza=${backupStanza} archive-push %p";
  archiveCommand = host:
    if profile == "local" then
      "test ! -e ${(pgbackrestConfig host).global.repo1-path}/archive/${backupStanza}/archive.info || ${pushCommand host}"
    else pushCommand host;

  # Patroni's own settings for a db host (its YAML is a superset of JSON, so this is written as
  # is). Passwords are not here: Patroni reads PATRONI_SUPERUSER_PASSWORD and
  # PATRONI_REPLICATION_PASSWORD from its environment, filled from the secret files. The runner
  # adds what depends on the machine (bin_dir, post_bootstrap).
  patroniConfig = host: {
    scope = "${cluster.site}-db";
    inherit (host) name;
    # HTTPS only. Reads (GET /primary, /patroni) stay open to anyone who trusts the CA; a request
    # that changes state (failover, switchover, restart, config) needs a client certificate from
    # the cluster CA (verify_client optional) and the REST credentials (authentication, filled
    # from PATRONI_RESTAPI_USERNAME/PASSWORD). Patroni asks its peers with the same certificate.
    restapi = {
      listen = "${address host}:${toString ports.patroni}";
      connect_address = "${address host}:${toString ports.patroni}";
      certfile = (dbTls host).cert;
      keyfile = (dbTls host).key;
      cafile = (dbTls host).ca;
      verify_client = "optional";
    };
    # Only this host's own etcd member, never the others (use_proxies: no member discovery).
    # Patroni's etcd3 watch has no read timeout: on a member whose host is cut off (packets
    # dropped, nothing reset) a replica kept seeing the old leader key until TCP keepalive gave
    # up, and a cut primary's HA loop stalled long enough for a promotion elsewhere before it
    # stepped down (two primaries). Through its own member a cut host's Patroni loses the DCS
    # (its member has no quorum) and a primary demotes before its lease runs out, while the
    # other side's member sees the lease expire. The price: a db host whose own etcd member is
    # down has no DCS either (a primary then steps down, a failover).
    etcd3 = {
      hosts = [ "${address host}:${toString ports.etcd_client}" ];
      use_proxies = true;
      protocol = "https";
      cacert = (dbTls host).ca;
      cert = (dbTls host).cert;
      key = (dbTls host).key;
    };
    bootstrap = {
      dcs = {
        ttl = database.ttl;
        loop_wait = database.loopWait;
        retry_timeout = database.retryTimeout;
        maximum_lag_on_failover = 1048576;
        # An acknowledged commit is on both db hosts while both live; a lone survivor still
        # accepts writes (not strict), so one dead host never stops the chat.
        synchronous_mode = true;
        synchronous_mode_strict = false;
        postgresql = {
          use_pg_rewind = true;
          use_slots = true;
          parameters = {
            wal_level = "replica";
            hot_standby = "on";
            wal_log_hints = "on";
            max_connections = 200;
            max_wal_senders = 10;
            max_replication_slots = 10;
          };
        };
      };
      initdb = [ { encoding = "UTF8"; } "data-checksums" ];
      pg_hba = hbaLines;
    };
    postgresql = {
      listen = "${address host}:${toString ports.postgres}";
      connect_address = "${address host}:${toString ports.postgres}";
      data_dir = "${(paths host).state_dir}/pgdata";
      pgpass = "${(paths host).state_dir}/pgpass";
      authentication = {
        superuser = { username = "postgres"; } // pgClientTls host;
        replication = { username = "replicator"; } // pgClientTls host;
        rewind = { username = "postgres"; } // pgClientTls host;
      };
      parameters = {
        unix_socket_directories = "${(paths host).state_dir}/run";
        ssl = "on";
        ssl_cert_file = (dbTls host).cert;
        ssl_key_file = (dbTls host).key;
        ssl_ca_file = (dbTls host).ca;
        ssl_min_protocol_version = "TLSv1.2";
        # A primary cut off from its replica steps down with a fast shutdown, which waits for
        # the walsender to hand the replica its last WAL; on a silent network that lasted until
        # TCP gave up, well after the heal. Its replica silent for a ttl is gone.
        wal_sender_timeout = "${toString database.ttl}s";
        # Every db host archives while it is the primary (a replica's archiver is idle with
        # archive_mode on), all into the one pgBackRest repository: point-in-time recovery.
        archive_mode = "on";
        archive_command = archiveCommand host;
        # A quiet primary still closes a WAL segment within a minute, so a restore point is
        # at most that far behind the last commit.
        archive_timeout = "60s";
      };
      # pg_basebackup's default spread checkpoint keeps a new replica waiting for minutes.
      basebackup = [ { checkpoint = "fast"; } ];
      pg_hba = hbaLines;
    };
    tags = { nofailover = false; noloadbalance = false; clonefrom = false; nosync = false; };
  };

  hostConfig = host: {
    inherit (host) name;
    cluster = clusterView;
    paths = paths host;
    telemetry = { json_logs = jsonLogs; otlp_endpoint = otlpEndpoint; };
    etcd = if runsEtcd host then etcdConfig host else null;
    patroni = if host.role == "db" then patroniConfig host else null;
    pgbackrest = if host.role == "db" then pgbackrestConfig host else null;
  };
in
listToAttrs (map (host: { inherit (host) name; value = hostConfig host; }) cluster.hosts)
