#!/usr/bin/env bash
# What can be checked of the Nix layer without nixpkgs: every .nix file parses, cluster.nix is
# plain data, and the generator evaluates for every profile (the Rust test
# `generator_configs_deserialise` then checks every host config against the schema).
set -euo pipefail
cd "$(dirname "$0")/.."
export NIX_STATE_DIR="${NIX_STATE_DIR:-$(mktemp -d)}"
status=0
while IFS= read -r -d '' f; do
  if ! nix-instantiate --parse "$f" >/dev/null; then
    echo "check-nix: $f does not parse" >&2
    status=1
  fi
done < <(find . -name '*.nix' -not -path './target/*' -not -path './.git/*' -print0)
nix-instantiate --eval --strict --json cluster.nix >/dev/null
for profile in local vm production; do
  nix-instantiate --eval --strict --json nix/generate.nix --argstr profile "$profile" >/dev/null \
    || { echo "check-nix: generator fails for profile $profile" >&2; status=1; }
done
[ $status -eq 0 ] && echo "check-nix: ok"
exit $status
