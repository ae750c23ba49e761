#!/usr/bin/env bash
# The code builds with the rustc nixos-25.11 ships (1.91), though the machines here have a newer
# one: every crate of the workspace inherits `rust-version` from Cargo.toml, which clippy's
# `incompatible_msrv` lint (run by scripts/test.sh with -D warnings) holds the standard library
# calls to, and no locked dependency asks for a newer rustc. Language features newer than the
# MSRV are not caught here; the flake's `checks.clippy` builds with 1.91 itself (docs/nix.md).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --locked | python3 <(cat <<'PY'
import json, sys

def version(v):
    return tuple(int(x) for x in v.split(".")[:2])

meta = json.load(sys.stdin)
workspace = set(meta["workspace_members"])
msrv = None
failures = []
for p in meta["packages"]:
    if p["id"] in workspace:
        if p.get("rust_version") is None:
            failures.append(f"{p['name']}: no rust-version (add rust-version.workspace = true)")
        elif msrv is None or version(p['rust_version']) != version(msrv):
            if msrv is not None:
                failures.append(f"{p['name']}: rust-version {p['rust_version']}, others {msrv}")
            msrv = msrv or p['rust_version']
if msrv is None:
    sys.exit("check-msrv: no workspace crate declares rust-version")
newer = [f"{p['name']} {p['version']} needs rustc {p['rust_version']}"
         for p in meta["packages"]
         if p["id"] not in workspace and p.get("rust_version")
         and version(p['rust_version']) > version(msrv)]
failures += newer
for f in failures:
    print(f"check-msrv: FAIL {f}", file=sys.stderr)
if failures:
    sys.exit(1)
deps = len(meta["packages"]) - len(workspace)
print(f"check-msrv: ok   {len(workspace)} crates at rust-version {msrv}; none of {deps} locked packages needs a newer rustc")
PY
)
