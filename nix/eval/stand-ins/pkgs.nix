# Additions to the shared stand-in pkgs for the stand-ins of this folder: the packages their
# mkPackageOption calls name, runCommand and the tools of the VM test's material, and pkgs.formats.ini's type (nixpkgs pkgs/pkgs-lib/formats.nix:
# `attrsOf (iniSection atom)`, atom = an INI atom or, with listToValue, a non-empty list of them).
{ lib, pkgs }:
let
  t = lib.types;
  package = name: pkgs.writeText name "" // { meta.mainProgram = name; };
  singleIniAtom =
    t.nullOr (t.oneOf [
      t.bool
      t.int
      t.float
      t.str
    ])
    // {
      description = "INI atom (null, bool, int, float or string)";
    };
in
{
  prometheus = package "prometheus";
  grafana = package "grafana";
  # The VM test's material (vm-tests/test-material.nix): nixpkgs' runCommand (name, env,
  # buildCommand; pkgs/build-support/trivial-builders) and the tools it runs. The build command's
  # text is read (so that its interpolations evaluate) and dropped, like writeText's.
  runCommand =
    name: env: buildCommand:
    builtins.seq (builtins.stringLength buildCommand) (builtins.seq (builtins.length (env.nativeBuildInputs or [ ])) (package name));
  openssl = package "openssl";
  openssh = package "openssh";
  pgbackrest = package "pgbackrest";
  formats = pkgs.formats // {
    ini =
      {
        listToValue ? null,
        ...
      }:
      let
        atom =
          if listToValue != null then t.either singleIniAtom (t.nonEmptyListOf singleIniAtom) else singleIniAtom;
      in
      {
        type = t.attrsOf (t.attrsOf atom);
        generate = name: value: builtins.seq (builtins.toJSON value) (pkgs.writeText name "");
      };
  };
}
