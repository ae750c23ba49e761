# How a unit that reads this host's certificate (/run/streaming-cluster/tls, linked to
# /var/lib/acme/<fqdn>/ by common.nix) depends on nixpkgs' ACME units, with tls.source = "acme".
# nixos-25.11's reworked security.acme (nixos/modules/security/acme/default.nix, read at
# c9634190) has per certificate:
#   acme-<fqdn>.service: oneshot, RemainAfterExit; puts a self-signed placeholder certificate in
#     place until a first order has succeeded (afterwards it leaves the real one alone), and
#     wants the order, which it is ordered before;
#   acme-order-renew-<fqdn>.service: lego, the first order and then the renewals (timer
#     acme-renew-<fqdn>.timer). It can take minutes, or fail and keep the placeholder (DNS not
#     yet pointing at the host, missing DNS-01 credentials). When it installs a new certificate,
#     the first real one included, it runs `systemctl try-reload-or-restart` on the cert's
#     reloadServices (common.nix: the streaming unit, which re-reads its certificate on SIGHUP).
# Hence: after the placeholder unit (a certificate exists when the service starts), wanting the
# order without being ordered after it: the service serves with the placeholder and is reloaded
# when the real certificate arrives, instead of staying down while lego runs or fails. (In the
# module before the rework, acme-<fqdn>.service was the order itself: after it meant after lego.)
fqdn: {
  wants = [
    "acme-${fqdn}.service"
    "acme-order-renew-${fqdn}.service"
  ];
  after = [ "acme-${fqdn}.service" ];
}
