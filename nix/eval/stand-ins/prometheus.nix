# The part of nixpkgs' services.prometheus that nixos-modules/monitoring.nix uses, with the types
# and defaults of nixpkgs nixos/modules/services/monitoring/prometheus/default.nix (the 2025
# version in the search tool's index: nixfmt style, Prometheus 3 era, `fallback_scrape_protocol`
# present, `alertmanagerTimeout` removed; the options below have the same types in the index's
# other, somewhat older version, with the same Prometheus 3 settings).
# Declared: the top-level options monitoring.nix sets, and inside globalConfig and scrapeConfigs
# the settings the generator (nix/monitoring.nix) emits plus a few neighbours. The scrape
# config submodule has no freeform type in nixpkgs either: a setting not declared here fails
# as "does not exist", so add its declaration from nixpkgs when the generator emits a new one.
# Config kept: the prometheus user and group, the unit's user, ordering and wantedBy, and the
# module's one assertion (no port in listenAddress). Not modelled: promtool checks, the
# YAML file, the reload machinery.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.prometheus;
  inherit (lib) types mkOption;

  # nixpkgs' helpers: an optional setting, null meaning "Prometheus' default".
  mkOpt =
    type: description:
    mkOption {
      default = null;
      inherit description;
      type = types.nullOr type;
    };
  mkDefOpt = type: defaultStr: description: mkOpt type "${description} (default ${defaultStr})";

  promTypes.globalConfig = types.submodule {
    options = {
      evaluation_interval = mkDefOpt types.str "1m" "How frequently to evaluate rules by default.";
      external_labels = mkOpt (types.attrsOf types.str) "Labels added to time series and alerts.";
      query_log_file = mkOpt types.str "Query log file.";
      scrape_interval = mkDefOpt types.str "1m" "How frequently to scrape targets by default.";
      scrape_timeout = mkDefOpt types.str "10s" "How long until a scrape request times out.";
    };
  };

  promTypes.tls_config = types.submodule {
    options = {
      ca_file = mkOpt types.str "CA certificate to validate API server certificate with.";
      cert_file = mkOpt types.str "Certificate file for client cert authentication to the server.";
      insecure_skip_verify = mkOpt types.bool "Disable validation of the server certificate.";
      key_file = mkOpt types.str "Key file for client cert authentication to the server.";
      server_name = mkOpt types.str "ServerName extension to indicate the name of the server.";
    };
  };

  promTypes.static_config = types.submodule {
    options = {
      labels = mkOption {
        default = { };
        type = types.attrsOf types.str;
      };
      targets = mkOption { type = types.listOf types.str; };
    };
  };

  promTypes.scrape_config = types.submodule {
    options = {
      authorization = mkOption {
        default = null;
        type = types.nullOr types.attrs;
      };
      bearer_token_file = mkOpt types.str "Bearer token read from this file.";
      honor_labels = mkDefOpt types.bool "false" "Keep the scraped data's labels on conflicts.";
      job_name = mkOption { type = types.str; };
      metrics_path = mkDefOpt types.str "/metrics" "The HTTP resource path of the metrics.";
      params = mkOpt (types.attrsOf (types.listOf types.str)) "Optional HTTP URL parameters.";
      scheme = mkDefOpt (types.enum [
        "http"
        "https"
      ]) "http" "The URL scheme with which to fetch metrics from targets.";
      scrape_interval = mkOpt types.str "How frequently to scrape targets from this job.";
      scrape_timeout = mkOpt types.str "Per-target timeout when scraping this job.";
      static_configs = mkOpt (types.listOf promTypes.static_config) "Labeled target groups.";
      tls_config = mkOpt promTypes.tls_config "The scrape request's TLS settings.";
    };
  };
in
{
  options.services.prometheus = {
    enable = lib.mkEnableOption "Prometheus monitoring daemon";
    package = lib.mkPackageOption pkgs "prometheus" { };
    checkConfig = mkOption {
      default = true;
      type = with types; either bool (enum [ "syntax-only" ]);
    };
    globalConfig = mkOption {
      default = { };
      type = promTypes.globalConfig;
    };
    listenAddress = mkOption {
      default = "0.0.0.0";
      type = types.str;
    };
    port = mkOption {
      default = 9090;
      type = types.port;
    };
    retentionTime = mkOption {
      default = null;
      type = types.nullOr types.str;
    };
    ruleFiles = mkOption {
      default = [ ];
      type = types.listOf types.path;
    };
    scrapeConfigs = mkOption {
      default = [ ];
      type = types.listOf promTypes.scrape_config;
    };
    stateDir = mkOption {
      default = "prometheus2";
      type = types.str;
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      (
        let
          legacy = builtins.match "(.*\\..*|.*]):([[:digit:]]+)" cfg.listenAddress;
        in
        {
          assertion = legacy == null;
          message = "Do not specify the port for Prometheus to listen on in the listenAddress option; use the port option instead";
        }
      )
    ];
    systemd.services.prometheus = {
      after = [ "network.target" ];
      wantedBy = [ "multi-user.target" ];
      serviceConfig = {
        ExecStart = "${lib.getExe cfg.package} --web.listen-address=${cfg.listenAddress}:${toString cfg.port}";
        Restart = "always";
        StateDirectory = cfg.stateDir;
        User = "prometheus";
        WorkingDirectory = "/var/lib/${cfg.stateDir}";
      };
    };
    users.groups.prometheus = { };
    users.users.prometheus = {
      description = "Prometheus daemon user";
      group = "prometheus";
    };
  };
}
