#!/usr/bin/env bash
# Measures the local cluster as a newcomer would run it and writes docs/local-cluster.md:
# time from `streamctl up` to the first playable and the first live segment, what `streamctl
# watch` sees (stalls, latency) with several viewers, and CPU and memory per host and per role
# while streaming (from /proc, each host's whole process group, ffmpeg children included).
#
#   scripts/bench-local.sh [SECONDS] [VIEWERS]      (defaults: 60 s, 12 viewers)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
viewers=${2:-12}
state=$(mktemp -d)/state
prefix=127.75
out=docs/local-cluster.md
streamctl=target/debug/streamctl
cargo build --workspace --locked -q
trap '$streamctl down --state "$state" >/dev/null 2>&1 || true' EXIT

t0=$(date +%s.%N)
$streamctl up --json --state "$state" --address-prefix $prefix > "$state.up.json"
# First live (not slate) segment on ingest1's origin: /status counts them.
key=$(cat "$state/secrets/cluster.key")
until curl -sf --cacert "$state/tls/ca.crt" "https://$prefix.4.1:8443/status" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d["channels"]["test"]["segments_live"]>0 else 1)'; do
  sleep 0.2
done
t_live=$(date +%s.%N)
# Steady state: let every broadcast fill a whole playlist window before viewers arrive.
sleep 12

$streamctl watch --json --state "$state" --seconds "$seconds" --viewers "$viewers" --renditions all > "$state.watch.json" &
watch_pid=$!
sleep 5
python3 - "$state" $((seconds - 10)) > "$state.cpu.json" <<'PY'
import json, os, sys, time
state, window = sys.argv[1], int(sys.argv[2])
tick = os.sysconf("SC_CLK_TCK")
hosts = {}
for f in os.listdir(f"{state}/run"):
    if f.endswith(".pid"):
        hosts[f[:-4]] = int(open(f"{state}/run/{f}").read().strip())
def sample():
    per = {h: [0, 0] for h in hosts}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = open(f"/proc/{p}/stat").read()
            rss = int(open(f"/proc/{p}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        pgid, cpu = int(fields[2]), int(fields[11]) + int(fields[12])
        for h, pid in hosts.items():
            if pgid == pid:
                per[h][0] += cpu
                per[h][1] += rss
    return per
a, ta = sample(), time.time()
time.sleep(window)
b, tb = sample(), time.time()
json.dump({h: {"cpu": (b[h][0] - a[h][0]) / tick / (tb - ta), "rss_mib": b[h][1] / 2**20} for h in hosts}, sys.stdout)
PY
wait $watch_pid

python3 - "$state" "$t0" "$t_live" "$seconds" "$viewers" > "$out" <<'PY'
import json, sys, subprocess, datetime
state, t0, t_live, seconds, viewers = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
up = json.load(open(state + ".up.json"))
watch = json.load(open(state + ".watch.json"))
cpu = json.load(open(state + ".cpu.json"))
roles = {h["name"]: h["role"] for h in up["hosts"]}
lat = sorted(v["latency_s"] for v in watch["per_viewer"])
print("# Local cluster: startup, viewer experience, CPU and memory\n")
print(f"Measured {datetime.date.today()} on the 2-core development machine with `scripts/bench-local.sh {seconds} {viewers}`")
print("(debug build, the small local ladder 360p/240p/144p ultrafast, every host of cluster.nix but the db role).\n")
print("| figure | value |\n|---|---|")
print(f"| `streamctl up` to first playable segment through an LB | {up['startup_s']:.1f} s |")
print(f"| `streamctl up` to first live (non-slate) segment on ingest1 | {t_live - t0:.1f} s |")
print(f"| viewers x seconds | {watch['viewers']} x {watch['seconds']} s, renditions {', '.join(watch['renditions'])} |")
print(f"| stalls / stall seconds / errors | {watch['stalls']} / {watch['stall_s']:.2f} / {watch['errors']} |")
print(f"| latency (now - PROGRAM-DATE-TIME at the play head), mean over viewers | {watch['latency_s']:.2f} s |")
print(f"| latency per viewer min / median / max | {lat[0]:.2f} / {lat[len(lat)//2]:.2f} / {lat[-1]:.2f} s |")
print(f"| viewer startup (entry to first segment), mean | {watch['startup_s']:.2f} s |")
print("\nLatency is 3 segments of hold-back (6 s) plus the ingest pipeline (a slot's segment is published")
print("about 0.7-0.8 s after the slot ends: source pacing, RTMP, the ladder encode, the next keyframe closing")
print("the segment) plus 0-2 s depending on where in a slot a viewer joins (a player starts 3 segments")
print("behind the newest one it sees). Viewers here join within 0.6 s of each other, so their spread is small;")
print("over random join times expect 6.8 to 8.8 s.")
print("\nCPU (cores, 1.0 = one core) and resident memory per host while streaming, whole process group:\n")
print("| host | role | CPU | RSS MiB |\n|---|---|---|---|")
for h in sorted(cpu):
    print(f"| {h} | {roles.get(h, '?')} | {cpu[h]['cpu']:.2f} | {cpu[h]['rss_mib']:.0f} |")
print("\n| role | CPU total | RSS MiB total |\n|---|---|---|")
for role in ["lb", "broadcast", "ingest", "source"]:
    hs = [h for h in cpu if roles.get(h) == role]
    print(f"| {role} | {sum(cpu[h]['cpu'] for h in hs):.2f} | {sum(cpu[h]['rss_mib'] for h in hs):.0f} |")
print(f"| all | {sum(v['cpu'] for v in cpu.values()):.2f} | {sum(v['rss_mib'] for v in cpu.values()):.0f} |")
PY
echo "wrote $out"
cat "$out"
