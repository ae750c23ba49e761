# The twelve hosts of cluster.nix as NixOS VMs (vm profile: the generator's 192.168.1.x
# addresses, HTTPS on 8443), plus a client VM that watches and chats through an LB while the test
# crashes or cuts off, in turn, an LB, the viewers' broadcast, an ingest, source1 and the database
# primary, then brings each back and checks that it rejoins. Run by `nix flake check`
# (checks.x86_64-linux.vm-failover); `nix run .#cluster-vm` is its interactive driver.
#
# Every host's test material comes from its entry in cluster.nix when the test is BUILT
# (./test-material.nix, TEST ONLY, never for a real host): a test CA and one certificate per host
# (SANs: name, fqdn, vm address), a test ssh host key per node, and the secrets encrypted to the
# test keys of exactly the nodes that read them. Secrets take the production agenix path: each
# node decrypts them to /run/agenix with its own test key. Adding a host to cluster.nix is all
# this test needs.
{ self }:
{ lib, pkgs, ... }:
let
  cluster = import ../cluster.nix;
  generated = import ../nix/generate.nix {
    inherit cluster;
    profile = "vm";
  };
  # The client reads two secrets itself (test-material.nix's extraReaders): the metrics token
  # and the first channel's stream key.
  channel = (builtins.head anyConfig.cluster.channels).name;
  material = import ./test-material.nix { inherit pkgs cluster; };
  testSecrets = "${material.secrets}";
  ca = "${material.ca}/ca.crt";
  # TEST ONLY identity of a node: its test ssh host key, as agenix uses the host key in production.
  testIdentity = name: [ "${material.hostKeys.${name}}/ssh_host_ed25519_key" ];
  entryOf = name: lib.findFirst (h: h.name == name) null generated.${name}.cluster.hosts;

  # Guest RAM (MiB) and vCPUs per role, plus Prometheus and Grafana on the monitoring host:
  # about 9.3 GiB for the thirteen VMs.
  monitoringMemory = 512;
  memory = {
    lb = 512;
    broadcast = 512;
    db = 768;
    ingest = 1024;
    source = 768;
  };
  cores = {
    lb = 1;
    broadcast = 1;
    db = 1;
    ingest = 2;
    source = 1;
  };

  # The test framework numbers the VMs 192.168.1.1.. in name order; the cluster uses the
  # generator's addresses instead, so configs, certificates and /etc/hosts agree.
  addressed = address: {
    networking.interfaces.eth1.ipv4.addresses = lib.mkOverride 0 [
      {
        inherit address;
        prefixLength = 24;
      }
    ];
    networking.primaryIPAddress = lib.mkForce address;
  };

  hostNode =
    host:
    let
      me = entryOf host.name;
    in
    {
      imports = [ (addressed me.address) ];
      virtualisation.memorySize =
        memory.${host.role} + (if host.monitoring or false then monitoringMemory else 0);
      virtualisation.cores = cores.${host.role};
      services.streaming-cluster = {
        enable = true;
        hostName = host.name;
        profile = "vm";
        tls = {
          source = "files";
          certFile = "${material.tls.${host.name}}/cert.pem";
          keyFile = "${material.tls.${host.name}}/key.pem"; # TEST ONLY key, in the store
          caFile = ca;
        };
        secrets = {
          directory = testSecrets;
          files = material.secretFiles;
        };
      };
      age.identityPaths = testIdentity host.name;
      environment.systemPackages = [ pkgs.curl ];
    };

  # `streamctl watch --pin NAME` reads NAME's config from <state>/config: the client gets the
  # vm configs (no secrets in them) and the test CA as a read-only state directory.
  clientState = pkgs.linkFarm "streaming-cluster-client-state" (
    lib.mapAttrsToList (name: config: {
      name = "config/${name}.json";
      path = pkgs.writeText "${name}.json" (builtins.toJSON config);
    }) generated
    ++ [
      {
        name = "tls/ca.crt";
        path = ca;
      }
    ]
  );

  anyConfig = generated.${(builtins.head cluster.hosts).name};
  lbs = lib.filter (h: h.role == "lb") anyConfig.cluster.hosts;
  streamctl = self.packages.${pkgs.stdenv.hostPlatform.system}.streamctl;
