# deploy-rs's `deploy` flake output, generated from cluster.nix: one node per host, so adding a
# host stays one entry in cluster.nix (docs/deploy.md). Builtins only: flake.nix passes deploy-rs's
# `lib.x86_64-linux.activate.nixos`, and scripts/check-nix.sh (section 4) evaluates the same
# function with a stand-in for it.
#
# One host is deployed, with the rollbacks on, by what `streamctl upgrade --nixos` runs per host:
#   deploy --skip-checks --magic-rollback true --auto-rollback true \
#     --confirm-timeout 30 --activation-timeout 600 '<flake dir>#<host>.system'
{
  cluster,
  nixosConfigurations,
  activateNixos,
  # Who deploy-rs logs in as. root needs nothing more than hosts/site.nix's authorized keys; any
  # other user needs passwordless sudo and `nix.settings.trusted-users` on every host
  # (docs/deploy.md). One run can override it: `deploy --ssh-user <user>`.
  sshUser ? "root",
}:
{
  # Settings for every node (deploy-rs merges profile > node > this level).
  inherit sshUser;
  # The profile belongs to root: /nix/var/nix/profiles/system, activated with
  # switch-to-configuration (with sudo when sshUser is not root).
  user = "root";
  # Never wait for a password nobody types: a missing key fails at once. `deploy --ssh-opts`
  # replaces this list (it does not add to it).
  sshOpts = [
    "-o"
    "BatchMode=yes"
  ];
  # deploy-rs's defaults, written out because streamctl's gates depend on them:
  # autoRollback: a failing switch-to-configuration (a unit that does not start: exit 4)
  # re-activates the previous generation on the host and deploy exits 1;
  autoRollback = true;
  # magicRollback: after activation, the host waits confirmTimeout seconds for deploy to reach it
  # again over a NEW ssh connection; without that confirmation it re-activates the previous
  # generation by itself (a host that lost its network or sshd comes back as it was).
  magicRollback = true;
  confirmTimeout = 30;
  # How long deploy waits for the activation (the `wait` side; deploy-rs's default is 240 s).
  # Too short fails a slow but good activation, which the host then rolls back (no confirmation
  # comes); a db host restarting Patroni and PostgreSQL may take minutes.
  activationTimeout = 600;

  nodes = builtins.listToAttrs (
    map (host: {
      inherit (host) name;
      value = {
        # The same name nix/generate.nix gives the host (its certificate's and the cluster's).
        hostname = "${host.name}.${cluster.site}";
        profiles.system.path = activateNixos nixosConfigurations.${host.name};
      };
    }) cluster.hosts
  );
}
