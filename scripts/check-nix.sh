#!/usr/bin/env bash
# What can be checked of the Nix layer without nixpkgs (Nix cannot build here; see docs/nix.md):
#   1. every .nix file parses;
#   2. cluster.nix is plain data and the generator evaluates for every profile (the Rust test
#      `generator_yields_a_valid_config_for_every_host` then deserialises every host config);
#   3. flake.lock is a valid version-7 lock whose root inputs are exactly flake.nix's inputs,
#      each node locked (type, rev, narHash) and matching the input's URL and `flake = false`,
#      and Nix itself accepts it offline without wanting to re-lock;
#   4. every host of cluster.nix has a nixosConfiguration (flake.nix evaluated with stub inputs),
#      its hosts/<name>.nix and its role module;
#   5. every services.streaming-cluster.* option set or read in flake.nix, hosts/, vm-tests/ and
#      nixos-modules/ is declared in nixos-modules/ (scan of `nix-instantiate --parse` output);
#   6. secrets: the agenix rules evaluate and cover every secret the modules decrypt; the VM
#      test has each of them, and a test certificate per host with its vm name and address;
#   7. the VM test script compiles (and passes pyflakes when it is installed).
# Prints what failed; exits non-zero if anything did. Takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
export NIX_STATE_DIR="${NIX_STATE_DIR:-$(mktemp -d)}"
exec python3 - <<'PY'
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

failures = []


def fail(msg):
    failures.append(msg)
    print(f"check-nix: FAIL {msg}", file=sys.stderr)


section_start = 0


def ok(msg):
    """Reports a section as passed unless it recorded a failure since the previous report."""
    global section_start
    if len(failures) == section_start:
        print(f"check-nix: ok   {msg}")
    section_start = len(failures)


def nix_eval(*args, expr=None):
    cmd = ["nix-instantiate", "--eval", "--strict", "--json"]
    cmd += ["-E", expr] if expr is not None else []
    cmd += list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        errors = [line for line in r.stderr.splitlines() if "error" in line] or ["failed"]
        raise RuntimeError(" ".join(e.strip() for e in errors))
    return json.loads(r.stdout)


# 1. Every .nix file parses (the parse output feeds the option scan of step 5).
parsed = {}
nix_files = []
for top, dirs, files in os.walk("."):
    dirs[:] = [d for d in dirs if d not in (".git", "target", "node_modules", ".streamctl")]
    nix_files += [os.path.join(top, f)[2:] for f in files if f.endswith(".nix")]
for f in sorted(nix_files):
    r = subprocess.run(["nix-instantiate", "--parse", f], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"{f} does not parse: {r.stderr.strip()}")
    else:
        parsed[f] = r.stdout
ok(f"{len(parsed)}/{len(nix_files)} .nix files parse")

# 2. The host list and the generator.
cluster = nix_eval("cluster.nix")
hosts = cluster["hosts"]
configs = {}
for profile in ("local", "vm", "production"):
    try:
        configs[profile] = nix_eval("nix/generate.nix", "--argstr", "profile", profile)
    except RuntimeError as e:
        fail(f"generator fails for profile {profile}: {e}")
        continue
    if sorted(configs[profile]) != sorted(h["name"] for h in hosts):
        fail(f"generator profile {profile} does not yield one config per host of cluster.nix")
ok("cluster.nix evaluates; the generator evaluates for local, vm and production")

# 3. flake.lock against flake.nix.
inputs = nix_eval(expr="(import ./flake.nix).inputs")
out_args = nix_eval(expr="builtins.attrNames (builtins.functionArgs (import ./flake.nix).outputs)")
if sorted(out_args) != sorted(list(inputs) + ["self"]):
    fail(f"flake.nix outputs takes {out_args}, inputs are {sorted(inputs)} (+ self)")
try:
    lock = json.load(open("flake.lock"))
except (OSError, ValueError) as e:
    lock = None
    fail(f"flake.lock is not JSON: {e}")
