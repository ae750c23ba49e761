# A test pattern source (crates/source): one ffmpeg encode (bars, burned-in clock and host name,
# tone) published to every ingest. For tests and demos; a real publisher (OBS) needs no host.
flake:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.streaming-cluster.source;
  hosts = config.services.streaming-cluster.hostConfig.cluster.hosts;
  me = lib.findFirst (h: h.name == config.services.streaming-cluster.hostName) null hosts;
in
{
  options.services.streaming-cluster.source = {
    enable = lib.mkEnableOption "the source role (on by default on hosts whose cluster.nix role is source)";
    package = lib.mkOption {
      type = lib.types.package;
      default = flake.packages.${pkgs.stdenv.hostPlatform.system}.source;
      defaultText = lib.literalExpression "self.packages.\${system}.source";
      description = "Package providing the `source` binary.";
    };
    ffmpegPackage = lib.mkPackageOption pkgs "ffmpeg-headless" { };
  };

  config = lib.mkIf (config.services.streaming-cluster.enable && cfg.enable) (
    lib.mkMerge [
      (import ./service.nix { inherit config lib pkgs; } {
        role = "source";
        inherit (cfg) package;
        bin = "source";
        path = [ cfg.ffmpegPackage ];
        # /healthz and /metrics only; it publishes outwards, over RTMPS to every ingest (their
        # port 1936, certificates checked against the CA bundle in /run/streaming-cluster/tls).
        ports = [ me.ports.https ];
        memoryDenyWriteExecute = false;
      })
      { services.streaming-cluster.fonts.enable = true; }
    ]
  );
}
