# A test pattern source (crates/source): one ffmpeg encode (bars, burned-in clock and host name,
# tone) published to every ingest. For tests and demos; a real publisher (OBS) needs no host.
import ./role.nix {
  role = "source";
  options =
    { lib, pkgs }:
    {
      ffmpegPackage = lib.mkPackageOption pkgs "ffmpeg-headless" { };
    };
  unit =
    { cfg, me, ... }:
    {
      path = [ cfg.ffmpegPackage ];
      # /healthz and /metrics only; it publishes outwards, over RTMPS to every ingest (their
      # port 1936, certificates checked against the CA bundle in /run/streaming-cluster/tls).
      ports = [ me.ports.https ];
      memoryDenyWriteExecute = false;
    };
  config = _: { services.streaming-cluster.fonts.enable = true; };
}
