# Not a module: the systemd unit every role binary runs under, shared by lb.nix, broadcast.nix,
# ingest.nix and source.nix so they stay a few lines each. The unit runs
# `<bin> --config /etc/streaming-cluster/config.json` (crates/core/src/service.rs), reloads on a
# config or certificate change (SIGHUP) and restarts only when the binary itself changes.
{
  config,
  lib,
  pkgs,
}:
{
  role,
  package,
  bin,
  # Extra programs on the unit's PATH (ffmpeg for ingest and source).
  path ? [ ],
  # Ports this role serves, opened when services.streaming-cluster.openFirewall is set.
  ports,
  # Rust-only services can forbid writable+executable memory; ffmpeg keeps the default.
  memoryDenyWriteExecute ? true,
  limitNoFile ? 8192,
  extraServiceConfig ? { },
}:
let
  cfg = config.services.streaming-cluster;
  me = lib.findFirst (h: h.name == cfg.hostName) null cfg.hostConfig.cluster.hosts;
  privilegedPort = lib.any (p: p < 1024) ports;
  acme = cfg.tls.source == "acme";
  acmeUnit = "acme-${me.fqdn}.service";
in
{
  networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall ports;

  systemd.services."streaming-${role}" = {
    description = "streaming-cluster ${role} (${cfg.hostName})";
    wantedBy = [ "multi-user.target" ];
    wants = [ "network-online.target" ] ++ lib.optional acme acmeUnit;
    after = [ "network-online.target" ] ++ lib.optional acme acmeUnit;
    inherit path;
    # A new config (topology change, a host added) or a renewed certificate: SIGHUP, the
    # service re-reads both and keeps its viewers. A new binary: restart.
    reloadTriggers = [ cfg.configFile ];
    # Peers come and go (a db or ingest rebooting): never give up restarting.
    startLimitIntervalSec = 0;
    serviceConfig = {
      ExecStart = "${lib.getExe' package bin} --config /etc/streaming-cluster/config.json";
      ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
      Restart = "on-failure";
      RestartSec = 2;
      # SIGTERM: stop accepting, finish in-flight responses, let ffmpeg children go.
      TimeoutStopSec = 20;

      User = "streaming-cluster";
      Group = "streaming-cluster";
      # The generator's state_dir for deployed hosts: /var/lib/streaming-cluster.
      StateDirectory = "streaming-cluster";
      StateDirectoryMode = "0750";
      WorkingDirectory = "/var/lib/streaming-cluster";
      UMask = "0077";
      LimitNOFILE = limitNoFile;

      # Hardening: read-only system, no privileges beyond binding :443 in production.
      AmbientCapabilities = lib.optional privilegedPort "CAP_NET_BIND_SERVICE";
      CapabilityBoundingSet = if privilegedPort then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
      NoNewPrivileges = true;
      ProtectSystem = "strict";
      ProtectHome = true;
      PrivateTmp = true;
      PrivateDevices = true;
      ProtectClock = true;
      ProtectHostname = true;
      ProtectKernelTunables = true;
      ProtectKernelModules = true;
      ProtectKernelLogs = true;
      ProtectControlGroups = true;
      ProtectProc = "invisible";
      RestrictAddressFamilies = [
        "AF_INET"
        "AF_INET6"
        "AF_UNIX"
        "AF_NETLINK"
      ];
      RestrictNamespaces = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      LockPersonality = true;
      MemoryDenyWriteExecute = memoryDenyWriteExecute;
      RemoveIPC = true;
      SystemCallArchitectures = "native";
      SystemCallFilter = [
        "@system-service"
        "~@privileged"
      ];
    }
    // extraServiceConfig;
  };
}
