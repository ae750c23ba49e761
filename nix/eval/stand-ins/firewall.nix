# Stand-ins for the parts of nixpkgs' firewall that the project's modules use and the shared
# harness's core.nix lacks: the backend choice, the iptables backend's extraCommands and the
# nftables backend's extraInputRules, with the nftables backend's assertions, so that the rules
# of nixos-modules/internal-ports.nix are evaluated under either backend.
#
# Declarations copied, with their types and defaults, from nixpkgs (read through the search
# tool's index of NixOS/nixpkgs; the index keeps one version per file, 2025 ones here):
#   nixos/modules/services/networking/firewall.nix           backend
#   nixos/modules/services/networking/firewall-iptables.nix  extraCommands, extraStopCommands
#   nixos/modules/services/networking/firewall-nftables.nix  extraInputRules, its assertions
#   nixos/modules/services/networking/nftables.nix           networking.nftables.enable, rulesetFile
# Left out: services.firewalld (the backend default's first branch; nothing here enables it),
# the firewall units themselves, and every other firewall option.
{ config, lib, ... }:
let
  cfg = config.networking.firewall;
in
{
  options = {
    networking.firewall = {
      backend = lib.mkOption {
        type = lib.types.enum [
          "iptables"
          "nftables"
          "firewalld"
        ];
        # nixpkgs: `if config.services.firewalld.enable then "firewalld" else if ...`
        default = if config.networking.nftables.enable then "nftables" else "iptables";
      };
      extraCommands = lib.mkOption {
        type = lib.types.lines;
        default = "";
      };
      extraStopCommands = lib.mkOption {
        type = lib.types.lines;
        default = "";
      };
      extraInputRules = lib.mkOption {
        type = lib.types.lines;
        default = "";
      };
    };
    networking.nftables = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = false;
      };
      rulesetFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
      };
    };
  };

  # firewall-nftables.nix, `config = mkIf (cfg.enable && cfg.backend == "nftables")` (its pingLimit
  # assertion left out: pingLimit is not declared here).
  config = lib.mkIf (cfg.enable && cfg.backend == "nftables") {
    assertions = [
      {
        assertion = cfg.extraCommands == "";
        message = "extraCommands is incompatible with the nftables based firewall: ${cfg.extraCommands}";
      }
      {
        assertion = cfg.extraStopCommands == "";
        message = "extraStopCommands is incompatible with the nftables based firewall: ${cfg.extraStopCommands}";
      }
      {
        assertion = config.networking.nftables.rulesetFile == null;
        message = "networking.nftables.rulesetFile conflicts with the firewall";
      }
    ];
  };
}
