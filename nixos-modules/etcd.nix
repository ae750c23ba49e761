# The etcd member the generator assigns to this host: every db host plus the witness flagged in
# cluster.nix (etcdWitness, lb1), so two db hosts keep a quorum of three. Patroni keeps its
# leader lease here. nixpkgs' services.etcd, driven by the host config's `etcd` section.
{
  config,
  lib,
  ...
}:
let
  top = config.services.streaming-cluster;
  cfg = top.etcd;
  member = top.hostConfig.etcd or null;
  port = url: lib.toInt (lib.last (lib.splitString ":" url));
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
      # Loopback too, for etcdctl on the host.
      listenClientUrls = [
        member.client_url
        "http://127.0.0.1:${toString (port member.client_url)}"
      ];
      advertiseClientUrls = [ member.client_url ];
      listenPeerUrls = [ member.peer_url ];
      initialAdvertisePeerUrls = [ member.peer_url ];
      initialCluster = lib.splitString "," member.initial_cluster;
      initialClusterState = "new";
      initialClusterToken = member.cluster_token;
      # The data directory stays the module's /var/lib/etcd: the generator's data_dir is the
      # local runner's layout.
    };
    # A member that died comes back at once (the module waits 30 s); it rejoins with its data.
    systemd.services.etcd = {
      serviceConfig = {
        Restart = lib.mkDefault "always";
        RestartSec = lib.mkForce 2;
      };
      startLimitIntervalSec = 0;
    };
    networking.firewall.allowedTCPPorts = lib.mkIf top.openFirewall [
      (port member.client_url)
      (port member.peer_url)
    ];
  };
}
