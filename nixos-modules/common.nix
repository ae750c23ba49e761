# The cluster as a NixOS host sees it: which host this is in cluster.nix, its generated JSON
# config (nix/generate.nix, the very generator the local runner evaluates), TLS, secrets, time
# sync, and the service user. The role modules (lb, broadcast, ingest, db, source) only turn this
# into systemd units.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.streaming-cluster;

  generated = import ../nix/generate.nix {
    inherit (cfg) cluster profile jsonLogs;
    otlpEndpoint = cfg.otlpEndpoint;
  };
  hostConfig =
    generated.${cfg.hostName}
      or (throw "services.streaming-cluster.hostName: ${cfg.hostName} is not a host of cluster.nix");
  me = lib.findFirst (h: h.name == cfg.hostName) null hostConfig.cluster.hosts;
  entry = lib.findFirst (h: h.name == cfg.hostName) null cfg.cluster.hosts;
  configFile = pkgs.writeText "streaming-cluster-${cfg.hostName}.json" (builtins.toJSON hostConfig);

  # The ACME certificate of this host: its own name, plus the site name on the LBs (both LBs
  # answer for it, so it needs DNS-01; per-host names use HTTP-01 on port 80).
  certName = me.fqdn;
  isLb = entry.role == "lb";
  acme = cfg.tls.source == "acme";
  # The database layer (PostgreSQL, Patroni, etcd on db hosts and the witness) checks every
  # peer against the cluster CA by address: it needs certificates from that CA.
  internalCaOnly = entry.role == "db" || (entry.etcdWitness or false);

  # Secrets this host reads (nix/secrets.nix: the same mapping secrets/secrets.nix encrypts by).
  secrets = import ../nix/secrets.nix { inherit (cfg) cluster; };
  # The LBs' DNS-01 credentials: decrypted when tls.acme.credentialsFile is their agenix path
  # (its default); another path is the operator's own file.
  acmeDnsSecret =
    acme && isLb && cfg.tls.acme.credentialsFile == "${config.age.secretsDir}/acme-dns";
  wanted =
    secrets.forHost entry
    ++ lib.optionals cfg.monitoring.enable secrets.monitoring
    ++ lib.optionals acmeDnsSecret secrets.acme;
  # What `directory` holds: looked at when the host is evaluated, unless `files` lists it (a
  # directory built by a derivation, the VM test's, cannot be looked into before it is built).
  exists =
    s:
    if cfg.secrets.files != null then
      lib.elem s.file cfg.secrets.files
    else
      builtins.pathExists (cfg.secrets.directory + "/${s.file}");
  present = lib.filter exists wanted;
  missing = lib.filter (s: !exists s) wanted;
  # Patroni (user patroni) reads the db passwords; the cluster's services read theirs through
  # the streaming-cluster group; Prometheus's, Grafana's and lego's (acme-dns) name their own
  # user, group of the same name.
  secretOwner =
    s:
    if s ? owner then
      {
        inherit (s) owner;
        group = s.owner;
        mode = "0400";
      }
    else if entry.role == "db" then
      {
        owner = "patroni";
        group = "patroni";
        mode = "0400";
      }
    else
      {
        owner = "root";
        group = "streaming-cluster";
        mode = "0440";
      };