if lock is not None:
    if lock.get("version") != 7:
        fail(f"flake.lock version is {lock.get('version')}, expected 7")
    nodes = lock.get("nodes", {})
    root = nodes.get(lock.get("root", ""), {})
    root_inputs = root.get("inputs", {})
    if sorted(root_inputs) != sorted(inputs):
        fail(f"flake.lock root inputs {sorted(root_inputs)} != flake.nix inputs {sorted(inputs)}")
    for name, spec in inputs.items():
        node = nodes.get(root_inputs.get(name, ""), None)
        if node is None:
            fail(f"flake.lock has no node for input {name}")
            continue
        locked, original = node.get("locked", {}), node.get("original", {})
        if not re.fullmatch(r"[0-9a-f]{40}", locked.get("rev", "")):
            fail(f"flake.lock {name}: locked.rev is not a 40-hex commit")
        if not re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked.get("narHash", "")):
            fail(f"flake.lock {name}: locked.narHash is not an SRI sha256")
        if not isinstance(locked.get("lastModified"), int) or locked.get("type") != original.get("type"):
            fail(f"flake.lock {name}: locked needs lastModified and the type of original")
        m = re.fullmatch(r"github:([^/]+)/([^/?]+)(?:/([^?]+))?", spec.get("url", ""))
        if not m:
            fail(f"flake.nix input {name}: only github: URLs are checked, got {spec.get('url')}")
        else:
            owner, repo, ref = m.groups()
            want = {"type": "github", "owner": owner, "repo": repo}
            if ref:
                want["ref"] = ref
            if original != want:
                fail(f"flake.lock {name}: original {original} does not match url {spec['url']}")
            if (locked.get("owner"), locked.get("repo")) != (owner, repo):
                fail(f"flake.lock {name}: locked owner/repo differ from the url")
        if (spec.get("flake", True) is False) != (node.get("flake", True) is False):
            fail(f"flake.lock {name}: `flake = false` differs between flake.nix and flake.lock")
    # Nix itself (a copy of the two files, a throwaway store): rc 1 if it wants to re-lock.
    with tempfile.TemporaryDirectory() as d:
        flake_dir = os.path.join(d, "flake")
        os.mkdir(flake_dir)
        for f in ("flake.nix", "flake.lock"):
            shutil.copy(f, flake_dir)
        r = subprocess.run(
            ["nix", "--extra-experimental-features", "nix-command flakes", "flake", "metadata",
             f"path:{flake_dir}", "--offline", "--no-update-lock-file", "--json",
             "--store", os.path.join(d, "store")],
            capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"nix flake metadata rejects flake.lock: {r.stderr.strip()}")
ok("flake.lock: version 7, root inputs = flake.nix inputs (" + ", ".join(sorted(inputs)) + "), nodes locked, accepted offline by nix")

# 4. Hosts: flake.nix's nixosConfigurations (its outputs with stub inputs: only builtins run),
#    their hardware files and role modules.
stub = r"""
let
  flake = import ./flake.nix;
  lib = {
    listToAttrs = builtins.listToAttrs;
    nixosSystem = args: args;
    attrValues = s: map (n: s.${n}) (builtins.attrNames s);
    getExe = p: p;
  };
  stubInput = { outPath = ./.; lib = lib; legacyPackages = { }; mkLib = _: { }; };
  outputs = flake.outputs { self = outputs; nixpkgs = stubInput; crane = stubInput; agenix = stubInput; };
in
builtins.mapAttrs (name: c: map toString (builtins.filter builtins.isPath c.modules)) outputs.nixosConfigurations
"""
try:
    nixos = nix_eval(expr=stub)
except RuntimeError as e:
    nixos = {}
    fail(f"flake.nix nixosConfigurations do not evaluate with stub inputs: {e}")
here = os.getcwd()
for h in hosts:
    name, role = h["name"], h["role"]
    if name not in nixos:
        fail(f"{name} (cluster.nix) has no nixosConfigurations.{name}")
    else:
        mods = [os.path.relpath(m, here) for m in nixos[name]]
        if f"hosts/{name}.nix" not in mods:
            fail(f"nixosConfigurations.{name} does not import hosts/{name}.nix")
    if not os.path.isfile(f"hosts/{name}.nix"):
        fail(f"{name}: hosts/{name}.nix is missing (its hardware file: start from another host's EXAMPLE)")
    if not os.path.isfile(f"nixos-modules/{role}.nix"):
        fail(f"{name}: role {role} has no module nixos-modules/{role}.nix")
