#!/usr/bin/env bash
# One command for a newcomer and for CI: install what is missing, then run every test:
# static checks, unit tests, the Nix static checks, the vendored hls.js check, the store test on
# a throwaway PostgreSQL, and the end-to-end tests through the real binaries (streaming, failover,
# database, chat durability, the page in chromium), one local cluster at a time: 2 cores; then a
# short coverage-guided fuzzing run of every parser of outside data.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-debian.sh
start=$(date +%s)

echo "== build"
cargo build --workspace --all-targets --locked

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== MSRV: every crate at nixos-25.11's rustc, and every locked dependency"
scripts/check-msrv.sh

echo "== shape: no source file over 800 lines, no function over 100 outside tests"
scripts/shape.sh

echo "== Nix: files parse, generator and lock check out, hosts/modules/options/secrets line up"
scripts/check-nix.sh

echo "== monitoring: prometheus.yml, alert rules and their unit tests (promtool), metric names"
scripts/check-monitoring.sh

echo "== vendored hls.js matches its pinned npm release"
scripts/check-vendored.sh

echo "== unit and end-to-end tests (end-to-end ones run one at a time)"
cargo test --workspace --locked -- --include-ignored --test-threads=1

echo "== fuzzing (short run)"
# Without AddressSanitizer the build is about half as long; the AMF0 decoder bounds its depth,
# so the stack overflow ASan reports best is no longer reachable (long runs: docs/fuzzing.md).
scripts/fuzz.sh --sanitizer none --seconds 6

echo "== all tests passed in $(( $(date +%s) - start )) s"