in
{
  options.services.streaming-cluster = {
    enable = lib.mkEnableOption "this host's part of the streaming cluster (role from cluster.nix)";

    hostName = lib.mkOption {
      type = lib.types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      example = "broadcast3";
      description = "This host's name in cluster.nix; selects its role and its generated config.";
    };

    cluster = lib.mkOption {
      type = lib.types.attrs;
      default = import ../cluster.nix;
      defaultText = lib.literalExpression "import ./cluster.nix";
      description = ''
        The host list (plain data, see cluster.nix). Every host of a cluster must use the same
        list: each one's config holds the whole cluster view.
      '';
    };

    profile = lib.mkOption {
      type = lib.types.enum [
        "production"
        "vm"
      ];
      default = "production";
      description = ''
        Generator profile: `production` uses the addresses of cluster.nix and HTTPS on 443;
        `vm` the VM test's addresses (192.168.1.x) and 8443.
      '';
    };

    jsonLogs = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Log JSON lines instead of text (journald keeps either).";
    };

    otlpEndpoint = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "http://collector.internal:4318";
      description = "OpenTelemetry OTLP/HTTP endpoint for traces; null disables export.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Open this host's service ports (only those of its role) in the firewall.";
    };

    tls = {
      source = lib.mkOption {
        type = lib.types.enum [
          "acme"
          "files"
        ];
        default = "acme";
        description = ''
          Where the host's certificate comes from. `acme`: Let's Encrypt through
          security.acme (HTTP-01 for the host's own name, DNS-01 on the LBs, which also serve
          the site name); peers are verified against the system CA bundle. `files`: the
          `certFile`/`keyFile`/`caFile` below (an internal CA, or the VM test's test-only CA).
        '';
      };
      certFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "`files`: PEM certificate chain of this host (may be in the Nix store).";
      };
      keyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "/run/agenix/tls-key";
        description = ''
          `files`: path of this host's PEM private key, readable by the streaming-cluster
          group. A path, never the key: use an agenix secret, not a store path (the VM test's
          keys are test-only and public).
        '';
      };
      caFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "`files`: PEM bundle of the CA that signs every cluster host.";
      };
      acme = {
        email = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          description = "`acme`: contact address for Let's Encrypt (sets security.acme.defaults.email).";
        };
        dnsProvider = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          example = "cloudflare";
          description = "`acme` on LBs: lego DNS provider for the DNS-01 challenge of the site name.";
        };
        credentialsFile = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = "${config.age.secretsDir}/acme-dns";
          defaultText = lib.literalExpression ''"''${config.age.secretsDir}/acme-dns"'';
          example = "/var/lib/secrets/lego-dns.env";
          description = ''
            `acme` on LBs: environment file with the DNS provider's credentials (lego's
            variables for `dnsProvider`), security.acme's `environmentFile`. By default the
            agenix secret `acme-dns` (secrets/acme-dns.age, owner acme), which the module then
            decrypts on the LBs; another path is a file you provide; null: none (a provider that
            needs no credentials).
          '';
        };
      };
    };

    secrets = {
      directory = lib.mkOption {
        type = lib.types.path;
        default = ../secrets;
        defaultText = lib.literalExpression "./secrets";
        description = ''
          Directory of the agenix files (`token-key.age`, `cluster-key.age`,
          `stream-key-<channel>.age`, `db-password.age`, `db-superuser-password.age`,
          `db-replication-password.age`, `admin-password.age`, `metrics-token.age`; on a
          monitoring host also `grafana-admin-password.age`, `grafana-secret-key.age`; on the
          LBs with ACME `acme-dns.age`); see secrets/README.md.
        '';
      };
      files = lib.mkOption {
        type = lib.types.nullOr (lib.types.listOf lib.types.str);
        default = null;
        example = [
          "token-key.age"
          "metrics-token.age"
        ];
        description = ''
          The `.age` files `directory` holds. null: those found there when the host is
          evaluated. A list is for a directory that a derivation builds (the VM test's, made
          from cluster.nix at build time), which evaluation cannot look into.
        '';
      };
    };

    # Read-only results, for the role modules and for host files.
    host = lib.mkOption {
      type = lib.types.attrs;
      readOnly = true;
      description = "This host's entry of cluster.nix (name, role, address, ...).";
    };
    hostConfig = lib.mkOption {
      type = lib.types.attrs;
      readOnly = true;
      description = "This host's generated config (the JSON every service binary reads).";
    };
    configFile = lib.mkOption {
      type = lib.types.path;
      readOnly = true;
      description = "The generated config in the store; installed as /etc/streaming-cluster/config.json.";
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        services.streaming-cluster = {
          host = entry;
          inherit hostConfig configFile;
          # The role module of this host's role, from cluster.nix.
          lb.enable = lib.mkDefault (entry.role == "lb");
          broadcast.enable = lib.mkDefault (entry.role == "broadcast");
          ingest.enable = lib.mkDefault (entry.role == "ingest");
          db.enable = lib.mkDefault (entry.role == "db");
          source.enable = lib.mkDefault (entry.role == "source");
        };

        assertions = [
          {
            assertion = entry != null;
            message = "services.streaming-cluster.hostName = ${cfg.hostName} is not in cluster.nix";
          }
          {
            assertion = acme -> cfg.profile == "production";
            message = "services.streaming-cluster.tls.source = acme needs the production profile (public names)";
          }
          {
            assertion = !acme || cfg.tls.acme.email != null || config.security.acme.defaults.email != null;
            message = "services.streaming-cluster.tls.acme.email (or security.acme.defaults.email) must be set";
          }
          {
            assertion = !acme || !isLb || cfg.tls.acme.dnsProvider != null;
            message = "LB ${cfg.hostName}: the site name ${cfg.cluster.site} needs DNS-01: set services.streaming-cluster.tls.acme.dnsProvider and credentialsFile";
          }
          {
            assertion =
              acme || (cfg.tls.certFile != null && cfg.tls.keyFile != null && cfg.tls.caFile != null);
            message = "services.streaming-cluster.tls.source = files needs certFile, keyFile and caFile";
          }
        ];

        # A warning, not an assertion: the example production hosts use ACME everywhere and must
        # still evaluate (`nix flake check`); an internal-CA option for the database layer next
        # to the public ACME certificate is still to come (docs/security.md, "Still open").
        warnings =
          lib.optional (acme && internalCaOnly) "${cfg.hostName}: the database layer (db hosts and the etcd witness) authenticates peers with certificates from the cluster's own CA, checked by address; with tls.source = acme its peers will refuse this host: use tls.source = files with the cluster CA here"
          ++ map (
          s:
          "streaming-cluster: ${toString cfg.secrets.directory}/${s.file} is missing; create it with `agenix -e ${s.file}` in secrets/ (secrets/README.md). Services needing /run/agenix/${s.name} will fail until then."
        ) missing;

        # The stable path every binary is started with; a change is a reload (SIGHUP), not a
        # restart (reloadTriggers in the role modules).
        environment.etc."streaming-cluster/config.json".source = configFile;

        users.users.streaming-cluster = {
          isSystemUser = true;
          group = "streaming-cluster";
          description = "streaming-cluster services";
        };
        users.groups.streaming-cluster = { };

        age.secrets = lib.listToAttrs (
          map (s: {
            inherit (s) name;
            value = {
              file = cfg.secrets.directory + "/${s.file}";
            }
            // secretOwner s;
          }) present
        );

        # The binaries read their certificate, key and CA at the generator's fixed paths; these
        # symlinks point them at ACME's files or at the configured ones. Re-created at boot and
        # on every switch.
        systemd.tmpfiles.rules = (
          let
            link = name: target: "L+ /run/streaming-cluster/tls/${name} - - - - ${target}";
          in
          [ "d /run/streaming-cluster/tls 0755 root root -" ]
          ++ (
            if acme then
              [
                (link "cert.pem" "/var/lib/acme/${certName}/fullchain.pem")
                (link "key.pem" "/var/lib/acme/${certName}/key.pem")
                (link "ca.pem" "/etc/ssl/certs/ca-certificates.crt")
              ]
            else
              [
                (link "cert.pem" cfg.tls.certFile)
                (link "key.pem" cfg.tls.keyFile)
                (link "ca.pem" cfg.tls.caFile)
              ]
          )
        );

        # The VM test has no DNS: every host's name resolves through /etc/hosts.
        networking.hosts = lib.mkIf (cfg.profile == "vm") (
          lib.foldl' (
            acc: h: acc // { ${h.address} = (acc.${h.address} or [ ]) ++ [ h.fqdn ]; }
          ) { } hostConfig.cluster.hosts
        );
      }

      (lib.mkIf (cfg.profile == "production") {
        # The shared timeline puts wall-clock slots into segment numbers: every host must keep
        # good time (docs/architecture.md).
        services.chrony.enable = lib.mkDefault true;
        time.timeZone = lib.mkDefault "UTC";
        # Deployments over ssh (deploy-rs, docs/deploy.md), and agenix decrypts with the ssh
        # host key.
        services.openssh = {
          enable = lib.mkDefault true;
          settings.PasswordAuthentication = lib.mkDefault false;
        };
      })

      (lib.mkIf acme {
        security.acme = {
          acceptTerms = true;
          defaults.email = lib.mkIf (cfg.tls.acme.email != null) cfg.tls.acme.email;
          certs.${certName} = {
            domain = certName;
            group = "streaming-cluster";
            # A new certificate (the first real one replacing the placeholder, then each
            # renewal): the role service re-reads it on SIGHUP, viewers stay (acme-deps.nix).
            # db hosts have no streaming unit: this named streaming-db.service there, a unit
            # that does not exist (found by scripts/check-nix.sh, section 8); etcd and Patroni
            # copy the certificate at their next start.
            reloadServices = lib.optional (entry.role != "db") "streaming-${entry.role}.service";
          }
          // (
            if isLb then
              {
                extraDomainNames = [ cfg.cluster.site ];
                dnsProvider = cfg.tls.acme.dnsProvider;
                environmentFile = cfg.tls.acme.credentialsFile;
              }
            else
              { listenHTTP = ":80"; }
          );
        };
        networking.firewall.allowedTCPPorts = lib.mkIf (cfg.openFirewall && !isLb) [ 80 ];
      })
    ]
  );
}
