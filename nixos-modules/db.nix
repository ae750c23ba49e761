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
  firewall = import ./internal-ports.nix lib [
    {
      port = me.ports.postgres;
      from = lib.remove me.address clients;
    }
    {
      port = me.ports.patroni;
      from = lib.remove me.address (lib.unique patroniReaders);
    }
  ];

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
        parameters = patroni.postgresql.parameters // {
          unix_socket_directories = "/run/patroni";
        };
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
  };

  config = lib.mkIf (top.enable && cfg.enable) {
    assertions = [
      {
        assertion = patroni != null;
        message = "${top.hostName}: the generator emitted no patroni section (is its role db?)";
      }
    ];

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

    systemd.services.patroni = {
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
      };
    };

    # Open to the cluster hosts that use them, never to everyone.
    networking.firewall = lib.mkIf top.openFirewall firewall;
  };
}
