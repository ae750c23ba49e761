# A db host: PostgreSQL 15 under nixpkgs' services.patroni, its leader lease in etcd (etcd.nix).
# Everything is TLS with the cluster CA (the generator's settings): PostgreSQL takes TCP only
# over TLS (hostssl), replication and Patroni's own connections check the server's name,
# Patroni talks to etcd with the host's client certificate, and its REST API wants a client
# certificate plus credentials for anything that changes state. Patroni reads private copies of
# the host's certificate and key in /run/patroni/tls (PostgreSQL refuses a key others can read).
# Patroni's settings are the generator's `patroni` section for this host, minus what the nixpkgs
# module sets itself (scope, name, REST and PostgreSQL addresses, data directory, pgpass) and
# plus what the local runner adds too (post_bootstrap) and the socket
# directory. Passwords come from
# agenix files through Patroni's environment, never through the store.
flake:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  top = config.services.streaming-cluster;
  cfg = top.db;
  hostConfig = top.hostConfig;
  patroni = hostConfig.patroni;
  hosts = hostConfig.cluster.hosts;
  me = lib.findFirst (h: h.name == top.hostName) null hosts;
  otherDbs = lib.filter (h: h.role == "db" && h.name != me.name) hosts;
  database = hostConfig.cluster.database;
  paths = hostConfig.paths;
  patroniUser = config.services.patroni.user;
  patroniGroup = config.services.patroni.group;
  tlsCopies = pkgs.writeShellScript "streaming-cluster-patroni-tls" ''
    set -euo pipefail
    install -d -m 0700 -o ${patroniUser} -g ${patroniGroup} /run/patroni/tls
    install -m 0600 -o ${patroniUser} -g ${patroniGroup} ${paths.tls_cert} ${patroni.restapi.certfile}
    install -m 0600 -o ${patroniUser} -g ${patroniGroup} ${paths.tls_key} ${patroni.restapi.keyfile}
    install -m 0644 -o ${patroniUser} -g ${patroniGroup} ${paths.ca_cert} ${patroni.restapi.cafile}
  '';
  # Who may reach this host's PostgreSQL (broadcasts, the other db hosts' replication) and
  # Patroni (the other db hosts, broadcasts asking GET /primary, and the monitoring hosts'
  # Prometheus reading its /metrics: nixos-modules/monitoring.nix).
  clients = map (h: h.address) (lib.filter (h: h.role == "db" || h.role == "broadcast") hosts);
  monitors = map (h: h.name) (lib.filter (h: h.monitoring or false) top.cluster.hosts);
  patroniReaders = clients ++ map (h: h.address) (lib.filter (h: lib.elem h.name monitors) hosts);
  firewall = import ./internal-ports.nix lib config.networking.firewall.backend [
    {
      port = me.ports.postgres;
      from = lib.remove me.address clients;
    }
    {
      port = me.ports.patroni;
      from = lib.remove me.address (lib.unique patroniReaders);
    }
  ];

  # With ACME, tlsCopies needs the host's certificate: start once the placeholder is in place
  # (acme-deps.nix). A renewed certificate is copied at the next start.
  acmeDeps = lib.optionalAttrs (top.tls.source == "acme") (import ./acme-deps.nix me.fqdn);

  # Run once by Patroni on the node that initialises the cluster, with a superuser connection
  # URL as $1 (PGPASSFILE set by Patroni): the services' login role and their database. The
  # password is read by psql itself (\set with backquotes), so it never shows in argv.
  postBootstrap = pkgs.writeShellScript "streaming-cluster-post-bootstrap" ''
    set -euo pipefail
    ${cfg.postgresqlPackage}/bin/psql "$1" --no-psqlrc -v ON_ERROR_STOP=1 \
      -v role=${lib.escapeShellArg database.user} -v db=${lib.escapeShellArg database.name} <<'SQL'
    \set pw `cat ${paths.db_password}`
    CREATE ROLE :"role" LOGIN PASSWORD :'pw';
    CREATE DATABASE :"db" OWNER :"role";
    SQL
  '';

  # pgBackRest (docs/backup.md). The generator's `pgbackrest` section (stanza, retention,
  # pg1-*), with the paths of this machine: PostgreSQL's data directory and socket as
  # services.patroni places them, pgBackRest's own directories under /var, and the repository
  # from `backup.repository`. pgBackRest runs as Patroni's user (it owns the data directory);
  # it connects as the `postgres` role over the socket through a peer map. S3 keys are never in
  # the store: the unit reads them from an agenix file as PGBACKREST_REPO1_S3_KEY(_SECRET).
  backup = cfg.backup;
  pgbr = hostConfig.pgbackrest;
  pgbrState = "/var/lib/pgbackrest-state";
  repoSettings =
    if backup.repository.s3 == null then
      { repo1-path = backup.repository.path; }
    else
      {
        repo1-type = "s3";
        repo1-path = backup.repository.path;
        repo1-s3-bucket = backup.repository.s3.bucket;
        repo1-s3-endpoint = backup.repository.s3.endpoint;
        repo1-s3-region = backup.repository.s3.region;
        repo1-s3-uri-style = backup.repository.s3.uriStyle;
      };
  pgbrConfig = {
    global = pgbr.global // repoSettings // {
      repo1-retention-full = backup.retentionFull;
      lock-path = "${pgbrState}/lock";
      log-path = "${pgbrState}/log";
      spool-path = "${pgbrState}/spool";
    };
    ${pgbr.stanza} = pgbr.stanza_options // {
      pg1-path = config.services.patroni.postgresqlDataDir;
      pg1-socket-path = "/run/patroni";
    };
  };
  pgbrConfigFile = (pkgs.formats.ini { }).generate "pgbackrest.conf" pgbrConfig;
  pgbrCommand = "${pkgs.pgbackrest}/bin/pgbackrest --config=${pgbr.config_file} --stanza=${pgbr.stanza}";
  # Only the primary backs up: the timer fires on every db host, the unit asks its own Patroni.
  isPrimary = pkgs.writeShellScript "streaming-cluster-is-primary" ''
    exec ${pkgs.curl}/bin/curl -fsS -o /dev/null --cacert ${paths.ca_cert} \
      https://${me.address}:${toString me.ports.patroni}/primary
  '';
  backupJob = kind: schedule: {
    service = {
      description = "pgBackRest ${kind} backup of ${pgbr.stanza} (the primary only)";
      after = [ "patroni.service" ];
      serviceConfig = {
        Type = "oneshot";
        User = patroniUser;
        Group = patroniGroup;
        ExecCondition = "${isPrimary}";
        ExecStartPre = "${pgbrCommand} stanza-create";
        ExecStart = "${pgbrCommand} --type=${kind} backup";
      } // lib.optionalAttrs (backup.repository.s3 != null) {
        EnvironmentFile = backup.repository.s3.credentialsFile;
      };
    };
    timer = {
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = schedule;
        Persistent = true;
        RandomizedDelaySec = "5m";
      };
    };
  };
  jobs = {
    full = backupJob "full" backup.schedule.full;
    incr = backupJob "incr" backup.schedule.incremental;
  };
  # Without backups nothing archives (archive_command would fail on a missing config).
  archiveParameters =
    if backup.enable then
      { }
    else
      {
        archive_mode = "off";
        archive_command = "";
      };

  settings = (builtins.removeAttrs patroni [
    "scope"
    "name"
    "restapi"
  ]) // {
    # The module sets the addresses; TLS and verify_client are the generator's.
    restapi = builtins.removeAttrs patroni.restapi [
      "listen"
      "connect_address"
    ];
    bootstrap = patroni.bootstrap // {
      post_bootstrap = "${postBootstrap}";
    };
    postgresql =
      (builtins.removeAttrs patroni.postgresql [
        "listen"
        "connect_address"
        "data_dir"
        "pgpass"
      ])
      // {
        parameters = patroni.postgresql.parameters // archiveParameters // {
          unix_socket_directories = "/run/patroni";
        };
      }
      // lib.optionalAttrs backup.enable {
        # pgBackRest runs as Patroni's OS user and connects as the postgres role.
        pg_hba = [ "local all postgres peer map=pgbackrest" ] ++ patroni.postgresql.pg_hba;
        pg_ident = [
          "pgbackrest ${patroniUser} postgres"
          "pgbackrest postgres postgres"
        ];
      };
  };
