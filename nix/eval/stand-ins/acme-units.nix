# The unit wiring of nixpkgs' security.acme (nixos/modules/security/acme/default.nix at
# c9634190, the revision the shared acme.nix transcribes) that acme.nix leaves out and the
# checks need: the user the units run as and how acme-<cert>.service (the self-signed
# placeholder until a first order succeeded), acme-order-renew-<cert>.service (lego's order or
# renewal; on a new certificate it runs `systemctl try-reload-or-restart` on the cert's
# reloadServices) and acme-setup.service depend on each other, plus the renewal timer.
# Copied from that file: commonServiceConfig.User (`if cfg.useRoot then "root" else "acme"`),
# baseService's wantedBy/after/wants/before, orderRenewService's after/wants, setupService, and
# renewTimer's name and Unit. Scripts, sandboxing and the account targets are left out.
{ config, lib, ... }:
let
  cfg = config.security.acme;
  user = if cfg.useRoot then "root" else "acme";
in
{
  config = lib.mkIf (cfg.certs != { }) {
    systemd.services =
      {
        acme-setup = {
          description = "Set up the ACME certificate renewal infrastructure";
          serviceConfig = {
            Type = "oneshot";
            User = user;
            Group = lib.mkDefault "acme";
            RemainAfterExit = true;
          };
        };
      }
      // lib.mapAttrs' (
        cert: _:
        lib.nameValuePair "acme-${cert}" {
          after = [ "acme-setup.service" ];
          wants = [
            "acme-setup.service"
            "acme-order-renew-${cert}.service"
          ];
          before = [ "acme-order-renew-${cert}.service" ];
          serviceConfig.User = user;
        }
      ) cfg.certs
      // lib.mapAttrs' (
        cert: _:
        lib.nameValuePair "acme-order-renew-${cert}" {
          after = [
            "network.target"
            "network-online.target"
            "acme-setup.service"
            "nss-lookup.target"
            "acme-${cert}.service"
          ];
          wants = [
            "network-online.target"
            "acme-setup.service"
            "acme-${cert}.service"
          ];
          serviceConfig.User = user;
        }
      ) cfg.certs;

    systemd.timers = lib.mapAttrs' (
      cert: _:
      lib.nameValuePair "acme-renew-${cert}" {
        wantedBy = [ "timers.target" ];
        timerConfig.Unit = "acme-order-renew-${cert}.service";
      }
    ) cfg.certs;
  };
}
