# EXAMPLE hardware file for source2 (source, cluster.nix). Replace the import with the machine's
# own hardware configuration (`nixos-generate-config --show-hardware-config`) before deploying.
{
  imports = [ ./example-hardware.nix ];
}
