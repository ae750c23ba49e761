# nixpkgs' sshd opens its ports in the firewall by default; the shared core.nix declares
# services.openssh.enable but not that. Declarations and the one config line copied from
# nixpkgs nixos/modules/services/networking/ssh/sshd.nix (2025 version in the search tool's
# index): `openFirewall` (bool, default true), `ports` (listOf port, default [ 22 ]) and
# `networking.firewall.allowedTCPPorts = lib.optionals cfg.openFirewall cfg.ports` under
# `mkIf cfg.enable`. Nothing else of sshd (its unit, its config file) is modelled.
{ config, lib, ... }:
let
  cfg = config.services.openssh;
in
{
  options.services.openssh = {
    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = true;
    };
    ports = lib.mkOption {
      type = lib.types.listOf lib.types.port;
      default = [ 22 ];
    };
  };
  config = lib.mkIf cfg.enable {
    networking.firewall.allowedTCPPorts = lib.optionals cfg.openFirewall cfg.ports;
  };
}
