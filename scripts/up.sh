#!/usr/bin/env bash
# One command for a newcomer: install what is missing, build, start the whole local cluster on
# loopback and print where to watch. Stop it with `target/debug/streamctl down`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-debian.sh
cargo build --workspace --locked
exec target/debug/streamctl up "$@"
