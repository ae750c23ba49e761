# The front door (crates/lb): hands each viewer a signed sticky token naming a broadcast and
# redirects there, and forwards publishers' RTMP (1935) and RTMPS (1936, the same certificate,
# which carries the site name) to a live ingest over RTMPS. Stateless apart from its signing key;
# lb1 also carries the etcd witness (etcd.nix, from cluster.nix's etcdWitness flag).
flake:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.streaming-cluster.lb;
  hosts = config.services.streaming-cluster.hostConfig.cluster.hosts;
  me = lib.findFirst (h: h.name == config.services.streaming-cluster.hostName) null hosts;
in
{
  options.services.streaming-cluster.lb = {
    enable = lib.mkEnableOption "the lb role (on by default on hosts whose cluster.nix role is lb)";
    package = lib.mkOption {
      type = lib.types.package;
      default = flake.packages.${pkgs.stdenv.hostPlatform.system}.lb;
      defaultText = lib.literalExpression "self.packages.\${system}.lb";
      description = "Package providing the `lb` binary.";
    };
  };

  config = lib.mkIf (config.services.streaming-cluster.enable && cfg.enable) (
    import ./service.nix { inherit config lib pkgs; } {
      role = "lb";
      inherit (cfg) package;
      bin = "lb";
      ports = [
        me.ports.https
        # The publish address of OBS: plain RTMP for publishers that cannot do TLS, RTMPS.
        me.ports.rtmp
        me.ports.rtmps
      ];
      limitNoFile = 65536;
    }
  );
}
