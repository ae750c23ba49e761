# The VM failover test's script. vm-tests/failover.nix prepends the constants STREAMCTL, CA,
# STATE, CHANNEL (the first channel), CHANNELS (all, in order), SITE, LB_URLS, MONITORING (the hosts running Prometheus and Grafana) and HOSTS
# (name, role, url of every cluster host); the NixOS test driver provides start_all, subtest,
# machines and one variable per VM (lb1 ... client).
#
# Each fault runs while `streamctl watch` (4 viewers through lb1) and `streamctl chat` (6 chat
# clients spread over the broadcasts) run on the client: the fault comes ~15 s in, the host comes
# back ~20 s later, and the run must end with 0 stalls, 0 errors, and every acked chat message
# received exactly once by every client. Then the host must have rejoined.
import json
import time
from urllib.parse import urlsplit

LB = LB_URLS[0]
ENTRY = f"{LB}/live/{CHANNEL}/master.m3u8"
CURL = f"curl --silent --show-error --fail --max-time 5 --cacert {CA}"
# /status answers cluster hosts or the metrics token; the header goes through stdin, never argv.
STATUS_CURL = (
    "printf 'Authorization: Bearer %s' \"$(cat /run/agenix/metrics-token)\" | " + CURL + " -H @-"
)
# The database layer answers cluster hosts only (firewall) and speaks TLS with the cluster CA:
# its REST checks run on a broadcast, which reads Patroni as the chat does.
HOST_TLS = "/run/streaming-cluster/tls"
LOAD_SECONDS = 60
FAULT_AFTER = 15
FAULT_FOR = 20


def url_of(name):
    return next(h["url"] for h in HOSTS if h["name"] == name)


def names(role):
    return [h["name"] for h in HOSTS if h["role"] == role]


def vm(name):
    return next(m for m in machines if m.name == name)


def get_json(url):
    return json.loads(client.succeed(f"{CURL} '{url}'"))


def wait_healthy(name, timeout=300):
    client.wait_until_succeeds(f"{CURL} {url_of(name)}/healthz", timeout=timeout)


def patroni_cmd(db, path):
    return f"curl -sf --max-time 3 --cacert {HOST_TLS}/ca.pem https://{db}:8008/{path}"


def db_client():
    return vm(names("broadcast")[-1])


def wait_primary(timeout=300):
    probes = " || ".join(f"{patroni_cmd(db, 'primary')} -o /dev/null" for db in names("db"))
    db_client().wait_until_succeeds(probes, timeout=timeout)


def db_primary():
    for db in names("db"):
        status, _ = db_client().execute(f"{patroni_cmd(db, 'primary')} -o /dev/null")
        if status == 0:
            return db
    raise Exception("no db host answers 200 on :8008/primary")


def connects(host, port):
    """A shell command that succeeds when a TCP connection to host:port opens within 3 s."""
    return f"timeout 3 bash -c '</dev/tcp/{host}/{port}'"


def etcdctl(args):
    tls = "--cacert=/run/etcd-tls/ca.pem --cert=/run/etcd-tls/cert.pem --key=/run/etcd-tls/key.pem"
    return f"etcdctl --endpoints=https://lb1:2379 {tls} {args}"


def watch_cmd(seconds, viewers, pin=None):
    pin_arg = f" --pin {pin}" if pin else ""
    return (
        f"{STREAMCTL} watch {ENTRY} --state {STATE} --ca {CA} --seconds {seconds}"
        f" --viewers {viewers}{pin_arg} --json"
    )


def chat_cmd(seconds):
    return (
        f"{STREAMCTL} chat {LB} --state {STATE} --ca {CA} --seconds {seconds}"
        " --clients 6 --rate 3 --json"
    )


def start_load(tag, pin=None, seconds=LOAD_SECONDS):
    """watch and chat in the background, as transient units writing their JSON to /tmp."""
    for kind, cmd in (("watch", watch_cmd(seconds, 4, pin)), ("chat", chat_cmd(seconds))):
        client.succeed(
            f"systemd-run --unit={kind}-{tag} --property=Type=exec"
            f" --property=StandardOutput=file:/tmp/{kind}-{tag}.json"
            f" --property=StandardError=file:/tmp/{kind}-{tag}.log {cmd}"
        )


