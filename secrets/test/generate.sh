#!/usr/bin/env bash
# TEST ONLY. Regenerates the VM test's secrets: an age identity (committed, public: it protects
# nothing), every secret of nix/secrets.nix encrypted to it, and a test CA with one certificate
# per host of cluster.nix carrying the vm profile's names and addresses as SANs. Run it after
# adding a host to cluster.nix (scripts/check-nix.sh says when). Needs nix-instantiate, age,
# openssl and python3. Never use any of these files outside the VM test.
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
export NIX_STATE_DIR="${NIX_STATE_DIR:-$(mktemp -d)}"

identity=test-host.agekey
if [ ! -s "$identity" ]; then
  age-keygen -o "$identity" 2>/dev/null
fi
recipient=$(age-keygen -y "$identity")

files=$(nix-instantiate --eval --strict --json -E "(import $root/nix/secrets.nix {}).files" \
  | python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin)))')
for f in $files; do
  # 32 random bytes, hex, no trailing newline.
  printf '%s' "$(openssl rand -hex 32)" | age -r "$recipient" -o "$f"
done

# agenix rules for these files (to edit one: cd secrets/test && RULES=./secrets.nix agenix -e X.age -i test-host.agekey).
{
  echo "# TEST ONLY: agenix rules of the VM test's secrets, all encrypted to test-host.agekey."
  echo "# Written by generate.sh."
  echo "let"
  echo "  testHost = \"$recipient\";"
  echo "in"
  echo "{"
  for f in $files; do echo "  \"$f\".publicKeys = [ testHost ];"; done
  echo "}"
} > secrets.nix

mkdir -p tls
cd tls
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7300 \
  -subj "/CN=streaming-cluster TEST ONLY CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout ca.key -out ca.crt 2>/dev/null
nix-instantiate --eval --strict --json $root/nix/generate.nix --argstr profile vm \
  | python3 -c '
import json, sys
for name, c in json.load(sys.stdin).items():
    me = next(h for h in c["cluster"]["hosts"] if h["name"] == name)
    fqdn, address = me["fqdn"], me["address"]
    sans = [f"DNS:{fqdn}", f"DNS:{name}", f"IP:{address}"]
    if me["role"] == "lb":
        # cluster-vm forwards the LB port to the host: https://localhost:8443
        sans += ["DNS:localhost", "IP:127.0.0.1"]
    print(name, ",".join(sans))
' | while read -r name sans; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name TEST ONLY" \
    -keyout "$name.key" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 7300 \
    -extfile <(printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' "$sans") \
    -out "$name.crt" 2>/dev/null
  rm "$name.csr"
done
rm -f ca.srl ca.key  # the CA signs nothing else: regenerate everything instead
echo "test secrets written to $(pwd)/.. (TEST ONLY)"
