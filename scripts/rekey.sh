#!/usr/bin/env bash
# Re-keys the production secrets for hosts added to cluster.nix (secrets/README.md):
#
#   scripts/rekey.sh NAME [--key "ssh-ed25519 AAAA..."] [NAME [--key ...]]... [-i IDENTITY]...
#
#   1. checks that each NAME is a host of cluster.nix and that hosts/NAME.nix exists;
#   2. takes each NAME's ssh host key (the --key after it, or else
#      `ssh-keyscan -t ed25519 NAME.<site>`: the installed host must answer) and adds it to
#      secrets/host-keys.nix, unless the same key is there already (a different one is refused:
#      edit that file by hand when a host is reinstalled);
#   3. once every host of cluster.nix has a key there (hosts added together are re-keyed in one
#      run), runs `agenix -r` in secrets/ with the given identities (your admin key; agenix's
#      default is ~/.ssh/id_ed25519 or id_rsa): every existing .age file is decrypted and
#      encrypted again to its rules in secrets/secrets.nix, i.e. the admins plus exactly the hosts
#      that read it (nix/secrets.nix), the new ones included. Files not created yet are skipped.
#
# Then `git add secrets/` and deploy. agenix is taken from PATH (the dev shell has it), else run
# from the revision flake.lock pins. Needs nix-instantiate and python3, and ssh-keyscan without
# --key.
#
# agenix -r must run with a terminal on stdin: the pinned agenix (flake.lock) replaces the editor
# by `cp -- /dev/stdin` whenever stdin is not a terminal, and `-r` would then overwrite every
# secret with stdin. This script refuses to start agenix otherwise.
# REKEY_AGENIX replaces the agenix command (scripts/check-nix.sh runs a stand-in that records
# its arguments; the terminal check is then skipped).
set -euo pipefail

usage() {
  echo "usage: scripts/rekey.sh NAME [--key 'ssh-ed25519 AAAA...'] [NAME [--key ...]]... [-i IDENTITY]..." >&2
  exit 2
}
names=()
declare -A keys=()
identities=()
while [ $# -gt 0 ]; do
  case "$1" in
    --key)
      if [ $# -lt 2 ] || [ ${#names[@]} -eq 0 ]; then usage; fi
      keys[${names[-1]}]=$2
      shift 2
      ;;
    -i | --identity)
      [ $# -ge 2 ] || usage
      identities+=(-i "$(realpath "$2")") # before the cd below: relative to the caller
      shift 2
      ;;
    -*) usage ;;
    *)
      names+=("$1")
      shift
      ;;
  esac
done
[ ${#names[@]} -gt 0 ] || usage

cd "$(dirname "$0")/.."
export NIX_STATE_DIR="${NIX_STATE_DIR:-$(mktemp -d)}"

nix_eval() {
  nix-instantiate --eval --strict --json -E "$1"
}

for name in "${names[@]}"; do
  # 1. The host and its hardware file.
  fqdn=$(nix_eval "let c = import ./cluster.nix; in if builtins.any (h: h.name == \"$name\") c.hosts then \"$name.\${c.site}\" else null")
  if [ "$fqdn" = null ] || [ -z "$fqdn" ]; then
    echo "rekey: $name is not a host of cluster.nix: add its entry there first" >&2
    exit 1
  fi
  fqdn=${fqdn//\"/}
  if [ ! -f "hosts/$name.nix" ]; then
    echo "rekey: hosts/$name.nix is missing: write its hardware file first (start from another host's)" >&2
    exit 1
  fi

  # 2. Its ssh host key in secrets/host-keys.nix.
  key=${keys[$name]:-}
  if [ -z "$key" ]; then
    key=$(ssh-keyscan -t ed25519 "$fqdn" 2>/dev/null | awk '$2 == "ssh-ed25519" { print $2 " " $3; exit }')
    if [ -z "$key" ]; then
      echo "rekey: no ed25519 host key from $fqdn (ssh-keyscan): pass it with --key after $name" >&2
      exit 1
    fi
  fi
  if ! [[ "$key" =~ ^ssh-ed25519\ [A-Za-z0-9+/]+=*$ ]]; then
    echo "rekey: the key of $name must be an ed25519 public key, \"ssh-ed25519 AAAA...\" (no comment)" >&2
    exit 1
  fi
  current=$(nix_eval "(import ./secrets/host-keys.nix).hosts.\"$name\" or null")
  if [ "$current" = null ]; then
    # The new entry goes last in `hosts = { ... };`, before its closing brace.
    python3 - "$name" "$key" <<'PY'
import re, sys
name, key = sys.argv[1:]
path = "secrets/host-keys.nix"
lines = open(path).read().split("\n")
start = next(i for i, l in enumerate(lines) if re.match(r"\s*hosts\s*=\s*\{\s*$", l))
indent = re.match(r"\s*", lines[start]).group()
end = next(i for i in range(start + 1, len(lines)) if lines[i] == indent + "};")
lines.insert(end, f'{indent}  {name} = "{key}";')
open(path, "w").write("\n".join(lines))
PY
    if [ "$(nix_eval "(import ./secrets/host-keys.nix).hosts.\"$name\"")" != "\"$key\"" ]; then
      echo "rekey: could not add $name to secrets/host-keys.nix: add '$name = \"$key\";' to its hosts by hand" >&2
      exit 1
    fi
    echo "rekey: added $name's host key to secrets/host-keys.nix"
  elif [ "$current" != "\"$key\"" ]; then
    echo "rekey: secrets/host-keys.nix has another key for $name: if the host was reinstalled, replace it there by hand and run this again" >&2
    exit 1
  fi
done

# Every host of cluster.nix needs its key before agenix can use the rules.
# shellcheck disable=SC2016 # ${h.name} is Nix's
without=$(nix_eval 'let c = import ./cluster.nix; k = (import ./secrets/host-keys.nix).hosts; in builtins.concatStringsSep " " (map (h: h.name) (builtins.filter (h: !(k ? ${h.name})) c.hosts))')
without=${without//\"/}
if [ -n "$without" ]; then
  echo "rekey: secrets/host-keys.nix has no key yet for: $without; re-key hosts added together in one run: scripts/rekey.sh ${names[*]} $without" >&2
  exit 1
fi
if ! nix_eval "import ./secrets/secrets.nix" >/dev/null; then
  echo "rekey: secrets/secrets.nix does not evaluate (above)" >&2
  exit 1
fi

# 3. agenix -r.
if [ -n "${REKEY_AGENIX:-}" ]; then
  agenix=("$REKEY_AGENIX")
else
  if [ ! -t 0 ]; then
    echo "rekey: run this from a terminal (stdin is not one: agenix -r would overwrite every secret with stdin)" >&2
    exit 1
  fi
  if command -v agenix >/dev/null; then
    agenix=(agenix)
  else
    rev=$(nix_eval '(builtins.fromJSON (builtins.readFile ./flake.lock)).nodes.agenix.locked.rev')
    agenix=(nix --extra-experimental-features "nix-command flakes" run "github:ryantm/agenix/${rev//\"/}" --)
  fi
fi
cd secrets
echo "rekey: re-encrypting secrets/*.age for ${names[*]} (and every other recipient in secrets/secrets.nix)"
"${agenix[@]}" -r ${identities[@]+"${identities[@]}"}
echo "rekey: done; commit secrets/host-keys.nix and secrets/*.age (git add: flakes see tracked files only), then deploy ${names[*]}"
