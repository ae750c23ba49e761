# agenix rules, read by the agenix CLI only (`cd secrets && agenix -e token-key.age`): every
# production secret and the public keys it is encrypted to, namely the admins plus exactly the
# hosts that read it (nix/secrets.nix, the mapping the NixOS modules decrypt by). Builtins only.
let
  cluster = import ../cluster.nix;
  secrets = import ../nix/secrets.nix { inherit cluster; };
  keys = import ./host-keys.nix;
  hostKey =
    name:
    keys.hosts.${name}
      or (throw "secrets/host-keys.nix has no key for ${name}: run scripts/rekey.sh ${name} (secrets/README.md)");
in
builtins.listToAttrs (
  map (file: {
    name = file;
    value.publicKeys = keys.admins ++ map hostKey (secrets.readers file);
  }) secrets.files
)
