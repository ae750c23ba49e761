# Ports of the database layer (PostgreSQL, Patroni's REST API, etcd) open only to the cluster
# hosts that need them, never to everyone: the rules for either firewall backend (each backend
# reads only its own option). `open` is a list of { port; from = [ address ... ]; }.
lib: open: {
  # iptables: run just before the final refuse rule of the nixos-fw chain.
  extraCommands = lib.concatMapStrings (
    rule:
    lib.concatMapStrings (address: ''
      iptables -w -A nixos-fw -p tcp -s ${address} --dport ${toString rule.port} -j nixos-fw-accept
    '') rule.from
  ) open;
  # nftables: appended to the input-allow chain.
  extraInputRules = lib.concatMapStrings (
    rule:
    lib.optionalString (rule.from != [ ]) ''
      ip saddr { ${lib.concatStringsSep ", " rule.from} } tcp dport ${toString rule.port} accept
    ''
  ) open;
}
