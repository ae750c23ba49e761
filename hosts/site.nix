# Site-wide settings of every production host (imported by flake.nix's nixosConfigurations).
# EXAMPLE VALUES: replace the address, the DNS provider and the keys with your own.
{ lib, ... }:
{
  services.streaming-cluster.tls.acme = {
    email = "ops@example.org"; # EXAMPLE
    # The LBs both serve the site name, so its certificate is ordered with DNS-01: the lego
    # provider here, its credentials in the agenix secret acme-dns (secrets/acme-dns.age, lego's
    # environment variables for this provider; secrets/README.md), which the module decrypts on
    # the LBs for ACME (tls.acme.credentialsFile, by default /run/agenix/acme-dns).
    dnsProvider = "rfc2136"; # EXAMPLE
  };

  # Who may deploy (`nix run .#deploy`: deploy-rs logs in as root, docs/deploy.md) and read
  # the journal.
  users.users.root.openssh.authorizedKeys.keys = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLE ops@example" # EXAMPLE
  ];

  networking.useDHCP = lib.mkDefault false;
  networking.defaultGateway = lib.mkDefault "192.0.2.1"; # EXAMPLE
  networking.nameservers = lib.mkDefault [ "192.0.2.1" ]; # EXAMPLE

  system.stateVersion = "25.11";
}
