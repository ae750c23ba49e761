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
  top = config.services.streaming-cluster;
  cfg = top.ingest;
  hosts = top.hostConfig.cluster.hosts;
  me = lib.findFirst (h: h.name == top.hostName) null hosts;
  # Who publishes to this ingest over RTMPS: the LBs (forwarding outside publishers), the
  # sources, and the other ingests (the relay). Nothing inside the cluster uses plain RTMP.
  publishers = map (h: h.address) (
    lib.filter (h: lib.elem h.role [ "lb" "source" "ingest" ] && h.name != me.name) hosts
  );
  firewall = import ./internal-ports.nix lib [
    {
      port = me.ports.rtmps;
      from = publishers;
    }
  ];
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
    directPublishing = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Also accept outside publishers on this ingest's own RTMP and RTMPS ports, from any
        address (with `openFirewall`). Off by default: publishers enter through the LBs' publish
        address, which survives the loss of any one ingest, so the firewall opens this ingest's
        RTMPS port only to the cluster's LBs, sources and other ingests (by their addresses in
        cluster.nix, for the iptables and the nftables backend alike) and its plain RTMP port to
        nobody. The LBs still apply every per-address limit to the real publishers.
      '';
    };
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
        ]
        # Plain RTMP only for outside publishers that cannot do TLS: sources and the relay
        # between ingests use RTMPS.
        ++ lib.optionals cfg.directPublishing [
          me.ports.rtmp
          me.ports.rtmps
        ];
        memoryDenyWriteExecute = false;
        limitNoFile = 65536;
      })
      { services.streaming-cluster.fonts.enable = true; }
      { networking.firewall = lib.mkIf (top.openFirewall && !cfg.directPublishing) firewall; }
    ]
  );
}
