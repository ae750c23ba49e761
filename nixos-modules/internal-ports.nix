# Ports of the database layer (PostgreSQL, Patroni's REST API, etcd) open only to the cluster
# hosts that need them, never to everyone: the rules for the iptables and the nftables firewall
# backend, each set only under its own backend. `backend` is config.networking.firewall.backend,
# `open` a list of { port; from = [ address ... ]; }.
#
# Only under its own backend: nixpkgs' nftables firewall asserts that extraCommands is empty
# ("extraCommands is incompatible with the nftables based firewall"), so setting both options,
# as this file did, made every host with such rules fail to evaluate with
# networking.nftables.enable = true (found by scripts/check-nix.sh, section 8). The firewalld
# backend reads neither option: these rules do not exist there.
lib: backend: open: {
  # iptables: run just before the final refuse rule of the nixos-fw chain.
  extraCommands = lib.mkIf (backend == "iptables") (
    lib.concatMapStrings (
      rule:
      lib.concatMapStrings (address: ''
        iptables -w -A nixos-fw -p tcp -s ${address} --dport ${toString rule.port} -j nixos-fw-accept
      '') rule.from
    ) open
  );
  # nftables: appended to the input-allow chain.
  extraInputRules = lib.mkIf (backend == "nftables") (
    lib.concatMapStrings (
      rule:
      lib.optionalString (rule.from != [ ]) ''
        ip saddr { ${lib.concatStringsSep ", " rule.from} } tcp dport ${toString rule.port} accept
      ''
    ) open
  );
}