in
{
  options.services.streaming-cluster.db = {
    enable = lib.mkEnableOption "the db role (on by default on hosts whose cluster.nix role is db)";
    postgresqlPackage = lib.mkOption {
      type = lib.types.package;
      default = pkgs.postgresql_15;
      defaultText = lib.literalExpression "pkgs.postgresql_15";
      description = "PostgreSQL under Patroni (every db host must run the same major version).";
    };
    backup = {
      enable = lib.mkEnableOption ''
        continuous WAL archiving and scheduled base backups with pgBackRest (docs/backup.md).
        Every db host must use the same repository: S3, or a path every db host mounts'';
      repository = {
        path = lib.mkOption {
          type = lib.types.str;
          default = "/var/lib/pgbackrest";
          description = ''
            repo1-path: a directory (a mount shared by every db host) or, with `s3`, the
            prefix inside the bucket.'';
        };
        s3 = lib.mkOption {
          default = null;
          description = "An S3-compatible bucket instead of a directory.";
          type = lib.types.nullOr (
            lib.types.submodule {
              options = {
                bucket = lib.mkOption { type = lib.types.str; };
                endpoint = lib.mkOption {
                  type = lib.types.str;
                  example = "s3.eu-central-1.amazonaws.com";
                };
                region = lib.mkOption { type = lib.types.str; };
                uriStyle = lib.mkOption {
                  type = lib.types.enum [ "host" "path" ];
                  default = "host";
                };
                credentialsFile = lib.mkOption {
                  type = lib.types.str;
                  example = "/run/agenix/pgbackrest-s3";
                  description = ''
                    An agenix secret (never a store path), environment-file lines
                    PGBACKREST_REPO1_S3_KEY=... and PGBACKREST_REPO1_S3_KEY_SECRET=..., readable
                    by Patroni's user.'';
                };
              };
            }
          );
        };
      };
      schedule = {
        full = lib.mkOption {
          type = lib.types.str;
          default = "Sun 03:00";
          description = "systemd OnCalendar of the full backup.";
        };
        incremental = lib.mkOption {
          type = lib.types.str;
          default = "Mon..Sat 03:00";
          description = "systemd OnCalendar of the incremental backups.";
        };
      };
      retentionFull = lib.mkOption {
        type = lib.types.ints.positive;
        default = 2;
        description = ''
          Full backups kept (repo1-retention-full); older ones, their incrementals and the WAL
          only they need are expired after each backup.'';
      };
    };
  };

  config = lib.mkIf (top.enable && cfg.enable) {
    assertions = [
      {
        assertion = patroni != null;
        message = "${top.hostName}: the generator emitted no patroni section (is its role db?)";
      }
    ];

    # A rolling upgrade's switchover (`nix run .#deploy`, docs/deploy.md) is asked from the
    # candidate db host itself with curl: it holds the certificate and the REST password.
    environment.systemPackages = [ pkgs.curl ];

    services.patroni = {
      enable = true;
      inherit (patroni) scope name;
      nodeIp = me.address;
      otherNodesIps = map (h: h.address) otherDbs;
      restApiPort = me.ports.patroni;
      postgresqlPort = me.ports.postgres;
      inherit (cfg) postgresqlPackage;
      inherit settings;
      environmentFiles = {
        PATRONI_SUPERUSER_PASSWORD = paths.db_superuser_password;
        PATRONI_REPLICATION_PASSWORD = paths.db_replication_password;
        PATRONI_REWIND_PASSWORD = paths.db_superuser_password;
        # The REST API's credentials for requests that change state: the superuser's password
        # (its holders already control the database), user PATRONI_RESTAPI_USERNAME below.
        PATRONI_RESTAPI_PASSWORD = paths.db_superuser_password;
      };
    };

    systemd.services = lib.optionalAttrs backup.enable (
      lib.mapAttrs' (k: j: lib.nameValuePair "pgbackrest-${k}" j.service) jobs
    ) // {
    patroni = acmeDeps // {
      # archive_command runs pgbackrest (Patroni's PostgreSQL inherits this PATH); with S3 the
      # archiver needs the keys too.
      path = lib.optional backup.enable pkgs.pgbackrest;
      # Patroni retries its DCS itself; the unit must never give up while etcd peers boot.
      startLimitIntervalSec = 0;
      environment.PATRONI_RESTAPI_USERNAME = "patroni";
      serviceConfig = {
        RestartSec = 2;
        RuntimeDirectory = "patroni";
        RuntimeDirectoryMode = "0750";
        # As root ("+"): the host's key is not the patroni user's to read. A renewed
        # certificate is copied at the next start.
        ExecStartPre = [ "+${tlsCopies}" ];
      }
      // lib.optionalAttrs (backup.enable && backup.repository.s3 != null) {
        EnvironmentFile = backup.repository.s3.credentialsFile;
      };
    };
    };

    environment.etc = lib.mkIf backup.enable {
      "pgbackrest/pgbackrest.conf" = {
        source = pgbrConfigFile;
        mode = "0640";
        user = patroniUser;
        group = patroniGroup;
      };
    };
    systemd.tmpfiles.rules = lib.optionals backup.enable (
      map (d: "d ${d} 0700 ${patroniUser} ${patroniGroup} - -") (
        [
          pgbrState
          "${pgbrState}/lock"
          "${pgbrState}/log"
          "${pgbrState}/spool"
        ]
        ++ lib.optional (backup.repository.s3 == null) backup.repository.path
      )
    );
    systemd.timers = lib.mkIf backup.enable (
      lib.mapAttrs' (k: j: lib.nameValuePair "pgbackrest-${k}" j.timer) jobs
    );

    # Open to the cluster hosts that use them, never to everyone.
    networking.firewall = lib.mkIf top.openFirewall firewall;
  };
}