def report(kind, tag):
    out = client.succeed(f"cat /tmp/{kind}-{tag}.json")
    try:
        return json.loads(out)
    except ValueError:
        log = client.succeed(f"tail -n 30 /tmp/{kind}-{tag}.log")
        raise Exception(f"{kind} during {tag} printed no JSON report: {out!r}\n{log}")


def finish_load(tag, seconds=LOAD_SECONDS):
    for kind in ("watch", "chat"):
        client.wait_until_succeeds(
            f"! systemctl is-active --quiet {kind}-{tag}.service", timeout=seconds + 300
        )
    w, c = report("watch", tag), report("chat", tag)
    print(
        f"{tag}: watch {w['viewers']} viewers, {w['segments']} segments, {w['stalls']} stalls"
        f" ({w['stall_s']} s), {w['errors']} errors, {w['failovers']} failovers;"
        f" chat {c['clients']} clients on {c['broadcasts']} broadcasts, {c['sent']} sent,"
        f" {c['acked']} acked, {c['missing']} missing, {c['duplicates']} duplicates,"
        f" {c['reconnects']} reconnects, write outages {c['write_outages']}"
    )
    assert w["segments"] > 0, f"{tag}: the viewers played nothing: {w}"
    assert w["stalls"] == 0, f"{tag}: {w['stalls']} stalls ({w['stall_s']} s)"
    assert w["errors"] == 0, f"{tag}: {w['errors']} segments missed"
    assert c["acked"] > 0, f"{tag}: no chat message was acknowledged: {c}"
    assert c["missing"] == 0, f"{tag}: {c['missing']} acked chat messages not delivered to every client"
    assert c["duplicates"] == 0, f"{tag}: {c['duplicates']} chat messages delivered twice"


def with_fault(tag, fault, restore, pin=None):
    start_load(tag, pin)
    time.sleep(FAULT_AFTER)
    fault()
    time.sleep(FAULT_FOR)
    restore()
    finish_load(tag)


def short_watch(pin=None):
    w = json.loads(client.succeed(watch_cmd(8, 2, pin)))
    assert w["segments"] > 0 and w["stalls"] == 0 and w["errors"] == 0, f"watch: {w}"
    return w


start_all()

with subtest("the cluster comes up from nothing"):
    for db in names("db"):
        vm(db).wait_for_unit("patroni.service")
    wait_primary(timeout=600)
    for h in HOSTS:
        if h["role"] != "db":
            vm(h["name"]).wait_for_unit(f"streaming-{h['role']}.service")
            wait_healthy(h["name"], timeout=600)
    for ingest in names("ingest"):
        client.wait_until_succeeds(
            f"{STATUS_CURL} {url_of(ingest)}/status | jq -e '.channels[\"{CHANNEL}\"].live == true'",
            timeout=600,
        )
    # Through the LB, as a viewer: playlists, segments, tokens, certificates.
    client.wait_until_succeeds(f"{watch_cmd(6, 1)} | jq -e '.segments > 0 and .errors == 0'", timeout=300)
    # Accounts and chat: the app role and database exist (post_bootstrap), migrations ran.
    client.wait_until_succeeds(
        f"{chat_cmd(5)} | jq -e '.acked > 0 and .missing == 0 and .duplicates == 0'", timeout=300
    )

with subtest("every channel plays through the LB and has its own page"):
    for channel in CHANNELS:
        w = json.loads(
            client.succeed(
                f"{STREAMCTL} watch {LB}/live/{channel}/master.m3u8 --state {STATE} --ca {CA}"
                " --seconds 8 --viewers 1 --json"
            )
        )
        assert w["segments"] > 0 and w["stalls"] == 0 and w["errors"] == 0, f"{channel}: {w}"
        page = client.succeed(f"{CURL} -o /dev/null -w '%{{redirect_url}}' {LB}/live/{channel}/").strip()
        assert urlsplit(page).path == f"/live/{channel}/", f"{channel}: redirected to {page}"
        listed = [c["name"] for c in get_json(f"{urlsplit(page).scheme}://{urlsplit(page).netloc}/api/cluster")["channels"]]
        assert listed == CHANNELS, f"page lists {listed}"