in
{
  name = "streaming-cluster-failover";

  defaults.imports = [ self.nixosModules.default ];

  nodes =
    lib.listToAttrs (
      map (host: {
        inherit (host) name;
        value = hostNode host;
      }) cluster.hosts
    )
    // {
      client = {
        virtualisation.memorySize = 768;
        virtualisation.cores = 2;
        # The client is no cluster host: it reads /status with the metrics token, as Prometheus
        # would. TEST ONLY identity, as on the hosts.
        age.secrets.metrics-token.file = "${testSecrets}/metrics-token.age";
        # The OBS-like publisher of the "publisher's ingest crashes" subtest.
        age.secrets."stream-key-${channel}".file = "${testSecrets}/stream-key-${channel}.age";
        age.identityPaths = testIdentity "client";
        environment.systemPackages = [
          streamctl
          pkgs.curl
          pkgs.jq
          pkgs.ffmpeg-headless
        ];
        # The cluster's names (the hosts resolve them through the common module).
        # The site name has every LB's address, as its DNS would: publishers use it.
        networking.hosts = lib.foldl' (
          acc: h:
          acc
          // {
            ${h.address} =
              (acc.${h.address} or [ ])
              ++ [ h.fqdn ]
              ++ lib.optional (h.role == "lb") anyConfig.cluster.site;
          }
        ) { } anyConfig.cluster.hosts;
      };
    };

  # `nix run .#cluster-vm`: lb1's HTTPS on https://localhost:8443 of the host (its certificate
  # has localhost among its test SANs), and a SOCKS5 proxy on localhost:1080 into the test
  # network, through which a browser reaches the broadcasts the LB redirects to.
  interactive.nodes.lb1 =
    { pkgs, ... }:
    {
      virtualisation.forwardPorts = [
        {
          from = "host";
          host.port = 8443;
          guest.port = 8444;
        }
      ];
      # The LB binds its cluster address only, and QEMU's user network (eth0) delivers the
      # forwarded port elsewhere: relay it.
      networking.firewall.allowedTCPPorts = [ 8444 ];
      systemd.services.lb-forward = {
        wantedBy = [ "multi-user.target" ];
        after = [ "network-online.target" ];
        wants = [ "network-online.target" ];
        serviceConfig = {
          ExecStart = "${pkgs.socat}/bin/socat TCP-LISTEN:8444,fork,reuseaddr TCP:${(entryOf "lb1").address}:8443";
          Restart = "always";
          RestartSec = 1;
          DynamicUser = true;
        };
      };
    };
  interactive.nodes.client =
    { pkgs, ... }:
    {
      virtualisation.forwardPorts = [
        {
          from = "host";
          host.port = 1080;
          guest.port = 1080;
        }
      ];
      networking.firewall.allowedTCPPorts = [ 1080 ];
      systemd.services.socks = {
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          ExecStart = "${pkgs.microsocks}/bin/microsocks -i 0.0.0.0 -p 1080";
          Restart = "always";
          DynamicUser = true;
        };
      };
    };

  # Constants for the script, then the script itself (kept in a .py file so that it can be
  # linted without Nix: scripts/check-nix.sh).
  testScript = ''
    STREAMCTL = "${streamctl}/bin/streamctl"
    CA = "${ca}"
    STATE = "${clientState}"
    CHANNEL = "${channel}"
    CHANNELS = ${builtins.toJSON (map (c: c.name) anyConfig.cluster.channels)}
    SITE = "${anyConfig.cluster.site}"
    LB_URLS = ${builtins.toJSON (map (h: h.url) lbs)}
    MONITORING = ${builtins.toJSON (map (h: h.name) (lib.filter (h: h.monitoring or false) cluster.hosts))}
    HOSTS = ${
      builtins.toJSON (
        map (h: {
          inherit (h) name role url;
        }) anyConfig.cluster.hosts
      )
    }
  ''
  + builtins.readFile ./failover.py;
}
