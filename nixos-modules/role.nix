# The role modules lb.nix, broadcast.nix, ingest.nix and source.nix, each made from what sets
# its role apart so that their files hold only that. Shared here: the `enable` and `package`
# options and the unit `streaming-<role>`, which runs
# `<role> --config /etc/streaming-cluster/config.json` (crates/core/src/service.rs), reloads on a
# config or certificate change (SIGHUP) and restarts only when the binary itself changes.
#
# `options` gets { lib, pkgs }; `unit` and `config` get { lib, pkgs, top, cfg, me,
# firewallBackend }: top is services.streaming-cluster, cfg the role's own options, me this host
# in the generated config, firewallBackend networking.firewall.backend (for internal-ports.nix).
{
  # lb, broadcast, ingest or source: names the options, the unit, the binary and the package.
  role,
  # The role's options besides enable and package.
  options ? _: { },
  # The unit's specifics: the arguments of `service` below.
  unit,
  # Anything else the role sets on its hosts.
  config ? _: { },
}:
flake:
# Not `{ config, ... }`: that name is the role's own config above.
nixos@{ lib, pkgs, ... }:
let
  top = nixos.config.services.streaming-cluster;
  cfg = top.${role};
  me = lib.findFirst (h: h.name == top.hostName) null top.hostConfig.cluster.hosts;
  args = {
    inherit lib pkgs top cfg me;
    firewallBackend = nixos.config.networking.firewall.backend;
  };
  # With ACME: start on the placeholder certificate, never wait for the order (acme-deps.nix).
  acmeDeps = lib.optionalAttrs (top.tls.source == "acme") (import ./acme-deps.nix me.fqdn);

  service =
    {
      # What the role serves, opened when services.streaming-cluster.openFirewall is set.
      ports,
      # Extra programs on the unit's PATH (ffmpeg for ingest and source).
      path ? [ ],
      # Rust-only services can forbid writable+executable memory; ffmpeg keeps the default.
      memoryDenyWriteExecute ? true,
      limitNoFile ? 8192,
    }:
    let
      privilegedPort = lib.any (p: p < 1024) ports;
    in
    {
      networking.firewall.allowedTCPPorts = lib.mkIf top.openFirewall ports;

      systemd.services."streaming-${role}" = {
        description = "streaming-cluster ${role} (${top.hostName})";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ] ++ acmeDeps.wants or [ ];
        after = [ "network-online.target" ] ++ acmeDeps.after or [ ];
        inherit path;
        # A new config (topology change, a host added) or a renewed certificate: SIGHUP, the
        # service re-reads both and keeps its viewers. A new binary: restart.
        reloadTriggers = [ top.configFile ];
        # Peers come and go (a db or ingest rebooting): never give up restarting.
        startLimitIntervalSec = 0;
        serviceConfig = {
          ExecStart = "${lib.getExe' cfg.package role} --config /etc/streaming-cluster/config.json";
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
        };
      };
    };
in
{
  options.services.streaming-cluster.${role} = {
    enable = lib.mkEnableOption "the ${role} role (on by default on hosts whose cluster.nix role is ${role})";
    package = lib.mkOption {
      type = lib.types.package;
      default = flake.packages.${pkgs.stdenv.hostPlatform.system}.${role};
      defaultText = lib.literalExpression "self.packages.\${system}.${role}";
      description = "Package providing the `${role}` binary.";
    };
  }
  // options { inherit lib pkgs; };

  config = lib.mkIf (top.enable && cfg.enable) (
    lib.mkMerge [
      (service (unit args))
      (config args)
    ]
  );
}