with subtest("the database layer refuses strangers"):
    db = names("db")[0]
    # Not a cluster host: the firewall drops PostgreSQL, Patroni and etcd.
    for port in (5432, 8008, 2379, 2380):
        client.fail(connects(db, port))
    # A cluster host that is no client of etcd (lb2): dropped too; a db host gets through.
    vm(names("lb")[-1]).fail(connects(db, 2379))
    vm(names("db")[-1]).succeed(connects(db, 2379))
    db_client().succeed(connects(db, 5432))
    # A broadcast reaches Patroni; a failover needs a client certificate and the credentials.
    post = f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 --cacert {HOST_TLS}/ca.pem -X POST https://{db}:8008/failover -d '{{\"candidate\": \"{db}\"}}'"
    assert db_client().succeed(post).strip() == "403"
    with_cert = f"{post} --cert {HOST_TLS}/cert.pem --key {HOST_TLS}/key.pem"
    assert db_client().succeed(with_cert).strip() == "401"
    assert db_client().succeed(f"{with_cert} -u patroni:guess").strip() == "401"
    # etcd without a client certificate: the TLS handshake fails.
    vm(db).fail(f"curl -s --max-time 3 --cacert /run/etcd-tls/ca.pem https://{db}:2379/health")

with subtest("lb1 crashes (entry LB and etcd witness): viewers and chat carry on"):
    with_fault("lb1", lb1.crash, lb1.start)
    lb1.wait_for_unit("streaming-lb.service")
    wait_healthy("lb1")
    lb1.wait_until_succeeds(etcdctl("endpoint health"), timeout=120)
    assert len(lb1.succeed(etcdctl("member list")).strip().splitlines()) == 3
    assert get_json(f"{LB}/api/assign?channel={CHANNEL}")["broadcast"]

with subtest("the viewers' broadcast is cut off: they move to another one"):
    with_fault("broadcast1", broadcast1.block, broadcast1.unblock, pin="broadcast1")
    client.wait_until_succeeds(
        f"{STATUS_CURL} {LB}/status | jq -e '.broadcasts[] | select(.name == \"broadcast1\") | .eligible'",
        timeout=60,
    )
    w = short_watch(pin="broadcast1")
    assert w["failovers"] == 0, f"broadcast1 serves again, yet the pinned viewers failed over: {w}"

with subtest("an ingest crashes: the broadcasts pull from the other one"):
    with_fault("ingest1", ingest1.crash, ingest1.start)
    ingest1.wait_for_unit("streaming-ingest.service")
    wait_healthy("ingest1")
    client.wait_until_succeeds(
        f"{STATUS_CURL} {url_of('ingest1')}/status | jq -e '.channels[\"{CHANNEL}\"].live == true'", timeout=120
    )
    # broadcast1 prefers ingest1 (generator): it goes back once ingest1 keeps up.
    client.wait_until_succeeds(
        f"{STATUS_CURL} {url_of('broadcast1')}/status | jq -e '.origins[\"{CHANNEL}\"] == \"ingest1\"'", timeout=120
    )

with subtest("source1 is cut off: the ingests switch to source2, then back"):
    with_fault("source1", source1.block, source1.unblock)
    for ingest in names("ingest"):
        client.wait_until_succeeds(
            f"{STATUS_CURL} {url_of(ingest)}/status"
            f" | jq -e '.channels[\"{CHANNEL}\"].active_source == \"source1\"'",
            timeout=120,
        )

with subtest("the database primary crashes: Patroni fails over, no acked chat message is lost"):
    primary = db_primary()
    with_fault("db-primary", vm(primary).crash, vm(primary).start)
    vm(primary).wait_for_unit("patroni.service")
    wait_primary()
    new_primary = db_primary()
    assert new_primary != primary, f"{primary} is primary again right after its crash"
    db_client().wait_until_succeeds(patroni_cmd(primary, "replica"), timeout=300)
    db_client().wait_until_succeeds(
        f"{patroni_cmd(new_primary, 'cluster')} | grep -o '\"name\"' | wc -l | grep -qx 2",
        timeout=120,
    )

def outside_publisher_on(ingest):
    return (
        f"{STATUS_CURL} {url_of(ingest)}/status"
        f" | jq -e '.channels[\"{CHANNEL}\"] | .outside_publishers > 0 and .live == true'"
    )


def publisher_ingest():
    for ingest in names("ingest"):
        status, _ = client.execute(outside_publisher_on(ingest))
        if status == 0:
            return ingest
    return None


