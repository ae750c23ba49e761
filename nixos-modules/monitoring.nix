# Prometheus and Grafana on the host(s) that cluster.nix flags with `monitoring = true`: nixpkgs'
# services.prometheus with the scrape jobs and alert rules of nix/monitoring.nix, and
# services.grafana with that Prometheus as its data source and the cluster's dashboards.
# Both listen on loopback only: operators reach them through ssh (docs/monitoring.md).
#
# Secrets (nix/secrets.nix, decrypted by common.nix): Prometheus reads its own copy of the
# metrics token, Grafana its admin password and secret key, each owned by its service's user, so
# neither joins the streaming-cluster group (which on an LB also reads the viewer token key).
# Grafana reads them through its file provider: nothing secret enters the Nix store.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  top = config.services.streaming-cluster;
  cfg = top.monitoring;
  entry = lib.findFirst (h: h.name == top.hostName) null top.cluster.hosts;
  flagged = entry != null && (entry.monitoring or false);
  # Where agenix decrypts them (common.nix declares them, and warns while one is missing).
  secretPath = name: "${config.age.secretsDir}/${name}";

  generated = import ../nix/monitoring.nix {
    inherit (top) cluster profile;
    metricsTokenFile = secretPath "prometheus-metrics-token";
  };
  ruleFile = pkgs.writeText "streaming-cluster-alerts.rules.json" (builtins.toJSON generated.rules);
  dashboards = pkgs.linkFarm "streaming-cluster-dashboards" (
    lib.mapAttrsToList (name: dashboard: {
      name = "${name}.json";
      path = pkgs.writeText "${name}.json" (builtins.toJSON dashboard);
    }) generated.dashboards
  );
in
{
  options.services.streaming-cluster.monitoring = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = top.enable && flagged;
      defaultText = lib.literalExpression "this host's cluster.nix entry has `monitoring = true`";
      description = ''
        Run Prometheus (scraping every host of cluster.nix, with the cluster's alert rules) and
        Grafana (the cluster's dashboards) on this host. Set `monitoring = true` on the host in
        cluster.nix rather than here: the flag also encrypts the monitoring secrets to it
        (secrets/secrets.nix) and opens Patroni's port on the db hosts to it.
      '';
    };

    prometheusPort = lib.mkOption {
      type = lib.types.port;
      default = 9090;
      description = "Port of Prometheus's web UI and API, on 127.0.0.1.";
    };

    retention = lib.mkOption {
      type = lib.types.str;
      default = "30d";
      example = "90d";
      description = "How long Prometheus keeps samples (a dozen hosts every 5 s: a few GB a month).";
    };

    grafana = {
      address = lib.mkOption {
        type = lib.types.str;
        default = "127.0.0.1";
        description = ''
          Address Grafana listens on. Loopback by default: operators tunnel to it
          (`ssh -L 3000:127.0.0.1:3000 root@<host>`), so its login form never faces the
          internet. Another address also needs its port opened in the firewall by hand.
        '';
      };
      port = lib.mkOption {
        type = lib.types.port;
        default = 3000;
        description = "Port Grafana listens on.";
      };
    };
  };

  config = lib.mkIf (top.enable && cfg.enable) {
    assertions = [
      {
        assertion = flagged;
        message = "services.streaming-cluster.monitoring.enable on ${top.hostName}: set `monitoring = true;` on its entry in cluster.nix instead, so its secrets are encrypted to it and the db hosts let it read Patroni";
      }
    ];

    # The database layer checks certificates against the cluster's own CA, which an ACME host
    # does not hold as its CA file (see the same warning in common.nix).
    warnings = lib.optional (
      top.tls.source == "acme" && lib.any (job: job.job_name == "db") generated.prometheus.scrape_configs
    ) "${top.hostName}: Prometheus checks Patroni's certificates (cluster CA) against /run/streaming-cluster/tls/ca.pem, the public CA bundle with tls.source = acme: the db targets will show as down";

    services.prometheus = {
      enable = true;
      listenAddress = "127.0.0.1";
      port = cfg.prometheusPort;
      retentionTime = cfg.retention;
      globalConfig = generated.prometheus.global;
      scrapeConfigs = generated.prometheus.scrape_configs;
      ruleFiles = [ ruleFile ];
      # The metrics token and the CA are files on the host, which promtool in the build sandbox
      # cannot see; the rule files are still checked in full.
      checkConfig = "syntax-only";
    };

    services.grafana = {
      enable = true;
      settings = {
        server = {
          http_addr = cfg.grafana.address;
          http_port = cfg.grafana.port;
        };
        security = {
          admin_user = "admin";
          admin_password = "$__file{${secretPath "grafana-admin-password"}}";
          secret_key = "$__file{${secretPath "grafana-secret-key"}}";
          # No avatar requests to gravatar.com from an operator's browser.
          disable_gravatar = true;
        };
      };
      provision = {
        enable = true;
        datasources.settings = {
          apiVersion = 1;
          datasources = [
            {
              name = "Prometheus";
              type = "prometheus";
              uid = "prometheus";
              url = "http://127.0.0.1:${toString cfg.prometheusPort}";
              isDefault = true;
              jsonData.timeInterval = generated.prometheus.global.scrape_interval;
            }
          ];
        };
        dashboards.settings = {
          apiVersion = 1;
          providers = [
            {
              name = "streaming-cluster";
              options.path = dashboards;
              # The dashboards are code: edits in the UI would be lost at the next deployment.
              allowUiUpdates = false;
              disableDeletion = true;
            }
          ];
        };
      };
    };
  };
}
