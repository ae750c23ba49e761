# A broadcast edge (crates/broadcast): pulls the ladder from the ingests, serves the page,
# playlists and segments straight to viewers, chat and accounts (PostgreSQL through the db
# hosts' Patroni). Viewers x bitrate is its load: give it file descriptors.
import ./role.nix {
  role = "broadcast";
  options =
    { lib, ... }:
    {
      maxOpenFiles = lib.mkOption {
        type = lib.types.ints.positive;
        default = 262144;
        description = "LimitNOFILE of the service: about two sockets per connected viewer.";
      };
    };
  unit =
    { cfg, me, ... }:
    {
      ports = [ me.ports.https ];
      limitNoFile = cfg.maxOpenFiles;
    };
}