with subtest("the publisher's ingest crashes: it reconnects through the LBs to the other one"):
    # One streamer, no test sources: an OBS-like publisher on the LBs' publish address, taking
    # the LBs in turn (as a resolver's address list for the site's name) and reconnecting 2 s
    # after a drop. ffmpeg only encodes to a pipe; `streamctl publish` reads the key from its
    # file and checks each LB's certificate (its own name) against the CA: the key is on no
    # command line.
    for source in names("source"):
        vm(source).succeed("systemctl stop streaming-source.service")
    lb_names = " ".join(urlsplit(url_of(lb)).hostname for lb in names("lb"))
    publish = (
        "export PATH=/run/current-system/sw/bin:$PATH\n"
        "while true; do\n"
        f"  for lb in {lb_names}; do\n"
        "    ffmpeg -hide_banner -loglevel error -re -f lavfi -i testsrc2=size=640x360:rate=25"
        " -f lavfi -i sine=frequency=440 -g 50 -c:v libx264 -preset ultrafast -b:v 1000k"
        " -c:a aac -b:a 96k -f flv pipe:1"
        f" | {STREAMCTL} publish --to \"rtmps://$lb:1936/live/{CHANNEL}\""
        f" --key-file /run/agenix/stream-key-{CHANNEL} --ca-file {CA}\n"
        "    sleep 2\n"
        "  done\n"
        "done\n"
    )
    # A script file: systemd-run would expand `$` in a command line itself.
    client.succeed(f"cat > /tmp/obs.sh <<'EOF'\n{publish}EOF")
    client.succeed("systemd-run --unit=obs --property=Type=exec /run/current-system/sw/bin/bash /tmp/obs.sh")
    client.wait_until_succeeds(
        " || ".join(f"({outside_publisher_on(i)})" for i in names("ingest")), timeout=120
    )
    first = publisher_ingest()
    assert first is not None, "the publisher is live on no ingest"
    other = next(i for i in names("ingest") if i != first)
    # Both ingests carry it (the relay) before the crash.
    client.wait_until_succeeds(
        f"{STATUS_CURL} {url_of(other)}/status | jq -e '.channels[\"{CHANNEL}\"].live == true'",
        timeout=60,
    )
    crashed_at = time.time()
    with_fault(f"publisher-{first}", vm(first).crash, lambda: None)
    client.wait_until_succeeds(outside_publisher_on(other), timeout=60)
    print(f"publisher live on {other} again {time.time() - crashed_at:.1f} s after {first} crashed (upper bound)")
    vm(first).start()
    vm(first).wait_for_unit("streaming-ingest.service")
    wait_healthy(first)
    client.succeed("systemctl stop obs.service")
    for source in names("source"):
        vm(source).succeed("systemctl start streaming-source.service")
    for ingest in names("ingest"):
        client.wait_until_succeeds(
            f"{STATUS_CURL} {url_of(ingest)}/status"
            f" | jq -e '.channels[\"{CHANNEL}\"].active_source == \"source1\"'",
            timeout=120,
        )

def cluster_whole(timeout=300):
    """What `streamctl upgrade` waits for between hosts (crates/runner/src/upgrade/gates.rs)."""
    for h in HOSTS:
        if h["role"] != "db":
            wait_healthy(h["name"], timeout=timeout)
    wait_primary(timeout=timeout)
    primary = db_primary()
    for db in names("db"):
        if db != primary:
            db_client().wait_until_succeeds(patroni_cmd(db, "sync"), timeout=timeout)
    for ingest in names("ingest"):
        client.wait_until_succeeds(
            f"{STATUS_CURL} {url_of(ingest)}/status | jq -e '[.channels[] | .live and"
            f" .active_source == \"source1\"] | all'",
            timeout=timeout,
        )
    for b in names("broadcast"):
        client.wait_until_succeeds(
            f"{STATUS_CURL} {LB}/status | jq -e '.broadcasts[] | select(.name == \"{b}\") | .live'",
            timeout=timeout,
        )


def restart_units(name, role):
    units = {"db": "patroni.service etcd.service", "lb": "streaming-lb.service"}.get(
        role, f"streaming-{role}.service"
    )
    if name == "lb1":
        units += " etcd.service"
    vm(name).succeed(f"systemctl restart {units}")


