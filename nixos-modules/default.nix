# Every NixOS module of streaming-cluster, as `nixosModules.default` of the flake. A host enables
# `services.streaming-cluster` with its name; cluster.nix decides its role, and the role module
# runs the same binary with the same generated JSON as the local runner.
#
# agenix's module comes with it (secrets are wired by common.nix); do not import agenix's own
# nixosModules.default a second time.
{
  self,
  agenix,
}:
let
  # Role modules take the flake (for their default packages); keep their file name for errors.
  withFlake = file: {
    _file = file;
    key = toString file;
    imports = [ (import file self) ];
  };
in
{
  imports = [
    "${agenix}/modules/age.nix"
    ./common.nix
    ./fonts.nix
    ./etcd.nix
    ./monitoring.nix
    (withFlake ./lb.nix)
    (withFlake ./broadcast.nix)
    (withFlake ./ingest.nix)
    (withFlake ./source.nix)
    (withFlake ./db.nix)
  ];
}
