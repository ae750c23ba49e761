# Evaluates the project's NixOS modules for every host through nixpkgs' real module system,
# offline, and prints what scripts/check-nix.sh checks (section 8) as JSON:
#
#   nix-instantiate --eval --strict --json nix/eval --arg harness ../shared/nix-eval \
#     [--arg secretsDir /some/dir]
#
# `harness` is a folder this repository does not carry (on the development machines,
# ../shared/nix-eval): nixpkgs 25.11's `lib` (lib.evalModules), the agenix module of flake.lock,
# transcriptions of nixpkgs' etcd and Patroni modules and of security.acme's options, typed
# stand-ins for core NixOS options (core.nix) and a stand-in pkgs. This file adds the stand-ins of
# ./stand-ins for the further nixpkgs options our modules use (firewall backends, sshd's firewall
# ports, the ACME units, Prometheus, Grafana), each copied from nixpkgs' source with its type.
#
# Evaluated, each with `lib.evalModules` over harness + stand-ins + our modules:
#   production      every host of cluster.nix as flake.nix's nixosConfigurations build it
#                   (nixos-modules, hosts/site.nix, hosts/<name>.nix, profile production);
#                   `secretsDir`, when given, stands for secrets/ as an operator fills it (every
#                   .age file present; names only, the contents are never read);
#   vm              every node of vm-tests/failover.nix as the test driver builds it (defaults,
#                   node, the driver's eth1 address and primaryIPAddress);
#   vmInteractive   lb1 and client with the interactive driver's additions (`nix run .#cluster-vm`);
#   nftables        lb1, db1 and ingest1 (production) with networking.nftables.enable.
# For each: failed assertions, warnings, every systemd unit with its user, ordering and
# configuration, the config files a unit reads that the stand-in pkgs cannot show (the
# generated config.json, Prometheus' scrape configs, Grafana's settings, Patroni's YAML),
# age.secrets and the identities agenix decrypts them with, the TLS files, users, firewall ports
# and rules, ACME certificates.
#
# What it cannot tell: whether any package builds or any unit starts (nothing is built or run);
# anything about nixpkgs options that neither the harness nor ./stand-ins declares (an option
# they lack fails here as "does not exist" even if nixpkgs has it; an option nixpkgs lacks but a
# stand-in declares by mistake would pass, hence each stand-in names its source); the
# behaviour of nixpkgs modules beyond the transcribed parts (scripts, sandboxing, users' uids,
# the firewall's and sshd's own units); what the text of generated scripts and files reads
# (the stand-in pkgs drops it).
{
  harness,
  root ? ../..,
  secretsDir ? null,
}:
let
  lib = import (harness + "/nixpkgs-lib/lib");
  sharedPkgs = import (harness + "/pkgs.nix") { inherit lib; };
  pkgs = sharedPkgs // import ./stand-ins/pkgs.nix {
    inherit lib;
    pkgs = sharedPkgs;
  };
  # A string, as flake.nix passes the agenix input: nixos-modules interpolates it into a path.
  agenix = toString (harness + "/agenix");

  # The flake as the modules see it: its packages (derivation-shaped stand-ins) and its module.
  flake = {
    packages.x86_64-linux = lib.genAttrs [ "lb" "broadcast" "ingest" "source" "streamctl" ] (
      name: pkgs.writeText name "" // { meta.mainProgram = name; }
    );
    nixosModules.default = import (root + "/nixos-modules") {
      self = flake;
      inherit agenix;
    };
  };

  baseModules = [
    (harness + "/core.nix")
    (harness + "/etcd.nix")
    (harness + "/patroni.nix")
    (harness + "/acme.nix")
    ./stand-ins/firewall.nix
    ./stand-ins/openssh.nix
    ./stand-ins/acme-units.nix
    ./stand-ins/prometheus.nix
    ./stand-ins/grafana.nix
    { _module.args.pkgs = pkgs; }
  ];
  evalHost = modules: lib.evalModules { modules = baseModules ++ modules; };

  cluster = import (root + "/cluster.nix");

  productionHost =
    extra: host:
    evalHost (
      [
        flake.nixosModules.default
        (root + "/hosts/site.nix")
        (root + "/hosts/${host.name}.nix")
        {
          networking.hostName = host.name;
          services.streaming-cluster = {
            enable = true;
            hostName = host.name;
            profile = "production";
          };
        }
      ]
      ++ lib.optional (secretsDir != null) { services.streaming-cluster.secrets.directory = secretsDir; }
      ++ extra
    );

  # The VM test as nixos/lib/testing builds its nodes: `defaults` and the node's own module, the
  # node's name as hostName, and eth1 on 192.168.1.<n> with n its rank in name order.
  test = import (root + "/vm-tests/failover.nix") { self = flake; } { inherit lib pkgs; };
  rank = lib.listToAttrs (lib.imap1 (i: name: lib.nameValuePair name i) (lib.attrNames test.nodes));
  vmNode =
    interactive: name: node:
    let
      address = "192.168.1.${toString rank.${name}}";
    in
    evalHost (
      [
        test.defaults
        node
        {
          networking.hostName = lib.mkDefault name;
          networking.interfaces.eth1.ipv4.addresses = [
            {
              inherit address;
              prefixLength = 24;
            }
          ];
          networking.primaryIPAddress = address;
        }
      ]
      ++ lib.optional (interactive && test.interactive.nodes ? ${name}) test.interactive.nodes.${name}
    );

  summary =
    e:
    let
      c = e.config;
      sc = c.services.streaming-cluster;
      roles = lib.filter (r: sc.${r}.enable or false) [
        "lb"
        "broadcast"
        "ingest"
        "source"
      ];
    in
    {
      failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
      inherit (c) warnings;
      services = lib.mapAttrs (_: s: {
        inherit (s)
          enable
          wantedBy
          requiredBy
          wants
          requires
          after
          before
          partOf
          serviceConfig
          environment
          script
          preStart
          ;
      }) c.systemd.services;
      timers = lib.attrNames c.systemd.timers;
      # What a unit reads besides its own definition, from files the stand-in pkgs cannot show.
      inputs =
        lib.optionalAttrs sc.enable (
          lib.genAttrs (map (r: "streaming-${r}") roles) (_: sc.hostConfig)
        )
        // lib.optionalAttrs c.services.prometheus.enable {
          prometheus = { inherit (c.services.prometheus) globalConfig scrapeConfigs; };
        }
        // lib.optionalAttrs c.services.grafana.enable {
          grafana = { inherit (c.services.grafana) settings provision; };
        }
        // lib.optionalAttrs c.services.patroni.enable { patroni = c.services.patroni.settings; };
      host = if sc.enable then sc.host else null;
      hostConfig = if sc.enable then sc.hostConfig else null;
      tlsSource = sc.tls.source;
      tlsFiles = {
        inherit (sc.tls) certFile keyFile caFile;
      };
      identityPaths = map toString c.age.identityPaths;
      secretsDir = c.age.secretsDir;
      secrets = lib.mapAttrs (_: v: {
        inherit (v) path owner group mode;
        file = toString v.file;
      }) c.age.secrets;
      users = lib.mapAttrs (_: u: { inherit (u) group extraGroups; }) c.users.users;
      groups = lib.attrNames c.users.groups;
      firewall = {
        inherit (c.networking.firewall)
          enable
          backend
          allowedTCPPorts
          extraCommands
          extraInputRules
          ;
      };
      acme = lib.mapAttrs (_: v: {
        inherit (v)
          domain
          group
          reloadServices
          environmentFile
          credentialFiles
          dnsProvider
          listenHTTP
          extraDomainNames
          ;
      }) c.security.acme.certs;
    };

  production = extra: hosts: lib.listToAttrs (map (h: lib.nameValuePair h.name (summary (productionHost extra h))) hosts);
in
{
  production = production [ ] cluster.hosts;
  vm = lib.mapAttrs (name: node: summary (vmNode false name node)) test.nodes;
  vmInteractive = lib.mapAttrs (name: node: summary (vmNode true name node)) (
    lib.filterAttrs (name: _: test.interactive.nodes ? ${name}) test.nodes
  );
  # The db hosts with pgBackRest on (docs/backup.md): an S3 repository, its keys an agenix file.
  backup = production [
    {
      services.streaming-cluster.db.backup = {
        enable = true;
        repository.path = "/streaming-cluster";
        repository.s3 = {
          bucket = "backups";
          endpoint = "s3.example.net";
          region = "eu-central-1";
          credentialsFile = "/run/agenix/pgbackrest-s3";
        };
      };
    }
  ] (lib.filter (h: h.role == "db") cluster.hosts);
  nftables = production [ { networking.nftables.enable = true; } ] (
    lib.filter (h: lib.elem h.name [ "lb1" "db1" "ingest1" ]) cluster.hosts
  );
}
