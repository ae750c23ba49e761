#!/usr/bin/env bash
# Checks what nix/monitoring.nix generates (docs/monitoring.md), for the local and production
# profiles:
#   1. prometheus.yml: `promtool check config` (production: --syntax-only, its token and CA
#      live under /run on a deployed host; local: against stand-in files at the profile's paths);
#   2. the alert rules: `promtool check rules`, and `promtool test rules` with the unit tests of
#      tests/monitoring/alerts-test.nix;
#   3. every metric an alert or a panel reads is one the services export (a `metrics::` macro
#      in crates/), Patroni's, or Prometheus's `up`; the rules of the `pending` group must still
#      wait for at least one metric;
#   4. the dashboards: panel ids unique, panels inside the 24-column grid, every query non-empty.
# Installs nothing: promtool comes with Debian's prometheus package (scripts/setup-debian.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null; then
  echo "check-monitoring: promtool is missing. Debian: apt-get install --no-install-recommends prometheus" \
    "(then systemctl disable --now prometheus: only promtool is needed; scripts/setup-debian.sh does both)" >&2
  exit 1
fi
export NIX_STATE_DIR="${NIX_STATE_DIR:-$(mktemp -d)}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

evaluate() { # FILE ATTR OUT [nix-instantiate args]
  local file=$1 attr=$2 out=$3
  shift 3
  nix-instantiate --eval --strict --json "$file" ${attr:+-A "$attr"} "$@" >"$out"
}

for profile in local production; do
  dir="$work/$profile"
  mkdir -p "$dir"
  args=(--argstr profile "$profile" --argstr stateDir "$dir/state")
  evaluate nix/monitoring.nix prometheus "$dir/prometheus.yml" "${args[@]}"
  evaluate nix/monitoring.nix rules "$dir/alerts.rules.json" "${args[@]}"
  evaluate nix/monitoring.nix dashboards "$dir/dashboards.json" "${args[@]}"
  evaluate tests/monitoring/alerts-test.nix "" "$dir/alerts-test.json"
  if [ "$profile" = local ]; then
    # The files the local profile names, so promtool can check that they are there.
    mkdir -p "$dir/state/secrets" "$dir/state/tls"
    printf 'token' >"$dir/state/secrets/metrics-token"
    # A throwaway CA (the VM test's material script), only for promtool to find a certificate.
    bash vm-tests/test-material.sh ca "$dir/ca"
    cp "$dir/ca/ca.crt" "$dir/state/tls/ca.crt"
    promtool check config "$dir/prometheus.yml"
  else
    promtool check config --syntax-only "$dir/prometheus.yml"
  fi
  promtool check rules "$dir/alerts.rules.json"
  promtool test rules "$dir/alerts-test.json"
done

python3 - "$work/production" <<'PY'
import json
import pathlib
import re
import sys

out = pathlib.Path(sys.argv[1])
failures = []

# What the services export: the metrics:: macros of crates/ (names on the macro's first
# argument) and the publishers' failure counters passed by name. The exporter renders
# histograms as summaries (name{quantile=...}, name_sum, name_count), or with buckets
# (name_bucket{le=...}) those listed in crates/core/src/telemetry.rs's BUCKETED_HISTOGRAMS.
telemetry = pathlib.Path("crates/core/src/telemetry.rs").read_text()
bucketed = set(re.findall(r'^\s*"([a-z0-9_]+)",\s*$', telemetry.split("BUCKETED_HISTOGRAMS", 1)[1].split("];", 1)[0], re.M))
exported = set()
for path in pathlib.Path("crates").rglob("*.rs"):
    text = path.read_text()
    for kind, name in re.findall(r'metrics::(counter|gauge|histogram)!\(\s*"([a-z0-9_]+)"', text):
        exported.add(name)
        if kind == "histogram":
            exported |= {name + "_sum", name + "_count"}
            if name in bucketed:
                exported = (exported - {name}) | {name + "_bucket"}
    exported |= set(re.findall(r'failures_metric:\s*"([a-z0-9_]+)"', text))
# Patroni's REST /metrics (3.0 and 4.x alike), and Prometheus's own per target.
exported |= {"patroni_primary", "patroni_replica", "patroni_sync_standby",
             "patroni_postgres_running", "patroni_xlog_location",
             "patroni_xlog_replayed_location", "up"}

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "offset", "bool", "inf", "nan"}


def metric_names(expr):
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings (label_replace arguments)
    expr = re.sub(r"\{[^}]*\}", "", expr)                     # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                    # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if m.group() in KEYWORDS or rest.startswith("("):
            continue
        names.add(m.group())
    return names


rules = json.load(open(out / "alerts.rules.json"))
checked = 0
for group in rules["groups"]:
    for rule in group["rules"]:
        names = metric_names(rule["expr"])
        unknown = sorted(names - exported)
        if group["name"] == "pending":
            if not unknown:
                failures.append(f"pending alert {rule['alert']} reads only exported metrics: move it out of the pending group")
            elif "pending" not in rule["labels"]:
                failures.append(f"pending alert {rule['alert']} has no `pending` label naming the metric it waits for")
        elif unknown:
            failures.append(f"alert {rule['alert']} reads {', '.join(unknown)}, which no service exports")
        checked += 1

dashboards = json.load(open(out / "dashboards.json"))
panels_checked = 0
for name, board in dashboards.items():
    ids = [p["id"] for p in board["panels"]]
    if len(ids) != len(set(ids)):
        failures.append(f"dashboard {name}: panel ids repeat")
    for p in board["panels"]:
        g = p["gridPos"]
        if g["x"] < 0 or g["w"] <= 0 or g["x"] + g["w"] > 24:
            failures.append(f"dashboard {name}: panel {p['title']!r} leaves the 24-column grid")
        for t in p.get("targets", []):
            if not t["expr"].strip():
                failures.append(f"dashboard {name}: panel {p['title']!r} has an empty query")
            unknown = sorted(metric_names(t["expr"]) - exported)
            if unknown:
                failures.append(f"dashboard {name}: panel {p['title']!r} reads {', '.join(unknown)}, which no service exports")
        panels_checked += 1

for f in failures:
    print(f"check-monitoring: FAIL {f}", file=sys.stderr)
if failures:
    sys.exit(1)
print(f"check-monitoring: ok   {checked} alert rules and {panels_checked} panels read only exported metrics "
      f"({len(exported)} known names); pending rules each wait for a missing one")
PY
echo "check-monitoring: ok"
