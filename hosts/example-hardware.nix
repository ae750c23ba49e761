# EXAMPLE hardware shared by the example hosts: made-up disks and NIC name, just enough for
# `nix flake check` to evaluate every configuration. A real machine's hosts/<name>.nix imports its
# own `nixos-generate-config --show-hardware-config` output instead of this file.
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
