# Unit tests of the alert rules of nix/monitoring.nix, for `promtool test rules` (its JSON is a
# valid test file: scripts/check-monitoring.sh writes it beside alerts.rules.json and runs it).
# Series are sampled every 5 s, the rules evaluated every 5 s, as prometheus.yml does.
#
# promtool compares annotations too; they come from the rules themselves, their label templates
# filled in here, so these tests are about when an alert fires and with which labels.
let
  inherit (builtins)
    attrNames
    concatMap
    filter
    head
    map
    mapAttrs
    replaceStrings
    ;
  monitoring = import ../../nix/monitoring.nix { };
  rules = concatMap (g: g.rules) monitoring.rules.groups;

  ruleOf =
    alert: role: head (filter (r: r.alert == alert && (r.labels.role or null) == role) rules);

  # One firing alert: the series' labels plus the rule's own, annotations as Prometheus fills them.
  firing =
    {
      alert,
      role ? null,
      labels,
      value ? "",
    }:
    let
      rule = ruleOf alert role;
      all = labels // rule.labels;
      names = attrNames all;
      fill =
        replaceStrings
          (map (k: "{{ $labels.${k} }}") names ++ [ "{{ $value | humanize }}" "{{ $value | humanizePercentage }}" ])
          (map (k: all.${k}) names ++ [ value value ]);
    in
    {
      exp_labels = all;
      exp_annotations = mapAttrs (_: fill) rule.annotations;
    };

  target = job: host: {
    inherit job host;
    role = job;
    instance = "${host}.streaming-cluster.test:8443";
  };
  # A series in promtool's notation: name{label="value",...}.
  series =
    name: labels: values:
    {
      series = "${name}{${
        builtins.concatStringsSep "," (map (k: "${k}=\"${labels.${k}}\"") (attrNames labels))
      }}";
      inherit values;
    };
  # What LB `lb` reports about broadcast `b`.
  lbView =
    lb: b: free: eligible:
    [
      (series "lb_broadcast_free_viewers" (target "lb" lb // { broadcast = b; }) "${free}x40")
      (series "lb_broadcast_eligible" (target "lb" lb // { broadcast = b; }) "${eligible}x40")
    ];
in
{
  rule_files = [ "alerts.rules.json" ];
  evaluation_interval = "5s";
  tests = [
    {
      name = "a broadcast down longer than the `for` fires HostDown, a healthy one does not";
      interval = "5s";
      input_series = [
        (series "up" (target "broadcast" "broadcast1") "0x40")
        (series "up" (target "broadcast" "broadcast2") "1x40")
      ];
      alert_rule_test = [
        {
          eval_time = "30s";
          alertname = "HostDown";
          exp_alerts = [ ];
        }
        {
          eval_time = "2m";
          alertname = "HostDown";
          exp_alerts = [
            (firing {
              alert = "HostDown";
              role = "broadcast";
              labels = target "broadcast" "broadcast1";
            })
          ];
        }
        {
          eval_time = "2m";
          alertname = "RoleDown";
          exp_alerts = [ ];
        }
      ];
    }
    {
      name = "viewers above 80 % of the broadcasts' capacity fire ClusterCapacityHigh";
      interval = "5s";
      input_series = [
        (series "broadcast_viewers" (target "broadcast" "broadcast1") "40x40")
        (series "broadcast_viewers" (target "broadcast" "broadcast2") "45x40")
      ]
      ++ concatMap (lb: lbView lb "broadcast1" "10" "1" ++ lbView lb "broadcast2" "5" "1") [
        "lb1"
        "lb2"
      ];
      alert_rule_test = [
        {
          eval_time = "3m";
          alertname = "ClusterCapacityHigh";
          exp_alerts = [
            (firing {
              alert = "ClusterCapacityHigh";
              labels = { };
              value = "85";
            })
          ];
        }
      ];
    }
    {
      # 10 s of play per 10 s on two broadcasts; one channel's players stall 0.5 s of it (5 %),
      # the other's never.
      name = "players that report 5 % of their time stalled fire PlayersStalling for their channel only";
      interval = "5s";
      input_series = concatMap (b: [
        (series "broadcast_player_watch_milliseconds_total" (target "broadcast" b // { channel = "test"; }) "0+5000x80")
        (series "broadcast_player_stall_milliseconds_total" (target "broadcast" b // { channel = "test"; }) "0+250x80")
        (series "broadcast_player_watch_milliseconds_total" (target "broadcast" b // { channel = "backstage"; }) "0+5000x80")
        (series "broadcast_player_stall_milliseconds_total" (target "broadcast" b // { channel = "backstage"; }) "0+0x80")
      ]) [ "broadcast1" "broadcast2" ];
      alert_rule_test = [
        {
          eval_time = "6m";
          alertname = "PlayersStalling";
          exp_alerts = [
            (firing {
              alert = "PlayersStalling";
              labels = { channel = "test"; };
              value = "5%";
            })
          ];
        }
      ];
    }
    {
      name = "viewers well within capacity fire nothing";
      interval = "5s";
      input_series = [
        (series "broadcast_viewers" (target "broadcast" "broadcast1") "10x40")
        (series "broadcast_viewers" (target "broadcast" "broadcast2") "10x40")
      ]
      ++ lbView "lb1" "broadcast1" "40" "1"
      ++ lbView "lb1" "broadcast2" "40" "1";
      alert_rule_test = [
        {
          eval_time = "3m";
          alertname = "ClusterCapacityHigh";
          exp_alerts = [ ];
        }
      ];
    }
    {
      name = "a broadcast with room the LB does not choose fires BroadcastNotEligible, a full one does not";
      interval = "5s";
      input_series =
        lbView "lb1" "broadcast1" "12" "0" # not live
        ++ lbView "lb1" "broadcast2" "20" "1" # healthy
        ++ lbView "lb1" "broadcast3" "0" "0"; # full
      alert_rule_test = [
        {
          eval_time = "2m";
          alertname = "BroadcastNotEligible";
          exp_alerts = [
            (firing {
              alert = "BroadcastNotEligible";
              labels = target "lb" "lb1" // {
                broadcast = "broadcast1";
              };
            })
          ];
        }
      ];
    }
    {
      name = "an ingest making only slate fires IngestOnSlate, one with live segments does not";
      interval = "5s";
      input_series =
        let
          segments =
            host: kind: values:
            series "ingest_segments_total" (target "ingest" host // { inherit kind; channel = "test"; }) values;
        in
        [
          (segments "ingest1" "slate" "0+3x40")
          (segments "ingest2" "slate" "0+1x40")
          (segments "ingest2" "live" "0+2x40")
        ];
      alert_rule_test = [
        {
          eval_time = "3m";
          alertname = "IngestOnSlate";
          exp_alerts = [
            (firing {
              alert = "IngestOnSlate";
              labels = {
                host = "ingest1";
                channel = "test";
              };
            })
          ];
        }
      ];
    }
  ];
}
