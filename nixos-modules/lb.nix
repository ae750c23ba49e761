# The front door (crates/lb): hands each viewer a signed sticky token naming a broadcast and
# redirects there, and forwards publishers' RTMP (1935) and RTMPS (1936, the same certificate,
# which carries the site name) to a live ingest over RTMPS. Stateless apart from its signing key;
# lb1 also carries the etcd witness (etcd.nix, from cluster.nix's etcdWitness flag).
import ./role.nix {
  role = "lb";
  unit =
    { me, ... }:
    {
      ports = [
        me.ports.https
        # The publish address of OBS: plain RTMP for publishers that cannot do TLS, RTMPS.
        me.ports.rtmp
        me.ports.rtmps
      ];
      limitNoFile = 65536;
    };
}
