{
  description = "streaming-cluster: a highly available live HLS cluster (Rust services, NixOS modules, a 12-node VM test)";

  # Pins in flake.lock (written by hand offline, see docs/nix.md); `nix flake lock` on a
  # networked machine should leave it unchanged.
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";
    # crane's flake has no inputs of its own: nothing to follow.
    crane.url = "github:ipetkov/crane";
    # Not as a flake: its own inputs (nixpkgs, darwin, home-manager) would join the lock. We
    # import modules/age.nix and pkgs/agenix.nix directly.
    agenix = {
      url = "github:ryantm/agenix";
      flake = false;
    };
    # Rolling upgrades (docs/deploy.md): deploy-rs's `deploy` CLI and its `lib.activate.nixos`
    # (magic rollback). Its inputs follow ours; its flake-compat (`flake = false`, read only by
    # its default.nix) stays as deploy-rs's own lock has it.
    deploy-rs = {
      url = "github:serokell/deploy-rs";
      inputs.nixpkgs.follows = "nixpkgs";
      inputs.utils.follows = "flake-utils";
    };
    # Only for deploy-rs to follow (its `utils`): nothing of ours uses it.
    flake-utils.url = "github:numtide/flake-utils";
  };

  outputs =
    {
      self,
      nixpkgs,
      crane,
      agenix,
      deploy-rs,
      flake-utils,
    }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      inherit (nixpkgs) lib;

      # THE host list: one nixosConfiguration per entry.
      cluster = import ./cluster.nix;

      rust = import ./nix/packages.nix { inherit pkgs crane agenix; };

      failoverTest = pkgs.testers.runNixOSTest (import ./vm-tests/failover.nix { inherit self; });

      deployLib = deploy-rs.lib.${system};

      # `nix run .#deploy -- --ca FILE --ops-token-file FILE [HOST... | --role R | --all]`: streamctl's rolling upgrade of real
      # hosts (docs/deploy.md), running deploy-rs for one host at a time between its health gates.
      deployApp = pkgs.writeShellApplication {
        name = "streaming-cluster-deploy";
        runtimeInputs = [
          deploy-rs.packages.${system}.default
          rust.packages.streamctl
          pkgs.openssh
        ];
        text = ''
          # The flake to deploy: $STREAMING_CLUSTER_FLAKE, or else the nearest directory from here
          # up that has a flake.nix (the one `nix run .#deploy` found). deploy-rs evaluates and
          # builds it as it is there, so what is deployed is the checkout, not this app's copy.
          flake="''${STREAMING_CLUSTER_FLAKE:-}"
          if [ -z "$flake" ]; then
            flake=$PWD
            while [ ! -e "$flake/flake.nix" ] && [ "$flake" != / ]; do
              flake=$(dirname "$flake")
            done
            if [ ! -e "$flake/flake.nix" ]; then
              echo "deploy: no flake.nix in $PWD or above: run it from the checkout, or set STREAMING_CLUSTER_FLAKE" >&2
              exit 2
            fi
          fi
          # deploy-rs runs `nix` itself and silently falls back to a non-flake mode when flakes
          # are off in nix.conf (`nix run --extra-experimental-features ...` does not reach it).
          if [ -n "''${NIX_CONFIG:-}" ]; then
            NIX_CONFIG="$NIX_CONFIG"$'\n'
          fi
          export NIX_CONFIG="''${NIX_CONFIG:-}extra-experimental-features = nix-command flakes"
          exec streamctl upgrade --nixos --flake "$flake" "$@"
        '';
      };

      # A real host: its hardware file, the site-wide settings, and the cluster's modules; the
      # role comes from cluster.nix.
      mkHost =
        host:
        lib.nixosSystem {
          modules = [
            self.nixosModules.default
            ./hosts/site.nix
            ./hosts/${host.name}.nix
            {
              nixpkgs.hostPlatform = system;
              networking.hostName = host.name;
              services.streaming-cluster = {
                enable = true;
                hostName = host.name;
                profile = "production";
              };
            }
          ];
        };
    in
    {
      packages.${system} = rust.packages // {
        default = pkgs.symlinkJoin {
          name = "streaming-cluster";
          paths = lib.attrValues rust.packages;
        };
      };

      nixosModules.default = import ./nixos-modules { inherit self agenix; };

      nixosConfigurations = lib.listToAttrs (
        map (host: {
          inherit (host) name;
          value = mkHost host;
        }) cluster.hosts
      );

      # deploy-rs's node per host of cluster.nix (nix/deploy.nix).
      deploy = import ./nix/deploy.nix {
        inherit cluster;
        inherit (self) nixosConfigurations;
        activateNixos = deployLib.activate.nixos;
      };

      # deployChecks: `deploy-schema` (self.deploy against deploy-rs's interface.json) and
      # `deploy-activate` (each profile has its activation scripts); both build every host's
      # system, so a host that does not build fails here rather than halfway through a rollout.
      checks.${system} =
        rust.packages
        // rust.checks
        // { vm-failover = failoverTest; }
        // deployLib.deployChecks self.deploy;

      apps.${system} = {
        # `nix run .#cluster-vm`, then `start_all()`: the twelve hosts and the client with the
        # LB's HTTPS on https://localhost:8443 and a SOCKS5 proxy into the test network on
        # localhost:1080 (docs/nix.md).
        cluster-vm = {
          type = "app";
          program = "${failoverTest.driverInteractive}/bin/nixos-test-driver";
          meta.description = "Interactive driver of the 12-node VM test (local demo)";
        };
        streamctl = {
          type = "app";
          program = lib.getExe rust.packages.streamctl;
          meta.description = "Operator CLI and local cluster runner";
        };
        deploy = {
          type = "app";
          program = lib.getExe deployApp;
          meta.description = "Rolling upgrade of the NixOS hosts, one at a time (docs/deploy.md)";
        };
      };

      devShells.${system}.default = rust.devShell;

      formatter.${system} = pkgs.nixfmt;
    };
}