ROLLING_SECONDS = 240

with subtest("every host restarts in turn, as a rolling upgrade does: nobody notices"):
    # The order and gates of `streamctl upgrade` / `nix run .#deploy` (docs/deploy.md), with a
    # restart of the host's units in place of deploy-rs's switch (the same binaries: nothing to
    # deploy in a VM test).
    cluster_whole()
    start_load("rolling", seconds=ROLLING_SECONDS)
    time.sleep(10)
    primary = db_primary()
    replica = next(db for db in names("db") if db != primary)
    turns = [replica] + names("source") + names("ingest") + names("broadcast") + names("lb")
    started = time.time()
    for name in turns:
        role = next(h["role"] for h in HOSTS if h["name"] == name)
        t0 = time.time()
        if role == "broadcast":
            vm(name).succeed(
                "touch /var/lib/streaming-cluster/draining && systemctl reload streaming-broadcast.service"
            )
            client.wait_until_succeeds(
                f"{STATUS_CURL} {LB}/status | jq -e '.broadcasts[] | select(.name == \"{name}\") | .draining'",
                timeout=30,
            )
        restart_units(name, role)
        cluster_whole()
        if role == "broadcast":
            vm(name).succeed(
                "rm -f /var/lib/streaming-cluster/draining && systemctl reload streaming-broadcast.service"
            )
        print(f"rolling: {name} done in {time.time() - t0:.1f} s")
    # The primary last: a switchover to the replica, asked from the replica (certificate and
    # REST password there; the password reaches curl on stdin), then its restart as a replica.
    switchover = (
        "{ printf 'user = \"patroni:'; cat /run/agenix/db-superuser-password; printf '\"\\n'; }"
        f" | curl -sS --fail-with-body -K - --max-time 60 --cacert /run/patroni/tls/ca.pem"
        " --cert /run/patroni/tls/cert.pem --key /run/patroni/tls/key.pem"
        " -H 'Content-Type: application/json'"
        f" -d '{{\"leader\": \"{primary}\", \"candidate\": \"{replica}\"}}'"
        f" https://{primary}:8008/switchover"
    )
    vm(replica).succeed(switchover)
    db_client().wait_until_succeeds(patroni_cmd(replica, "primary"), timeout=120)
    restart_units(primary, "db")
    cluster_whole()
    print(f"rolling: all {len(turns) + 1} hosts in {time.time() - started:.1f} s")
    finish_load("rolling", seconds=ROLLING_SECONDS)

with subtest("the whole cluster is back"):
    for h in HOSTS:
        if h["role"] != "db":
            wait_healthy(h["name"])
    start_load("final")
    finish_load("final")


# nixos-modules/monitoring.nix's defaults: both on loopback, reached here from the host itself.
PROMETHEUS = "http://127.0.0.1:9090"
GRAFANA = "http://127.0.0.1:3000"

with subtest("monitoring: Prometheus reads every host and has the alert rules, Grafana the dashboard"):
    for name in MONITORING:
        monitor = vm(name)
        monitor.wait_until_succeeds(f"curl -sf {PROMETHEUS}/-/ready", timeout=120)

        def every_target_up(_last_try):
            answer = json.loads(monitor.succeed(f"curl -sf {PROMETHEUS}/api/v1/targets"))
            targets = answer["data"]["activeTargets"]
            down = [t["labels"]["host"] for t in targets if t["health"] != "up"]
            monitor.log(f"targets: {len(targets)}, down: {down}")
            return len(targets) == len(HOSTS) and not down

        retry(every_target_up, timeout=120)
        groups = json.loads(monitor.succeed(f"curl -sf {PROMETHEUS}/api/v1/rules"))["data"]["groups"]
        assert {"hosts", "viewers", "ingest", "chat", "limits"} <= {g["name"] for g in groups}, groups
        # The admin password goes through stdin, never argv.
        monitor.wait_until_succeeds(
            "printf 'Authorization: Basic %s' \"$(printf 'admin:%s' \"$(cat /run/agenix/grafana-admin-password)\" | base64 -w0)\""
            f" | curl -sf -H @- {GRAFANA}/api/dashboards/uid/streaming-cluster-overview -o /dev/null",
            timeout=120,
        )