extra = sorted(set(nixos) - {h["name"] for h in hosts})
if extra:
    fail(f"nixosConfigurations not in cluster.nix: {extra}")
ok(f"{len(hosts)} hosts: each has a nixosConfiguration, hosts/<name>.nix and nixos-modules/<role>.nix")

# 5. Option names. `nix-instantiate --parse` prints every binding as `name = value;` with
#    attribute paths expanded into nested sets, so a small scanner recovers option paths.
TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}()\[\];]|[^\s{}()\[\];"]+')
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")
DECL = re.compile(r"^\(*\s*(?:\(lib\)\.)?mk(?:Option|EnableOption|PackageOption)\b")
PREFIX = ("services", "streaming-cluster")


def attr_name(tok):
    if IDENT.fullmatch(tok):
        return tok
    if tok.startswith('"') and "${" not in tok:
        return json.loads(tok)
    return None


def bindings(text):
    """(path, value text) of every `name = value` binding, path through the enclosing sets."""
    toks = [(m.group(), m.start()) for m in TOKEN.finditer(text)]
    stack, out = [], []
    for i, (t, pos) in enumerate(toks):
        if t == "{":
            named = (i >= 3 and toks[i - 1][0] == "=" and attr_name(toks[i - 2][0])
                     and toks[i - 3][0] in ("{", ";", "let"))
            stack.append(attr_name(toks[i - 2][0]) if named else None)
        elif t == "}":
            if stack:
                stack.pop()
        elif (t == "=" and i >= 2 and i + 1 < len(toks) and toks[i + 1][0] != "{"
              and attr_name(toks[i - 1][0]) and toks[i - 2][0] in ("{", ";", "let")):
            path = [n for n in stack if n] + [attr_name(toks[i - 1][0])]
            out.append((path, text[toks[i + 1][1]:toks[i + 1][1] + 60]))
    return out


def after_prefix(path):
    for k in range(len(path) - 1):
        if tuple(path[k:k + 2]) == PREFIX:
            return k, tuple(path[k + 2:])
    return None, None


# A role file (`import ./role.nix { role = "<role>"; options = ...; ... }`) declares its own
# options through `options`, and role.nix declares the same few for every role under
# services.streaming-cluster.${role}.
ROLE_HELPER = "nixos-modules/role.nix"
ROLE_FILE = re.compile(r"\(import \S+/nixos-modules/role\.nix ")
declared, used = set(), []
per_role, roles = set(), set()
for f, text in parsed.items():
    in_modules = f.startswith("nixos-modules/")
    if not (in_modules or f.startswith(("hosts/", "vm-tests/")) or f == "flake.nix"):
        continue
    found = bindings(text)
    role = None
    if in_modules and ROLE_FILE.match(text):
        names = [m.group(1) for p, v in found if p == ["role"] for m in [re.match(r'"(\w+)"', v)] if m]
        if len(names) != 1:
            fail(f"{f} calls role.nix without one literal `role = \"<role>\";`")
        else:
            role = names[0]
            roles.add(role)
    for path, value in found:
        if role and DECL.search(value):
            declared.add((role, *path))
            continue
        k, opt = after_prefix(path)
        if opt is None or not opt:
            continue
        if in_modules and k > 0 and path[k - 1] == "options":
            if DECL.search(value):
                (per_role if f == ROLE_HELPER else declared).add(opt)
        else:
            used.append((f, opt))
    for m in re.finditer(r"\bservices\.streaming-cluster((?:\.[A-Za-z_][A-Za-z0-9_'-]*)+)", text):
        used.append((f, tuple(m.group(1)[1:].split("."))))
declared |= {(role, *opt) for role in roles for opt in per_role}
if not declared:
    fail("no services.streaming-cluster option declarations found in nixos-modules/")


def known(opt):
    # A definition or read may stop at an option or go into its value (attrs-typed options).
    return any(opt[:len(d)] == d or d[:len(opt)] == opt for d in declared)


bad = sorted({(f, ".".join(o)) for f, o in used if not known(o)})
for f, o in bad:
    fail(f"{f} uses services.streaming-cluster.{o}, which no module in nixos-modules/ declares")
for role in sorted({h["role"] for h in hosts}):
    if (role, "enable") not in declared:
        fail(f"nixos-modules/ declares no services.streaming-cluster.{role}.enable")
ok(f"{len(declared)} options declared in nixos-modules/; {len(used)} uses in flake.nix, hosts/, vm-tests/ and nixos-modules/ all declared")

# 6. Secrets.
try:
    files = nix_eval(expr="(import ./nix/secrets.nix { }).files")
    rules = nix_eval("secrets/secrets.nix")
    test_rules = nix_eval("secrets/test/secrets.nix")
except RuntimeError as e:
    files, rules, test_rules = [], {}, {}
    fail(f"secrets: {e}")
for f in files:
    if f not in rules:
        fail(f"secrets/secrets.nix has no rule for {f}")
    if f not in test_rules or not os.path.isfile(f"secrets/test/{f}"):
        fail(f"secrets/test/{f} (VM test) is missing: run secrets/test/generate.sh")
    elif not open(f"secrets/test/{f}", "rb").read().startswith(b"age-encryption.org/v1"):
        fail(f"secrets/test/{f} is not an age file")
vm_hosts = {n: next(h for h in c["cluster"]["hosts"] if h["name"] == n) for n, c in configs.get("vm", {}).items()}
openssl = shutil.which("openssl")
for name, h in sorted(vm_hosts.items()):
    crt, key = f"secrets/test/tls/{name}.crt", f"secrets/test/tls/{name}.key"
    if not (os.path.isfile(crt) and os.path.isfile(key)):
        fail(f"the VM test has no certificate for {name}: run secrets/test/generate.sh")
    elif openssl:
        r = subprocess.run([openssl, "x509", "-in", crt, "-noout", "-ext", "subjectAltName"],
                           capture_output=True, text=True)
        for san in (f"DNS:{h['fqdn']}", f"IP Address:{h['address']}"):
            if san not in r.stdout:
                fail(f"{crt} lacks the SAN {san}: run secrets/test/generate.sh")
        r = subprocess.run([openssl, "verify", "-CAfile", "secrets/test/tls/ca.crt", crt],
                           capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"{crt} does not verify against secrets/test/tls/ca.crt")
ok(f"secrets: {len(files)} agenix files with rules; VM test secrets and {len(vm_hosts)} test certificates"
   + ("" if openssl else " (SANs unchecked: no openssl)"))

# 7. The VM test script.
prelude = "STREAMCTL = CA = STATE = CHANNEL = ''\nLB_URLS = MONITORING = ['']\nHOSTS = [{}]\n"
try:
    compile(prelude + open("vm-tests/failover.py").read(), "vm-tests/failover.py", "exec")
except SyntaxError as e:
    fail(f"vm-tests/failover.py: {e}")
nodes = sorted(vm_hosts) + ["client"]
driver = ["start_all", "join_all", "subtest", "machines", "driver", "Machine", "retry",
          "serial_stdout_on", "serial_stdout_off", "polling_condition",
          "STREAMCTL", "CA", "STATE", "CHANNEL", "LB_URLS", "MONITORING", "HOSTS"]
r = subprocess.run([sys.executable, "-m", "pyflakes", "vm-tests/failover.py"], capture_output=True,
                   text=True, env={**os.environ, "PYFLAKES_BUILTINS": ",".join(driver + nodes)})
if "No module named pyflakes" in r.stderr:
    ok("vm-tests/failover.py compiles (pyflakes not installed)")
elif r.returncode != 0:
    fail(f"pyflakes vm-tests/failover.py: {r.stdout.strip()} {r.stderr.strip()}")
else:
    ok("vm-tests/failover.py compiles and passes pyflakes")

if failures:
    print(f"check-nix: {len(failures)} failure(s)", file=sys.stderr)
    sys.exit(1)
print("check-nix: ok")
PY
