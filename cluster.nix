# THE host list of streaming-cluster: adding a host is adding one entry to `hosts`.
#
# Plain data on purpose (no function, no nixpkgs): `nix-instantiate --eval --strict --json
# cluster.nix` prints it for any tool, and nix/generate.nix turns it into one JSON config per
# host for a profile (local, vm, production). Addresses here are the production ones; the local
# and vm profiles replace them (127.77.<role>.<n> locally, from the number in the host name).
{
  site = "streaming-cluster.test";

  # The shared HLS timeline (docs/architecture.md): media sequence number = wall-clock slot.
  timeline = {
    segmentSeconds = 2;
    playlistSegments = 6;
    cacheSegments = 12;
    # After a failover to a backup source, go back to the primary once it has delivered this
    # long without a gap.
    primaryReturnSeconds = 6;
    # Low-latency HLS (docs/latency.md): each segment is also published as parts of this
    # length (a whole number of frames: 0.4 s is 10 at 25 fps), and players start this many
    # parts behind the newest one (PART-HOLD-BACK). 5 (2.0 s) is the lowest that kept every
    # failover row at 0 s of stall here; lower is lower latency with stalls in some rows.
    partSeconds = 0.4;
    partHoldBackParts = 5;
  };

  # Accounts and chat: PostgreSQL 15 under Patroni on the db hosts, etcd on them and lb1.
  database = {
    name = "streaming";
    # Patroni's leader lease in seconds: a dead primary is replaced within about this long, and
    # chat writes resume within ttl + 2 s. 20 is the least Patroni 3.1 and later accept (docs/nix.md).
    ttl = 20;
  };

  # What one outside client may hold or ask for; every listener faces the internet
  # (docs/security.md gives the threat model behind each value). Left out: the built-in default.
  limits = {
    httpHeaderSeconds = 10;            # TLS handshake + first request headers of a connection
    httpIdleSeconds = 60;              # keep-alive connection with nothing asked
    httpConnections = 16384;           # per HTTPS listener
    httpConnectionsPerAddress = 256;   # one household, office or carrier NAT
    assignRate = { burst = 20; perMinute = 60; };   # /api/assign and LB entries, per address
    accountRate = { burst = 10; perMinute = 20; };  # register and login, per address
    rtmpConnections = 64;
    rtmpConnectionsPerAddress = 8;
    rtmpPublishSeconds = 5;            # connect to accepted publish
    rtmpConnectRate = { burst = 10; perMinute = 30; };  # new connections to the LBs' publish address, per address
    chatSockets = 4096;                # chat WebSockets per broadcast
  };

  # The first channel is the site's front page; each one has its own stream key
  # (secrets/README.md), ladder and sources, and its own page (/live/<name>/) and chat.
  channels = [
    {
      name = "test";
      fps = 25;
      audioKbps = 96;
      # Production ladder (1080p is for hosts with CPU to spare). superfast rather than
      # veryfast: with our 2 s GOP it gives better SSIM per rendition than the original
      # pipeline's veryfast with `-g 10` at the same bitrate, for about 0.6 of veryfast's
      # cores (docs/benchmarks.md, "Ingest").
      preset = "superfast";
      ladder = [
        { name = "1080p"; width = 1920; height = 1080; videoKbps = 5000; }
        { name = "720p"; width = 1280; height = 720; videoKbps = 2800; }
        { name = "480p"; width = 854; height = 480; videoKbps = 1400; }
        { name = "360p"; width = 640; height = 360; videoKbps = 800; }
      ];
      # Local and VM runs: two ingests and two sources share 2 cores, so the ladder stays small.
      smallPreset = "ultrafast";
      smallLadder = [
        { name = "360p"; width = 640; height = 360; videoKbps = 800; }
        { name = "240p"; width = 426; height = 240; videoKbps = 400; }
        { name = "144p"; width = 256; height = 144; videoKbps = 200; }
      ];
    }
    {
      # A second, cheaper channel: two renditions in production, a single small one locally.
      name = "backstage";
      fps = 25;
      audioKbps = 64;
      preset = "superfast";
      ladder = [
        { name = "480p"; width = 854; height = 480; videoKbps = 1400; }
        { name = "240p"; width = 426; height = 240; videoKbps = 400; }
      ];
      smallPreset = "ultrafast";
      smallLadder = [
        { name = "144p"; width = 256; height = 144; videoKbps = 200; }
      ];
    }
  ];

  hosts = [
    # lb1 also carries the third etcd member (the witness of the two db hosts).
    { name = "lb1"; role = "lb"; address = "192.0.2.11"; etcdWitness = true; }
    # monitoring = true (any host; off when left out): Prometheus and Grafana run there
    # (docs/monitoring.md). lb2 rather than lb1: Prometheus's disk writes beside the etcd
    # witness would slow etcd's fsyncs, and losing one host should cost one extra duty at most.
    { name = "lb2"; role = "lb"; address = "192.0.2.12"; monitoring = true; }

    # uplinkMbps caps viewers: viewers x top rendition bandwidth stays under 80 % of it.
    # Any host may also declare `cores = N;`: `streamctl plan` then checks the measured cost
    # of its share of an audience against them.
    { name = "broadcast1"; role = "broadcast"; address = "192.0.2.21"; uplinkMbps = 1000; }
    { name = "broadcast2"; role = "broadcast"; address = "192.0.2.22"; uplinkMbps = 1000; }
    { name = "broadcast3"; role = "broadcast"; address = "192.0.2.23"; uplinkMbps = 10000; }
    { name = "broadcast4"; role = "broadcast"; address = "192.0.2.24"; uplinkMbps = 100; }

    { name = "db1"; role = "db"; address = "192.0.2.31"; }
    { name = "db2"; role = "db"; address = "192.0.2.32"; }

    { name = "ingest1"; role = "ingest"; address = "192.0.2.41"; }
    { name = "ingest2"; role = "ingest"; address = "192.0.2.42"; }

    # Sources publish a test pattern of each of their channels to every ingest; for each
    # channel the lower priority number is preferred.
    { name = "source1"; role = "source"; address = "192.0.2.51"; channels = [ "test" "backstage" ]; priority = 1; }
    { name = "source2"; role = "source"; address = "192.0.2.52"; channels = [ "test" "backstage" ]; priority = 2; }
  ];
}
