#!/usr/bin/env bash
# Verify that web/vendor/hls.js matches the pinned npm release byte-for-byte.
# Usage: scripts/check-vendored.sh   (needs npm + network access to the npm registry)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vendor="$root/web/vendor/hls.js"

fail() { echo "check-vendored: FAIL: $*" >&2; exit 1; }

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | awk '{print $1}'
  else shasum -a 256 "$1" | awk '{print $1}'; fi
}

for f in VERSION SHA256SUMS hls.min.js LICENSE; do
  [[ -f "$vendor/$f" ]] || fail "missing $vendor/$f"
done

version="$(tr -d '[:space:]' < "$vendor/VERSION")"
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || fail "VERSION is not an exact x.y.z version: '$version'"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "check-vendored: fetching hls.js@$version from npm ..."
(cd "$tmp" && npm pack --silent "hls.js@$version" >/dev/null) || fail "npm pack hls.js@$version failed"
tgz="$tmp/hls.js-$version.tgz"
[[ -f "$tgz" ]] || fail "npm pack did not produce $tgz"
tar -xzf "$tgz" -C "$tmp"
pkg="$tmp/package"

cmp -s "$pkg/dist/hls.min.js" "$vendor/hls.min.js" \
  || fail "web/vendor/hls.js/hls.min.js differs from dist/hls.min.js in hls.js@$version"
cmp -s "$pkg/LICENSE" "$vendor/LICENSE" \
  || fail "web/vendor/hls.js/LICENSE differs from LICENSE in hls.js@$version"

expected="$(sha256 "$pkg/dist/hls.min.js")"
recorded="$(awk '$2 == "hls.min.js" || $2 == "*hls.min.js" {print $1}' "$vendor/SHA256SUMS")"
[[ -n "$recorded" ]] || fail "SHA256SUMS has no entry for hls.min.js"
[[ "$recorded" == "$expected" ]] \
  || fail "SHA256SUMS records $recorded but the npm tarball's hls.min.js is $expected"
actual="$(sha256 "$vendor/hls.min.js")"
[[ "$actual" == "$expected" ]] || fail "vendored hls.min.js sha256 $actual != $expected"

echo "check-vendored: OK: hls.js@$version (hls.min.js sha256 $expected)"
