# A db host: PostgreSQL 15 under nixpkgs' services.patroni, its leader lease in etcd (etcd.nix).
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
      };
    };

    systemd.services.patroni = {
      # Patroni retries its DCS itself; the unit must never give up while etcd peers boot.
      startLimitIntervalSec = 0;
      serviceConfig = {
        RestartSec = 2;
        RuntimeDirectory = "patroni";
        RuntimeDirectoryMode = "0750";
      };
    };

    networking.firewall.allowedTCPPorts = lib.mkIf top.openFirewall [
      me.ports.postgres
      me.ports.patroni
    ];
  };
}
