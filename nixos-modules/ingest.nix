# An ingest (crates/ingest): RTMP/RTMPS in, the ffmpeg ladder on the shared slot timeline, and
# the HTTPS origin API the broadcasts pull from.
flake:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.streaming-cluster.ingest;
  hosts = config.services.streaming-cluster.hostConfig.cluster.hosts;
  me = lib.findFirst (h: h.name == config.services.streaming-cluster.hostName) null hosts;
in
{
  options.services.streaming-cluster.ingest = {
    enable = lib.mkEnableOption "the ingest role (on by default on hosts whose cluster.nix role is ingest)";
    package = lib.mkOption {
      type = lib.types.package;
      default = flake.packages.${pkgs.stdenv.hostPlatform.system}.ingest;
      defaultText = lib.literalExpression "self.packages.\${system}.ingest";
      description = "Package providing the `ingest` binary.";
    };
    ffmpegPackage = lib.mkPackageOption pkgs "ffmpeg-headless" { };
  };

  config = lib.mkIf (config.services.streaming-cluster.enable && cfg.enable) (
    lib.mkMerge [
      (import ./service.nix { inherit config lib pkgs; } {
        role = "ingest";
        inherit (cfg) package;
        bin = "ingest";
        path = [ cfg.ffmpegPackage ];
        ports = [
          me.ports.https
          # Plain RTMP only for outside publishers that cannot do TLS: sources and the relay
          # between ingests use RTMPS.
          me.ports.rtmp
          me.ports.rtmps
        ];
        memoryDenyWriteExecute = false;
        limitNoFile = 65536;
      })
      { services.streaming-cluster.fonts.enable = true; }
    ]
  );
}
