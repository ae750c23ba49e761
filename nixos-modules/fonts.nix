# The source's test pattern and the ingest's slate burn text in with ffmpeg's drawtext, from the
# font path of Debian's fonts-dejavu-core (crates/source/src/encode.rs FONT,
# crates/ingest/src/transcode.rs SLATE_FONT). NixOS has no /usr/share/fonts: link that one file
# to nixpkgs' DejaVu until the path is configurable.
{
  config,
  lib,
  pkgs,
  ...
}:
{
  options.services.streaming-cluster.fonts.enable = lib.mkOption {
    type = lib.types.bool;
    default = false;
    internal = true;
    description = "Provide /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf (set by ingest and source).";
  };

  config = lib.mkIf config.services.streaming-cluster.fonts.enable {
    # tmpfiles creates the leading directories of an L line.
    systemd.tmpfiles.rules = [
      "L+ /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf - - - - ${pkgs.dejavu_fonts}/share/fonts/truetype/DejaVuSans.ttf"
    ];
  };
}
