# EXAMPLE hardware file for lb1 (lb, cluster.nix). Replace it with the machine's own
# (`nixos-generate-config --show-hardware-config`) before deploying: these disks and this NIC
# name are made up, just enough for `nix flake check` to evaluate the configuration.
{ config, ... }:
{
  boot.loader.grub.device = "/dev/sda"; # EXAMPLE
  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos"; # EXAMPLE
    fsType = "ext4";
  };
  boot.initrd.availableKernelModules = [
    "virtio_pci"
    "virtio_blk"
    "ahci"
    "sd_mod"
  ]; # EXAMPLE

  # The public address comes from cluster.nix; only the interface name is machine-specific.
  networking.interfaces.eth0.ipv4.addresses = [
    {
      address = config.services.streaming-cluster.host.address;
      prefixLength = 24; # EXAMPLE
    }
  ];
}
