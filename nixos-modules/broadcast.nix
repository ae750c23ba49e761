# A broadcast edge (crates/broadcast): pulls the ladder from the ingests, serves the page,
# playlists and segments straight to viewers, chat and accounts (PostgreSQL through the db
# hosts' Patroni). Viewers x bitrate is its load: give it file descriptors.
flake:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.streaming-cluster.broadcast;
  hosts = config.services.streaming-cluster.hostConfig.cluster.hosts;
  me = lib.findFirst (h: h.name == config.services.streaming-cluster.hostName) null hosts;
in
{
  options.services.streaming-cluster.broadcast = {
    enable = lib.mkEnableOption "the broadcast role (on by default on hosts whose cluster.nix role is broadcast)";
    package = lib.mkOption {
      type = lib.types.package;
      default = flake.packages.${pkgs.stdenv.hostPlatform.system}.broadcast;
      defaultText = lib.literalExpression "self.packages.\${system}.broadcast";
      description = "Package providing the `broadcast` binary.";
    };
    maxOpenFiles = lib.mkOption {
      type = lib.types.ints.positive;
      default = 262144;
      description = "LimitNOFILE of the service: about two sockets per connected viewer.";
    };
  };

  config = lib.mkIf (config.services.streaming-cluster.enable && cfg.enable) (
    import ./service.nix { inherit config lib pkgs; } {
      role = "broadcast";
      inherit (cfg) package;
      bin = "broadcast";
      ports = [ me.ports.https ];
      limitNoFile = cfg.maxOpenFiles;
    }
  );
}
