# What watches the cluster of cluster.nix: Prometheus's scrape configuration, the alert rules and
# the Grafana dashboards, as plain values (toJSON gives a prometheus.yml, a rule file and
# dashboard JSON). Builtins only, like nix/generate.nix, whose output it reads: every target is
# the address and port the service really listens on in that profile, with the metrics token and
# cluster CA paths the services themselves use.
#
#   nix-instantiate --eval --strict --json nix/monitoring.nix --argstr profile local -A prometheus
#
# nixos-modules/monitoring.nix runs Prometheus and Grafana with these values;
# scripts/check-monitoring.sh checks them with promtool; docs/monitoring.md says why each alert
# exists. Alerts and panels use only metric names the services (and Patroni) export: the check
# script fails on any other.
{
  cluster ? import ../cluster.nix,
  # local, vm or production: the addresses and paths of nix/generate.nix.
  profile ? "local",
  stateDir ? "/var/lib/streaming-cluster",
  addressPrefix ? "127.77",
  # Where Prometheus reads the metrics token; null: the file the services of the profile read.
  # The NixOS module gives Prometheus its own copy (the services' one is their group's).
  metricsTokenFile ? null,
  # The alert rules as prometheus.yml names them (a relative path is beside prometheus.yml).
  ruleFile ? "alerts.rules.json",
}:
let
  inherit (builtins)
    filter
    map
    length
    elemAt
    head
    concatMap
    concatStringsSep
    genList
    foldl'
    removeAttrs
    replaceStrings
    match
    toString
    ;

  generated = import ./generate.nix {
    inherit
      cluster
      profile
      stateDir
      addressPrefix
      ;
  };
  # Every host's config holds the whole cluster view; any one will do for the host list.
  clusterConfig = generated.${(head cluster.hosts).name};
  hosts = clusterConfig.cluster.hosts;
  paths = clusterConfig.paths;
  tokenFile = if metricsTokenFile == null then paths.metrics_token else metricsTokenFile;

  byRole = role: filter (h: h.role == role) hosts;
  roles = filter (role: byRole role != [ ]) [
    "lb"
    "broadcast"
    "ingest"
    "source"
    "db"
  ];
  dbHosts = byRole "db";
  witnesses = map (h: h.name) (filter (h: h.etcd_witness) hosts);

  # Judgement, not measurement: the figures an operator would tune first.
  thresholds = {
    # A unit restarts within seconds (Restart=on-failure), a reboot within a minute.
    hostDownFor = "1m";
    # Viewers over the room the LBs can still hand out. That room is already planned at 80 % of
    # each uplink (crates/core/src/status.rs), so 80 here is about 64 % of the raw uplinks.
    capacityPercent = 80;
    transcoderRestartsIn10m = 3;
    transcoderStallsIn10m = 2;
    chatPrimaryChangesPerHour = 3;
    chatAppendP99Seconds = 1;
    # Refusals by a per-client limit: one abusive address or a large NAT; beyond this it is
    # worth a look (and maybe a firewall rule).
    refusalsPerSecond = 5;
  };

  scrapeSeconds = 5;

  # The address Prometheus connects to, and checks the certificate against: the host's URL
  # (its name in production, where ACME certificates carry no address), with the port.
  serviceTarget =
    h:
    let
      authority = replaceStrings [ "https://" ] [ "" ] h.url;
    in
    if match ".*:[0-9]+" authority != null then authority else "${authority}:${toString h.ports.https}";
  # Patroni's REST API (its /metrics): by address, as Patroni's peers and the chat reach it.
  patroniTarget = h: "${h.address}:${toString h.ports.patroni}";

  scrapeJob =
    role:
    {
      job_name = role;
      scheme = "https";
      metrics_path = "/metrics";
      tls_config.ca_file = paths.ca_cert;
      static_configs = map (h: {
        targets = [ (if role == "db" then patroniTarget h else serviceTarget h) ];
        labels = {
          host = h.name;
          inherit role;
        };
      }) (byRole role);
    }
    # Patroni's reads are open to whoever trusts the CA: the token is not its to see.
    // (
      if role == "db" then
        { }
      else
        {
          authorization = {
            type = "Bearer";
            credentials_file = tokenFile;
          };
        }
    );

  prometheus = {
    global = {
      scrape_interval = "${toString scrapeSeconds}s";
      scrape_timeout = "${toString (scrapeSeconds - 1)}s";
      evaluation_interval = "${toString scrapeSeconds}s";
      external_labels.site = cluster.site;
    };
    rule_files = [ ruleFile ];
    scrape_configs = map scrapeJob roles;
  };

  # ---- Alert rules ----

  rule =
    name:
    {
      expr,
      for ? null,
      severity,
      labels ? { },
      summary,
      description,
    }:
    {
      alert = name;
      inherit expr;
      labels = labels // {
        inherit severity;
      };
      annotations = {
        inherit summary description;
      };
    }
    // (if for == null then { } else { inherit for; });

  # Why the loss of one host of a role matters, and what the cluster already did about it.
  hostDownMeaning = {
    lb =
      "Viewers and publishers who enter through its address retry the other LB; DNS still sends new ones to it."
      + (
        if witnesses == [ ] then
          ""
        else
          " The etcd witness runs on ${concatStringsSep ", " witnesses}: if that is the host down, the database keeps its leader with no etcd vote to spare."
      );
    broadcast = "The LBs stopped sending viewers to it within 1.5 s and its viewers moved to the other broadcasts: the cluster has less room (see ClusterCapacityHigh).";
    ingest = "The broadcasts pull from the other ingest and publishers reconnect through the LBs: one more ingest lost puts every channel on the slate.";
    source = "The ingests switched to the next source by priority, or to the slate if none is left.";
    db = "Patroni does not answer on this db host: if it held the primary, the other db host takes over within the leader lease and chat writes wait meanwhile.";
  };
  roleDownMeaning = {
    lb = "Nobody can enter the site: no viewer gets a broadcast, no publisher reaches an ingest.";
    broadcast = "No viewer can watch: every broadcast is down.";
    ingest = "Nothing is transcoded: every channel stops at the broadcasts.";
    source = "The test-pattern sources are all down: channels without an outside publisher show the slate.";
    db = "Chat and accounts are down: no db host answers.";
  };

  hostRules = concatMap (role: [
    (rule "HostDown" {
      expr = ''up{job="${role}"} == 0'';
      for = thresholds.hostDownFor;
      severity = "warning";
      labels = { inherit role; };
      summary = "${role} {{ $labels.host }} is down";
      description = "Prometheus cannot read {{ $labels.host }}'s metrics. ${hostDownMeaning.${role}}";
    })
    (rule "RoleDown" {
      expr = ''sum(up{job="${role}"}) == 0'';
      for = "30s";
      severity = "critical";
      labels = { inherit role; };
      summary = "every ${role} host is down";
      description = roleDownMeaning.${role};
    })
  ]) roles;

  # Usable room: free slots of broadcasts an LB would choose (a draining or not-live broadcast's
  # slots are not), the most any LB sees per broadcast (each LB subtracts its own recent
  # assignments).
  usableRoom = "sum(max by (broadcast) (lb_broadcast_free_viewers * lb_broadcast_eligible))";
  capacityUsedPercent = "100 * sum(broadcast_viewers) / (sum(broadcast_viewers) + ${usableRoom})";
  # The targets of `job` that Prometheus reads, their host name copied into `label`: the label
  # by which the LBs' metrics name them.
  upAs = job: label: ''label_replace(up{job="${job}"} == 1, "${label}", "$1", "host", "(.*)")'';

  viewerRules = [
    (rule "NoEligibleBroadcast" {
      expr = "max by (host) (lb_broadcast_eligible) == 0";
      for = "15s";
      severity = "critical";
      summary = "LB {{ $labels.host }} has no broadcast to send viewers to";
      description = "Every broadcast is down, cut off from this LB, not live, draining or full: each new viewer gets an error. Check the broadcasts' and ingests' alerts first.";
    })
    (rule "BroadcastNotEligible" {
      # Not chosen although it reports room: not live, draining by itself, or answering as
      # another host. A full broadcast (no room) or one drained in cluster.nix is left out:
      # that is the LB doing its job.
      expr = "lb_broadcast_eligible == 0 and on (host, broadcast) lb_broadcast_free_viewers > 0";
      for = "1m";
      severity = "warning";
      summary = "LB {{ $labels.host }} sends no viewers to {{ $labels.broadcast }}";
      description = "{{ $labels.broadcast }} answers but is not live (it pulls nothing from the ingests), drains on its own, or answers as another host. Its room is lost until it is fixed.";
    })
    (rule "BroadcastUnreachableFromLb" {
      expr = ''sum by (host, broadcast) (rate(lb_polls_total{result="failed"}[1m])) > 0.5 and on (broadcast) ${upAs "broadcast" "broadcast"}'';
      for = "1m";
      severity = "warning";
      summary = "LB {{ $labels.host }} cannot poll {{ $labels.broadcast }}";
      description = "Prometheus reads {{ $labels.broadcast }}, but most of the LB's /status polls fail: a partition, a firewall or a certificate problem between the two. The LB sends no viewers there meanwhile.";
    })
    (rule "IngestUnreachableFromLb" {
      expr = "lb_ingest_eligible == 0 and on (ingest) ${upAs "ingest" "ingest"}";
      for = "1m";
      severity = "warning";
      summary = "LB {{ $labels.host }} does not forward publishers to {{ $labels.ingest }}";
      description = "Prometheus reads {{ $labels.ingest }}, but the LB's polls of it fail: publishers entering through this LB go to the other ingest only.";
    })
    (rule "ClusterCapacityHigh" {
      expr = "${capacityUsedPercent} > ${toString thresholds.capacityPercent}";
      for = "2m";
      severity = "warning";
      summary = "viewers fill {{ $value | humanize }} % of the broadcasts' capacity";
      description = "Viewers over viewers plus the free slots the LBs can still hand out (each broadcast's slots are planned at 80 % of its uplink). Above ${toString thresholds.capacityPercent} % a peak, or the loss of one broadcast, turns viewers away: add a broadcast to cluster.nix or raise an uplink.";
    })
    # What the players themselves report (the page's POST /api/player): their own networks
    # and the time to find another broadcast included.
    (rule "PlayersStalling" {
      expr = "sum by (channel) (rate(broadcast_player_stall_milliseconds_total[5m])) / sum by (channel) (rate(broadcast_player_watch_milliseconds_total[5m])) > 0.01";
      for = "5m";
      severity = "warning";
      summary = "players of {{ $labels.channel }} stall {{ $value | humanizePercentage }} of the time";
      description = "Reported by the players themselves (the page), so it includes what no server sees: the viewers' own networks and the time to find another broadcast.";
    })
    (rule "PlayerLatencyHigh" {
      expr = "histogram_quantile(0.9, sum by (channel, le) (rate(broadcast_player_latency_seconds_bucket[5m]))) > ${toString (5 * cluster.timeline.segmentSeconds)}";
      for = "5m";
      severity = "warning";
      summary = "{{ $labels.channel }} plays {{ $value | humanizeDuration }} behind live for 1 viewer in 10";
      description = "Latency reported by the players (now minus PROGRAM-DATE-TIME at the play head): beyond five segments players fell behind the live edge after stalls and do not catch up.";
    })
  ];

  ingestRules = [
    (rule "IngestOnSlate" {
      expr = ''sum by (host, channel) (rate(ingest_segments_total{kind="slate"}[2m])) > 0 unless sum by (host, channel) (rate(ingest_segments_total{kind="live"}[2m])) > 0'';
      for = "1m";
      severity = "warning";
      summary = "{{ $labels.host }} shows the slate on {{ $labels.channel }}";
      description = "Every segment of {{ $labels.channel }} on {{ $labels.host }} was the slate for minutes. ingest_publishers_connected tells why: 0, nobody publishes (sources down, OBS stopped); more, the media does not make it into live segments (transcoder, clocks).";
    })
    (rule "TranscoderRestarting" {
      expr = "sum by (host, channel) (increase(ingest_ffmpeg_restarts_total[10m])) >= ${toString thresholds.transcoderRestartsIn10m}";
      severity = "warning";
      summary = "{{ $labels.host }}'s transcoder for {{ $labels.channel }} keeps crashing";
      description = "ffmpeg died {{ $value | humanize }} times in 10 minutes; each time the slate fills in until it runs again. Look at the host's journal (streaming-ingest) for ffmpeg's last words.";
    })
    (rule "TranscoderStalling" {
      expr = "sum by (host, channel) (increase(ingest_transcoder_stalls_total[10m])) >= ${toString thresholds.transcoderStallsIn10m}";
      severity = "warning";
      summary = "{{ $labels.host }}'s transcoder for {{ $labels.channel }} keeps hanging";
      description = "The ingest killed a transcoder that stopped making parts {{ $value | humanize }} times in 10 minutes: usually a CPU too busy for the ladder (a smaller preset or ladder in cluster.nix, or more cores).";
    })
  ];

  chatRules = [
    (rule "ChatDatabasePrimaryFlapping" {
      expr = "max(increase(chat_db_primary_changes_total[1h])) >= ${toString thresholds.chatPrimaryChangesPerHour}";
      severity = "warning";
      summary = "the chat's database primary changed {{ $value | humanize }} times in an hour";
      description = "Each change pauses chat writes for up to the leader lease plus 2 s. Patroni fails over when the primary dies, hangs or loses etcd: look for a flapping db host or etcd member.";
    })
    (rule "ChatAppendsSlow" {
      expr = "histogram_quantile(0.99, sum by (host, le) (rate(chat_append_seconds_bucket[5m]))) > ${toString thresholds.chatAppendP99Seconds}";
      for = "5m";
      severity = "warning";
      summary = "chat messages take {{ $value | humanizeDuration }} to be stored on {{ $labels.host }}";
      description = "The 99th percentile of message appends (over the last 5 minutes, retries through a failover included) stayed above ${toString thresholds.chatAppendP99Seconds} s for 5 minutes: longer than any failover, so the database primary itself is slow or far.";
    })
  ];

  # nix/generate.nix's Patroni setting: a replica further behind may not be promoted.
  maxLagOnFailover = generated.${(head dbHosts).name}.patroni.bootstrap.dcs.maximum_lag_on_failover;
  databaseRules = [
    (rule "DatabaseNoPrimary" {
      expr = ''sum(patroni_primary{job="db"}) == 0'';
      for = "30s";
      severity = "critical";
      summary = "no db host is the PostgreSQL primary";
      description = "Patroni answers but nobody holds the leader key for longer than a failover takes: chat and account writes fail. Check etcd (db hosts and the witness) and Patroni's journal.";
    })
    (rule "DatabaseTwoPrimaries" {
      expr = ''sum(patroni_primary{job="db"}) > 1'';
      for = "30s";
      severity = "critical";
      summary = "{{ $value }} db hosts claim to be the primary";
      description = "Two primaries accept different writes (split brain); acknowledged chat messages may be lost when one is rewound. Find the one without the leader key in etcd and stop its Patroni.";
    })
    (rule "DatabaseNotRunning" {
      expr = ''patroni_postgres_running{job="db"} == 0'';
      for = "1m";
      severity = "warning";
      summary = "PostgreSQL is not running on {{ $labels.host }}";
      description = "Patroni is up but its PostgreSQL is not: this db host cannot take over if the primary fails.";
    })
    (rule "DatabaseReplicaLagging" {
      expr = ''(scalar(max(patroni_xlog_location{job="db"})) - patroni_xlog_replayed_location{job="db"} and on (host) patroni_replica{job="db"} == 1) > ${toString maxLagOnFailover}'';
      for = "2m";
      severity = "warning";
      summary = "replica {{ $labels.host }} is {{ $value | humanize1024 }}B behind the primary";
      description = "Beyond ${toString maxLagOnFailover} bytes (maximum_lag_on_failover) Patroni will not promote it: a primary failure would leave the chat without a database.";
    })
  ]
  ++ (
    if length dbHosts < 2 then
      [ ]
    else
      [
        (rule "DatabaseNoSyncStandby" {
          expr = ''sum(patroni_sync_standby{job="db"}) == 0 and sum(patroni_primary{job="db"}) == 1'';
          for = "2m";
          severity = "warning";
          summary = "the database primary has no synchronous standby";
          description = "The primary accepts writes alone (synchronous_mode without strict): an acknowledged chat message is on one host only, and losing it now loses messages.";
        })
      ]
  );

  # Counters of refusals by a limit (docs/security.md lists each limit), with the label that
  # names the limit or the reason. `capacity`: the refusals of a cap shared by every client,
  # which turn away legitimate users as well.
  refusalCounters = [
    {
      metric = "http_connections_refused_total";
      by = "reason";
      what = "HTTPS connections";
      capacity = ''reason="global"'';
    }
    {
      metric = "http_rate_limited_total";
      by = "limit";
      what = "requests over a rate limit";
      capacity = null;
    }
    {
      metric = "lb_rtmp_refused_total";
      by = "reason";
      what = "RTMP connections at the LBs";
      capacity = ''reason="global"'';
    }
    {
      metric = "ingest_rtmp_refused_total";
      by = "reason";
      what = "RTMP connections at an ingest";
      capacity = ''reason=~"connections|forwarded"'';
    }
    {
      metric = "chat_sockets_refused_total";
      by = "reason";
      what = "chat WebSockets";
      capacity = ''reason="total"'';
    }
    {
      metric = "chat_logins_refused_total";
      by = "reason";
      what = "logins (failed-login throttle)";
      capacity = null;
    }
    {
      metric = "password_checks_refused_total";
      by = "reason";
      what = "password checks (hashing pool busy)";
      capacity = ''reason="busy"'';
    }
  ];

  limitRules =
    map (
      c:
      rule "RefusalsRisingFast" {
        expr = ''sum by (host, role, limit) (label_replace(rate(${c.metric}[5m]), "limit", "$1", "${c.by}", "(.+)")) > ${toString thresholds.refusalsPerSecond}'';
        for = "5m";
        severity = "warning";
        labels.counter = c.metric;
        summary = "{{ $labels.host }} refuses {{ $value | humanize }}/s ${c.what} ({{ $labels.limit }})";
        description = "A limit refuses more than ${toString thresholds.refusalsPerSecond} per second for 5 minutes. A per-address limit: one address (an abuser, or a large NAT worth a higher limit in cluster.nix); a global cap: see CapacityCapReached.";
      }
    ) refusalCounters
    ++ map (
      c:
      rule "CapacityCapReached" {
        expr = "sum by (host, role) (rate(${c.metric}{${c.capacity}}[2m])) > 0";
        for = "1m";
        severity = "warning";
        labels.counter = c.metric;
        summary = "{{ $labels.host }} turns away ${c.what}: a cap for all clients is reached";
        description = "Legitimate clients are refused with the others. Raise the cap in cluster.nix's limits if the host has room (docs/security.md), or add a host of this role.";
      }
    ) (filter (c: c.capacity != null) refusalCounters);


  rules.groups = [
    {
      name = "hosts";
      rules = hostRules;
    }
    {
      name = "viewers";
      rules = viewerRules;
    }
    {
      name = "ingest";
      rules = ingestRules;
    }
    {
      name = "chat";
      rules = chatRules;
    }
    {
      name = "limits";
      rules = limitRules;
    }
  ]
  ++ (
    if dbHosts == [ ] then
      [ ]
    else
      [
        {
          name = "database";
          rules = databaseRules;
        }
      ]
  )
  ;

  # ---- Dashboards ----

  # The Prometheus of the dashboard's `datasource` variable: the provisioned one on a NixOS
  # monitoring host, any Prometheus when the JSON is imported elsewhere.
  datasource = {
    type = "prometheus";
    uid = "\${datasource}";
  };
  refIds = [
    "A"
    "B"
    "C"
    "D"
    "E"
    "F"
    "G"
    "H"
    "I"
    "J"
  ];
  queries = targets: genList (i: (elemAt targets i) // {
    inherit datasource;
    refId = elemAt refIds i;
  }) (length targets);
  query = expr: legendFormat: { inherit expr legendFormat; };

  # One function per panel kind; `width` and `height` are grid units (24 columns) for `layout`.
  timeseries =
    {
      title,
      description,
      targets,
      unit ? "short",
      width ? 12,
    }:
    {
      type = "timeseries";
      inherit title description datasource width;
      height = 8;
      targets = queries targets;
      fieldConfig = {
        defaults = {
          inherit unit;
          custom = {
            lineWidth = 1;
            fillOpacity = 10;
            showPoints = "never";
          };
        };
        overrides = [ ];
      };
      options = {
        legend = {
          showLegend = true;
          displayMode = "table";
          placement = "right";
          calcs = [
            "lastNotNull"
            "max"
          ];
        };
        tooltip = {
          mode = "multi";
          sort = "desc";
        };
      };
    };

  # Up or down per target, green or red.
  upStat =
    { title, description }:
    {
      type = "stat";
      inherit title description datasource;
      width = 24;
      height = 4;
      targets = queries [ (query "up" "{{host}}") ];
      fieldConfig = {
        defaults = {
          mappings = [
            {
              type = "value";
              options = {
                "0" = {
                  text = "down";
                  color = "red";
                };
                "1" = {
                  text = "up";
                  color = "green";
                };
              };
            }
          ];
          color.mode = "fixed";
        };
        overrides = [ ];
      };
      options = {
        colorMode = "background";
        graphMode = "none";
        textMode = "value_and_name";
        justifyMode = "center";
        orientation = "horizontal";
        reduceOptions = {
          calcs = [ "lastNotNull" ];
          fields = "";
          values = false;
        };
      };
    };

  # One number against a limit: green below it, red above.
  gauge =
    {
      title,
      description,
      expr,
      unit,
      limit,
      max,
      width ? 6,
    }:
    {
      type = "gauge";
      inherit title description datasource width;
      height = 8;
      targets = queries [ (query expr "") ];
      fieldConfig = {
        defaults = {
          inherit unit max;
          min = 0;
          thresholds = {
            mode = "absolute";
            steps = [
              {
                color = "green";
                value = null;
              }
              {
                color = "red";
                value = limit;
              }
            ];
          };
        };
        overrides = [ ];
      };
      options = {
        showThresholdMarkers = true;
        reduceOptions = {
          calcs = [ "lastNotNull" ];
          fields = "";
          values = false;
        };
      };
    };

  # Sections of panels, left to right and wrapping at 24 columns, each under a row header.
  layout =
    sections:
    let
      placeSection =
        acc: section:
        let
          placePanel =
            row: panel:
            let
              wraps = row.x + panel.width > 24;
              x = if wraps then 0 else row.x;
              y = if wraps then row.y + row.height else row.y;
            in
            {
              x = x + panel.width;
              inherit y;
              height = if wraps || panel.height > row.height then panel.height else row.height;
              panels = row.panels ++ [
                (
                  removeAttrs panel [
                    "width"
                    "height"
                  ]
                  // {
                    gridPos = {
                      inherit x y;
                      w = panel.width;
                      h = panel.height;
                    };
                  }
                )
              ];
            };
          placed = foldl' placePanel {
            x = 0;
            y = acc.y + 1;
            height = 0;
            panels = [ ];
          } section.panels;
        in
        {
          y = placed.y + placed.height;
          panels = acc.panels ++ [
            {
              type = "row";
              inherit (section) title;
              collapsed = false;
              panels = [ ];
              gridPos = {
                x = 0;
                y = acc.y;
                w = 24;
                h = 1;
              };
            }
          ]
          ++ placed.panels;
        };
      panels =
        (foldl' placeSection {
          y = 0;
          panels = [ ];
        } sections).panels;
    in
    genList (i: (elemAt panels i) // { id = i + 1; }) (length panels);

  dashboard =
    { uid, title, sections }:
    {
      inherit uid title;
      tags = [ "streaming-cluster" ];
      timezone = "utc";
      editable = false;
      schemaVersion = 39;
      version = 1;
      refresh = "10s";
      time = {
        from = "now-1h";
        to = "now";
      };
      templating.list = [
        {
          name = "datasource";
          label = "Prometheus";
          type = "datasource";
          query = "prometheus";
          hide = 0;
        }
      ];
      annotations.list = [ ];
      panels = layout sections;
    };

  overview = dashboard {
    uid = "streaming-cluster-overview";
    title = "Cluster overview";
    sections = [
      {
        title = "Hosts";
        panels = [
          (upStat {
            title = "Hosts up";
            description = "Whether Prometheus reads each host's metrics (db hosts: Patroni's).";
          })
        ];
      }
      {
        title = "Viewers";
        panels = [
          (timeseries {
            title = "Viewers per broadcast";
            description = "Distinct viewers that downloaded a whole segment in the last two segment durations.";
            targets = [ (query "sum by (host) (broadcast_viewers)" "{{host}}") ];
          })
          (timeseries {
            title = "Viewers per channel";
            description = "The same viewers, added up over the broadcasts by the channel they watch.";
            targets = [ (query "sum by (channel) (broadcast_viewers)" "{{channel}}") ];
          })
          (timeseries {
            title = "Egress per broadcast";
            description = "Everything sent to viewers: playlists and segments.";
            unit = "bps";
            targets = [ (query "sum by (host) (rate(broadcast_egress_bytes_total[1m])) * 8" "{{host}}") ];
          })
          (timeseries {
            title = "Egress per channel";
            description = "Which channel fills the uplinks: a viewer of a channel commits its top rendition to its broadcast's uplink.";
            unit = "bps";
            targets = [ (query "sum by (channel) (rate(broadcast_egress_bytes_total[1m])) * 8" "{{channel}}") ];
          })
          (timeseries {
            title = "Players: share of play time stalled, per channel";
            description = "What the pages report (POST /api/player every 10 s): seconds waiting for media over seconds played, the viewers' own networks and failovers included.";
            unit = "percentunit";
            targets = [ (query "sum by (channel) (rate(broadcast_player_stall_milliseconds_total[5m])) / sum by (channel) (rate(broadcast_player_watch_milliseconds_total[5m]))" "{{channel}}") ];
          })
          (timeseries {
            title = "Players: latency behind live, per channel";
            description = "What the pages report: now minus PROGRAM-DATE-TIME at the play head, median and 1 viewer in 10.";
            unit = "s";
            targets = [
              (query "histogram_quantile(0.5, sum by (channel, le) (rate(broadcast_player_latency_seconds_bucket[5m])))" "{{channel}} p50")
              (query "histogram_quantile(0.9, sum by (channel, le) (rate(broadcast_player_latency_seconds_bucket[5m])))" "{{channel}} p90")
            ];
          })
          (timeseries {
            title = "Free viewers per broadcast, at each LB";
            description = "The room each LB sees and balances on: viewers of the top rendition that still fit under 80 % of the uplink, minus its own recent assignments.";
            targets = [ (query "lb_broadcast_free_viewers" "{{broadcast}} at {{host}}") ];
          })
          (timeseries {
            title = "Assignments per second";
            description = "Viewers each LB sends to each broadcast (new or kept by their sticky token), and those it had nowhere to send.";
            targets = [
              (query "sum by (host, broadcast, kind) (rate(lb_assignments_total[1m]))" "{{host}} to {{broadcast}} ({{kind}})")
              (query "sum by (host) (rate(lb_no_broadcast_total[1m]))" "{{host}}: no broadcast")
            ];
          })
          (gauge {
            title = "Capacity used";
            description = "Viewers over viewers plus the free slots of eligible broadcasts (the ClusterCapacityHigh alert).";
            expr = capacityUsedPercent;
            unit = "percent";
            limit = thresholds.capacityPercent;
            max = 100;
          })
          (timeseries {
            title = "Eligible broadcasts at each LB";
            description = "Broadcasts an LB would send a new viewer to.";
            width = 18;
            targets = [ (query "sum by (host) (lb_broadcast_eligible)" "{{host}}") ];
          })
        ];
      }
      {
        title = "Ingest";
        panels = [
          (timeseries {
            title = "Segments per second per ingest";
            description = "Live segments and slate segments made (one per rendition and slot).";
            targets = [ (query "sum by (host, channel, kind) (rate(ingest_segments_total[1m]))" "{{host}} {{channel}} {{kind}}") ];
          })
          (timeseries {
            title = "Late media per second";
            description = "Live media that arrived after its slot was decided (dropped; the slot had the slate or the other source).";
            targets = [ (query "sum by (host, channel) (rate(ingest_segments_late_total[5m]))" "{{host}} {{channel}}") ];
          })
          (timeseries {
            title = "Transcoder restarts and stalls (10 min)";
            description = "ffmpeg crashes, and transcoders killed because they stopped making parts.";
            targets = [
              (query "sum by (host, channel) (increase(ingest_ffmpeg_restarts_total[10m]))" "{{host}} {{channel}} restarts")
              (query "sum by (host, channel) (increase(ingest_transcoder_stalls_total[10m]))" "{{host}} {{channel}} stalls")
            ];
          })
          (timeseries {
            title = "Part delay";
            description = "From the end of a part's media to its publication, per channel over both ingests (5 minutes).";
            unit = "s";
            targets = [
              (query "histogram_quantile(0.5, sum by (channel, le) (rate(ingest_part_delay_seconds_bucket[5m])))" "{{channel}} p50")
              (query "histogram_quantile(0.99, sum by (channel, le) (rate(ingest_part_delay_seconds_bucket[5m])))" "{{channel}} p99")
            ];
          })
          (timeseries {
            title = "Publishers connected";
            description = "Sources, relays and outside publishers connected to each ingest, per channel.";
            width = 24;
            targets = [ (query "ingest_publishers_connected" "{{host}} {{channel}}") ];
          })
        ];
      }
      {
        title = "Chat and database";
        panels = [
          (timeseries {
            title = "Chat appends per second";
            description = "Messages and moderation actions stored, per broadcast.";
            targets = [ (query "sum by (host) (rate(chat_appends_total[1m]))" "{{host}}") ];
          })
          (timeseries {
            title = "Chat append latency";
            description = "From a message taken off its socket to its commit on the primary (retries through a failover included), per broadcast over 5 minutes.";
            unit = "s";
            targets = [
              (query "histogram_quantile(0.5, sum by (host, le) (rate(chat_append_seconds_bucket[5m])))" "{{host}} p50")
              (query "histogram_quantile(0.99, sum by (host, le) (rate(chat_append_seconds_bucket[5m])))" "{{host}} p99")
            ];
          })
          (timeseries {
            title = "Chat connections";
            description = "Open chat WebSockets per broadcast.";
            targets = [ (query "chat_connections" "{{host}}") ];
          })
          (timeseries {
            title = "Database roles";
            description = "Which db host is the primary and which the synchronous standby (Patroni).";
            targets = [
              (query ''patroni_primary{job="db"}'' "{{host}} primary")
              (query ''patroni_sync_standby{job="db"}'' "{{host}} sync standby")
            ];
          })
        ];
      }
      {
        title = "Refusals";
        panels = [
          (timeseries {
            title = "Refusals by limit";
            description = "Connections and requests refused by a limit of cluster.nix (docs/security.md), per host and limit.";
            width = 24;
            targets = map (c: query "sum by (host, ${c.by}) (rate(${c.metric}[5m]))" "{{host}} ${c.what}: {{${c.by}}}") refusalCounters;
          })
        ];
      }
    ];
  };
  # Where Prometheus runs: the address of the host flagged `monitoring = true` (null: none).
  flagged = filter (h: h.monitoring or false) cluster.hosts;
  monitoringAddress =
    if flagged == [ ] then null else (head (filter (h: h.name == (head flagged).name) hosts)).address;
in
{
  inherit prometheus rules monitoringAddress;
  dashboards.cluster-overview = overview;
}
