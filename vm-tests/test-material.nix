# TEST ONLY: every key, certificate and secret of the VM test, derived from cluster.nix when the
# test is BUILT, so that a host added to cluster.nix needs nothing else in the test. Each piece
# is a `pkgs.runCommand` running ./test-material.sh with nixpkgs' openssl, openssh (ssh-keygen)
# and age:
#   ca                  a throwaway CA (ca.crt, and its key ca.key, both in the store);
#   tls.<host>          cert.pem + key.pem for every host of cluster.nix, signed by that CA, with
#                       the vm profile's names and address as SANs (as nix/generate.nix names
#                       them), plus localhost on the LBs (`nix run .#cluster-vm` forwards lb1);
#   hostKeys.<node>     ssh_host_ed25519_key(.pub): the node's test ssh host key, the identity
#                       agenix decrypts with (age.identityPaths), as the host key does in
#                       production;
#   secrets             one directory of .age files, every secret of nix/secrets.nix but the
#                       ACME credentials, each encrypted to exactly the test keys of the nodes
#                       that read it (the same mapping secrets/secrets.nix encrypts production
#                       secrets by, plus `extraReaders`).
# The material is random, made by the builder; it stays fixed once built (the store path), and
# a rebuild makes new but equally valid material. It lives in the world-readable Nix store,
# private keys included: it protects nothing and must NEVER be used outside the VM test.
#
# `plan` is the same thing as data (builtins only): scripts/check-nix.sh evaluates it, runs
# ./test-material.sh with the same arguments and checks what comes out.
{
  pkgs,
  cluster ? import ../cluster.nix,
  # Nodes other than the cluster's hosts that read test secrets: { "<file>.age" = [ node ]; }.
  # vm-tests/failover.nix's client reads /status with the metrics token and publishes the first
  # channel with its stream key.
  extraReaders ? {
    "metrics-token.age" = [ "client" ];
    "stream-key-${(builtins.head cluster.channels).name}.age" = [ "client" ];
  },
}:
let
  inherit (builtins)
    attrNames
    attrValues
    concatLists
    concatStringsSep
    filter
    head
    listToAttrs
    map
    ;
  generated = import ../nix/generate.nix {
    inherit cluster;
    profile = "vm";
  };
  secretsMap = import ../nix/secrets.nix { inherit cluster; };
  script = ./test-material.sh;

  hostNames = map (h: h.name) cluster.hosts;
  entryOf = name: head (filter (h: h.name == name) generated.${name}.cluster.hosts);
  sansOf =
    name:
    let
      me = entryOf name;
    in
    [
      "DNS:${me.fqdn}"
      "DNS:${name}"
      "IP:${me.address}"
    ]
    ++ (
      if me.role == "lb" then
        [
          "DNS:localhost"
          "IP:127.0.0.1"
        ]
      else
        [ ]
    );
  readersOf = file: secretsMap.readers file ++ (extraReaders.${file} or [ ]);
  extraNodes = filter (n: !(builtins.elem n hostNames)) (
    attrNames (listToAttrs (map (n: {
      name = n;
      value = null;
    }) (concatLists (attrValues extraReaders))))
  );

  plan = {
    certificates = listToAttrs (
      map (name: {
        inherit name;
        value = sansOf name;
      }) hostNames
    );
    hostKeys = hostNames ++ extraNodes;
    secrets = listToAttrs (
      map (file: {
        name = file;
        value = readersOf file;
      }) secretsMap.testFiles
    );
  };

  # TEST ONLY derivations (see the top of this file).
  run =
    name: tools: buildCommand:
    pkgs.runCommand name { nativeBuildInputs = tools; } buildCommand;
  ca = run "streaming-cluster-TEST-ONLY-ca" [ pkgs.openssl ] "bash ${script} ca $out";
  tls = builtins.mapAttrs (
    name: sans:
    run "streaming-cluster-TEST-ONLY-tls-${name}" [ pkgs.openssl ]
      "bash ${script} cert ${ca} ${name} ${concatStringsSep "," sans} $out"
  ) plan.certificates;
  hostKeys = listToAttrs (
    map (name: {
      inherit name;
      value = run "streaming-cluster-TEST-ONLY-hostkey-${name}" [ pkgs.openssh ] "bash ${script} hostkey ${name} $out";
    }) plan.hostKeys
  );
  secrets = run "streaming-cluster-TEST-ONLY-secrets" [ pkgs.openssl pkgs.age ] (
    "mkdir $out\n"
    + concatStringsSep "\n" (
      map (
        file:
        "bash ${script} secret $out/${file} "
        + concatStringsSep " " (map (n: "${hostKeys.${n}}/ssh_host_ed25519_key.pub") plan.secrets.${file})
      ) (attrNames plan.secrets)
    )
  );
in
{
  inherit
    plan
    ca
    tls
    hostKeys
    secrets
    ;
  # The .age files in `secrets` (services.streaming-cluster.secrets.files: evaluation cannot
  # look into a directory that is only built later).
  secretFiles = attrNames plan.secrets;
}
