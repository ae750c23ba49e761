#!/usr/bin/env bash
# Installs what streaming-cluster needs on a fresh Debian 12 machine (idempotent, quiet when
# everything is there). Rust itself comes from rustup (Debian's cargo is too old for edition 2024).
set -euo pipefail

need=()
command -v ffmpeg >/dev/null || need+=(ffmpeg)
command -v nix-instantiate >/dev/null || need+=(nix-bin)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
command -v openssl >/dev/null || need+=(openssl)
# scripts/check-nix.sh runs the VM test's material script (vm-tests/test-material.sh) with them.
command -v age >/dev/null || need+=(age)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v curl >/dev/null || need+=(curl ca-certificates)
command -v cc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v npm >/dev/null || need+=(npm)
command -v pgrep >/dev/null || need+=(procps)
# The db role: PostgreSQL under Patroni (Debian's python3 with psycopg2), etcd for its leader lock.
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
dpkg -s python3-venv >/dev/null 2>&1 || need+=(python3-venv)
command -v etcd >/dev/null || need+=(etcd-server)
# WAL archiving and base backups of the chat database (docs/backup.md, the restore drill).
command -v pgbackrest >/dev/null || need+=(pgbackrest)
/usr/bin/python3 -c 'import psycopg2' 2>/dev/null || need+=(python3-psycopg2)
# Patroni's HTTPS clients (etcd, its peers' REST API) go through urllib3, which needs idna.
/usr/bin/python3 -c 'import idna' 2>/dev/null || need+=(python3-idna)
# The browser test drives Debian's chromium with playwright-core.
[ -x /usr/bin/chromium ] || need+=(chromium)
# Network partitions of the local runner (`streamctl partition`) are nftables rules.
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
# promtool checks the monitoring configuration (scripts/check-monitoring.sh) and
# `streamctl up --monitoring` runs the Prometheus server itself; its own service is stopped and
# disabled below.
command -v promtool >/dev/null || need+=(prometheus)
# `streamctl bench serve` measures a broadcast against nginx with wrk (HTTP/1.1) and h2load
# (HTTP/2).
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
# `streamctl bench ingest` runs the original pipeline: nginx-rtmp and its exec'ed ffmpeg.
[ -f /usr/lib/nginx/modules/ngx_rtmp_module.so ] || need+=(libnginx-mod-rtmp)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Their postinsts enable and start servers (Prometheus on :9090, nginx on :80) that have
  # nothing to do here: promtool and `up --monitoring` run their own Prometheus, the benches
  # their own nginx.
  for service in prometheus nginx; do
    if [[ " ${need[*]} " == *" $service"* ]]; then
      $sudo_cmd systemctl disable --quiet "$service.service" 2>/dev/null || true
      if [ -d /run/systemd/system ]; then
        $sudo_cmd systemctl stop "$service.service"
      else
        $sudo_cmd "/etc/init.d/$service" stop >/dev/null 2>&1 || true
      fi
    fi
  done
fi

# Patroni from PyPI, pinned to the version nixpkgs ships (pkgs/by-name/pa/patroni), so the local
# cluster and NixOS behave the same: 3.1 and later make 20 s the least ttl (nix/generate.nix).
# Not Debian 12's 3.0.2: it can take the leader key back after a hang longer than its ttl and
# demote the new primary, losing acknowledged commits (fixed in 3.0.3).
patroni_version=4.1.0
patroni_venv=/opt/streaming-cluster/patroni
if [ "$("$patroni_venv/bin/patroni" --version 2>/dev/null)" != "patroni $patroni_version" ]; then
  echo "setup: Patroni $patroni_version into $patroni_venv"
  /usr/bin/python3 -m venv --system-site-packages "$patroni_venv"
  "$patroni_venv/bin/pip" install -q --disable-pip-version-check "patroni[etcd3]==$patroni_version"
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: Rust is missing. Install it with rustup (https://rustup.rs), Rust >= 1.91, then re-run." >&2
    exit 1
  fi
fi

# cargo-fuzz for the short fuzzing run (scripts/fuzz.sh); it builds libFuzzer with g++.
if ! command -v cargo-fuzz >/dev/null; then
  echo "setup: cargo install cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

# playwright-core for the browser test (tests/browser/), pinned by package-lock.json.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! "$root/node_modules/.package-lock.json" -nt "$root/package-lock.json" ]; then
  echo "setup: npm ci"
  (cd "$root" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
[ -f "$root/node_modules/playwright-core/package.json" ] || {
  echo "setup: npm ci did not install node_modules/playwright-core" >&2
  exit 1
}
