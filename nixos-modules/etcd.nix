# The etcd member the generator assigns to this host: every db host plus the witness flagged in
# cluster.nix (etcdWitness, lb1), so two db hosts keep a quorum of three. Patroni keeps its
# leader lease here. nixpkgs' services.etcd, driven by the host config's `etcd` section.
# Clients and peers speak TLS and must show a certificate from the cluster CA (the host's own,
# from /run/streaming-cluster/tls, copied for the etcd user), and the ports are open only to the
# hosts that use them: anyone else could rewrite Patroni's leader key.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  top = config.services.streaming-cluster;
  cfg = top.etcd;
  member = top.hostConfig.etcd or null;
  port = url: lib.toInt (lib.last (lib.splitString ":" url));
  hosts = top.hostConfig.cluster.hosts;
  me = lib.findFirst (h: h.name == top.hostName) null hosts;
  paths = top.hostConfig.paths;
  tls = "/run/etcd-tls";
  tlsCopies = pkgs.writeShellScript "streaming-cluster-etcd-tls" ''
    set -euo pipefail
    install -d -m 0700 -o etcd -g root ${tls}
    install -m 0600 -o etcd ${paths.tls_cert} ${tls}/cert.pem
    install -m 0600 -o etcd ${paths.tls_key} ${tls}/key.pem
    install -m 0644 -o etcd ${paths.ca_cert} ${tls}/ca.pem
  '';
  # With ACME (the witness on an LB), tlsCopies needs the host's certificate: start once the
  # placeholder is in place (acme-deps.nix). A renewed certificate is copied at the next start.
  acmeDeps = lib.optionalAttrs (top.tls.source == "acme") (import ./acme-deps.nix me.fqdn);
  # Members of the etcd cluster: peers, and (db hosts) Patroni's clients.
  members = map (h: h.address) (lib.filter (h: h.role == "db" || (h.etcd_witness or false)) hosts);
  dbs = map (h: h.address) (lib.filter (h: h.role == "db") hosts);
  firewall = import ./internal-ports.nix lib config.networking.firewall.backend [
    {
      port = port member.client_url;
      from = lib.remove me.address dbs;
    }
    {
      port = port member.peer_url;
      from = lib.remove me.address members;
    }
  ];
in
{
  options.services.streaming-cluster.etcd = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = top.enable && member != null;
      defaultText = lib.literalExpression "the host config has an etcd section (db hosts and the etcdWitness)";
      description = "Run this host's etcd member of the Patroni DCS.";
    };
  };

  config = lib.mkIf (top.enable && cfg.enable && member != null) {
    services.etcd = {
      enable = true;
      inherit (member) name;
      # No plain loopback listener: it would skip client certificates. etcdctl on the host uses
      # the host's address with the files in /run/etcd-tls.
      listenClientUrls = [ member.client_url ];
      advertiseClientUrls = [ member.client_url ];
      listenPeerUrls = [ member.peer_url ];
      initialAdvertisePeerUrls = [ member.peer_url ];
      initialCluster = lib.splitString "," member.initial_cluster;
      initialClusterState = "new";
      initialClusterToken = member.cluster_token;
      certFile = "${tls}/cert.pem";
      keyFile = "${tls}/key.pem";
      trustedCaFile = "${tls}/ca.pem";
      clientCertAuth = true;
      peerCertFile = "${tls}/cert.pem";
      peerKeyFile = "${tls}/key.pem";
      peerTrustedCaFile = "${tls}/ca.pem";
      peerClientCertAuth = true;
      # A member back from a partition asks before it campaigns, so the terms it ran up alone
      # do not depose the leader (an election longer than Patroni's retry_timeout demotes the
      # primary). etcd 3.5's default, explicit here.
      extraConf.PRE_VOTE = "true";
      # The data directory stays the module's /var/lib/etcd: the generator's data_dir is the
      # local runner's layout.
    };
    # A member that died comes back at once (the module waits 30 s); it rejoins with its data.
    systemd.services.etcd = acmeDeps // {
      serviceConfig = {
        Restart = lib.mkDefault "always";
        RestartSec = lib.mkForce 2;
        ExecStartPre = [ "+${tlsCopies}" ];
      };
      startLimitIntervalSec = 0;
    };
    networking.firewall = lib.mkIf top.openFirewall firewall;
  };
}
