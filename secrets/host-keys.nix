# Public keys the production secrets are encrypted to (read by secrets/secrets.nix, i.e. by the
# agenix CLI only). EXAMPLE VALUES: replace every key before creating any .age file.
#   admins: people who create and edit secrets (their ~/.ssh/id_ed25519.pub or an age key)
#   hosts:  each host's ssh host key, `ssh-keyscan -t ed25519 <host>` (agenix decrypts with it)
# A host added to cluster.nix needs its key here before `agenix -r` re-encrypts for it:
# scripts/rekey.sh NAME does both (secrets/README.md, "Adding a host").
{
  admins = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEADMINKEYEXAMPLEADMINKEYEXAMPLEADMIN ops@example" # EXAMPLE
  ];
  hosts = {
    lb1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYlb1EXAMPLEHOSTKEYlb1EXAMPLE1"; # EXAMPLE
    lb2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYlb2EXAMPLEHOSTKEYlb2EXAMPLE2"; # EXAMPLE
    broadcast1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYbroadcast1EXAMPLEHOSTKEY1"; # EXAMPLE
    broadcast2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYbroadcast2EXAMPLEHOSTKEY2"; # EXAMPLE
    broadcast3 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYbroadcast3EXAMPLEHOSTKEY3"; # EXAMPLE
    broadcast4 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYbroadcast4EXAMPLEHOSTKEY4"; # EXAMPLE
    db1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYdb1EXAMPLEHOSTKEYdb1EXAMPLE1"; # EXAMPLE
    db2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYdb2EXAMPLEHOSTKEYdb2EXAMPLE2"; # EXAMPLE
    ingest1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYingest1EXAMPLEHOSTKEYing1"; # EXAMPLE
    ingest2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYingest2EXAMPLEHOSTKEYing2"; # EXAMPLE
    source1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYsource1EXAMPLEHOSTKEYsrc1"; # EXAMPLE
    source2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEHOSTKEYsource2EXAMPLEHOSTKEYsrc2"; # EXAMPLE
  };
}
