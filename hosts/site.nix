# Site-wide settings of every production host (imported by flake.nix's nixosConfigurations).
# EXAMPLE VALUES: replace the address, the DNS provider and the keys with your own.
{ lib, ... }:
{
  services.streaming-cluster.tls.acme = {
    email = "ops@example.org"; # EXAMPLE
    # The LBs both serve the site name, so its certificate is ordered with DNS-01 (lego provider
    # name and an environment file with its credentials, e.g. an agenix secret).
    dnsProvider = "rfc2136"; # EXAMPLE
    credentialsFile = "/run/agenix/acme-dns"; # EXAMPLE: add secrets/acme-dns.age and age.secrets.acme-dns
  };

  # Who may deploy (nixos-rebuild --target-host) and read the journal.
  users.users.root.openssh.authorizedKeys.keys = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLE ops@example" # EXAMPLE
  ];

  networking.useDHCP = lib.mkDefault false;
  networking.defaultGateway = lib.mkDefault "192.0.2.1"; # EXAMPLE
  networking.nameservers = lib.mkDefault [ "192.0.2.1" ]; # EXAMPLE

  system.stateVersion = "25.11";
}
