#!/usr/bin/env bash
# TEST ONLY: makes the VM test's keys, certificates and secrets. Run inside the Nix build by the
# derivations of vm-tests/test-material.nix (one call per derivation, with the arguments that
# file computes from cluster.nix), and by scripts/check-nix.sh with the machine's own tools to
# check what it makes. Everything it writes lands in the world-readable Nix store: NEVER use any
# of it, or this script, for a real host (production secrets: secrets/README.md).
#
#   test-material.sh ca OUT                   OUT/ca.crt, OUT/ca.key: a throwaway CA (P-256)
#   test-material.sh cert CA NAME SANS OUT    OUT/cert.pem, OUT/key.pem: NAME's certificate signed
#                                             by CA/ca.key, SANS as openssl writes them
#                                             (DNS:x,IP:y,...)
#   test-material.sh hostkey NAME OUT         OUT/ssh_host_ed25519_key(.pub): NAME's test ssh host
#                                             key, the identity agenix decrypts with on the VM
#   test-material.sh secret OUT PUB...        OUT: 32 random bytes as hex (no newline) encrypted
#                                             with age to each ssh public key file PUB
# Needs openssl (ca, cert, secret), ssh-keygen (hostkey) and age (secret).
set -euo pipefail

case "${1:-}" in
  ca)
    out=$2
    mkdir -p "$out"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7300 \
      -subj "/CN=streaming-cluster TEST ONLY CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
    ;;
  cert)
    ca=$2 name=$3 sans=$4 out=$5
    mkdir -p "$out"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' \
      "$sans" >"$tmp/ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name TEST ONLY" \
      -keyout "$out/key.pem" -out "$tmp/csr" 2>/dev/null
    # A random serial: the CA's directory is read-only (the Nix store), so no serial file.
    openssl x509 -req -in "$tmp/csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" \
      -set_serial "0x$(openssl rand -hex 15)" -days 7300 -extfile "$tmp/ext" \
      -out "$out/cert.pem" 2>/dev/null
    ;;
  hostkey)
    name=$2 out=$3
    mkdir -p "$out"
    ssh-keygen -q -t ed25519 -N "" -C "$name TEST ONLY" -f "$out/ssh_host_ed25519_key"
    ;;
  secret)
    out=$2
    shift 2
    recipients=()
    for pub in "$@"; do
      recipients+=(-R "$pub")
    done
    printf '%s' "$(openssl rand -hex 32)" | age "${recipients[@]}" -o "$out"
    ;;
  *)
    echo "usage: $0 ca OUT | cert CA NAME SANS OUT | hostkey NAME OUT | secret OUT PUB..." >&2
    exit 2
    ;;
esac
