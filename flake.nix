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
  };

  outputs =
    {
      self,
      nixpkgs,
      crane,
      agenix,
    }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      inherit (nixpkgs) lib;

      # THE host list: one nixosConfiguration per entry.
      cluster = import ./cluster.nix;

      rust = import ./nix/packages.nix { inherit pkgs crane agenix; };

      failoverTest = pkgs.testers.runNixOSTest (import ./vm-tests/failover.nix { inherit self; });

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

      checks.${system} = rust.packages // rust.checks // { vm-failover = failoverTest; };

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
      };

      devShells.${system}.default = rust.devShell;

      formatter.${system} = pkgs.nixfmt;
    };
}
