# An ingest (crates/ingest): RTMP/RTMPS in, the ffmpeg ladder on the shared slot timeline, and
# the HTTPS origin API the broadcasts pull from.
import ./role.nix {
  role = "ingest";
  options =
    { lib, pkgs }:
    {
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
  unit =
    {
      lib,
      cfg,
      me,
      ...
    }:
    {
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
    };
  config =
    {
      lib,
      top,
      cfg,
      me,
      firewallBackend,
      ...
    }:
    let
      inherit (top.hostConfig.cluster) hosts;
      # Who publishes to this ingest over RTMPS: the LBs (forwarding outside publishers), the
      # sources, and the other ingests (the relay). Nothing inside the cluster uses plain RTMP.
      publishers = map (h: h.address) (
        lib.filter (h: lib.elem h.role [ "lb" "source" "ingest" ] && h.name != me.name) hosts
      );
    in
    {
      services.streaming-cluster.fonts.enable = true;
      networking.firewall = lib.mkIf (top.openFirewall && !cfg.directPublishing) (
        import ./internal-ports.nix lib firewallBackend [
          {
            port = me.ports.rtmps;
            from = publishers;
          }
        ]
      );
    };
}
