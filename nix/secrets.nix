# Which secrets each host reads: the one mapping behind nixos-modules/common.nix (what agenix
# decrypts on a host, to /run/agenix/<name>, the paths nix/generate.nix writes into the configs)
# and secrets/secrets.nix (whom each file is encrypted to). Builtins only, so the agenix CLI and
# scripts/check-nix.sh evaluate it anywhere.
{
  cluster ? import ../cluster.nix,
}:
let
  inherit (builtins)
    filter
    map
    concatMap
    elem
    listToAttrs
    ;
  secret = name: {
    inherit name;
    file = "${name}.age";
  };
  streamKey = channel: {
    name = "stream-keys/${channel}.key";
    file = "stream-key-${channel}.age";
  };
  channels = map (c: c.name) cluster.channels;

  forHost =
    host:
    if host.role == "lb" then
      map secret [
        "token-key"
        "metrics-token"
      ]
    else if host.role == "broadcast" then
      map secret [
        "token-key"
        "cluster-key"
        "db-password"
        "admin-password"
        "metrics-token"
      ]
    else if host.role == "ingest" then
      map secret [
        "cluster-key"
        "metrics-token"
      ]
      ++ map streamKey channels
    else if host.role == "source" then
      map streamKey (host.channels or [ ]) ++ [ (secret "metrics-token") ]
    else if host.role == "db" then
      map secret [
        "db-password"
        "db-superuser-password"
        "db-replication-password"
      ]
    else
      throw "unknown role ${host.role} of ${host.name}";

  # Prometheus and Grafana on a host flagged `monitoring` (nixos-modules/monitoring.nix), each
  # secret owned by the service that reads it: Prometheus gets its own copy of the metrics
  # token rather than the group that also reads the viewer token key on an LB.
  monitoring = [
    {
      name = "prometheus-metrics-token";
      file = "metrics-token.age";
      owner = "prometheus";
    }
    {
      name = "grafana-admin-password";
      file = "grafana-admin-password.age";
      owner = "grafana";
    }
    {
      name = "grafana-secret-key";
      file = "grafana-secret-key.age";
      owner = "grafana";
    }
  ];
  # The LBs' DNS-01 credentials for ACME (nixos-modules/common.nix, tls.source = "acme"): lego's
  # environment file (provider variables, e.g. RFC2136_TSIG_SECRET=...), read by nixpkgs'
  # acme-order-renew-<fqdn>.service, which runs as the acme user. Encrypted to every LB; decrypted
  # only where the LB orders its certificate with ACME (the VM test uses test certificates).
  acme = [
    {
      name = "acme-dns";
      file = "acme-dns.age";
      owner = "acme";
    }
  ];
  readBy =
    host:
    forHost host
    ++ (if host.monitoring or false then monitoring else [ ])
    ++ (if host.role == "lb" then acme else [ ]);

  all = concatMap readBy cluster.hosts;
  files = builtins.attrNames (listToAttrs (map (s: {
    name = s.file;
    value = null;
  }) all));
  # What the VM test decrypts (vm-tests/test-material.nix): everything but the ACME credentials.
  testFiles = filter (f: !(elem f (map (s: s.file) acme))) files;
in
{
  inherit
    forHost
    monitoring
    acme
    files
    testFiles
    ;
  # Host names that read `file`.
  readers = file: map (h: h.name) (filter (h: elem file (map (s: s.file) (readBy h))) cluster.hosts);
}
