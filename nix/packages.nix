# The Rust workspace built with crane: one shared dependency build, one package per binary, and
# the Rust checks (clippy, rustfmt, tests). Called from flake.nix; needs nixpkgs and crane, so it
# is evaluated only where Nix can build (nothing here runs on our development machines).
{
  pkgs,
  crane,
  agenix,
}:
let
  inherit (pkgs) lib;
  craneLib = crane.mkLib pkgs;
  root = ../.;

  # Only what `cargo build` reads: Rust sources and manifests, the SQL migrations embedded by
  # `sqlx::migrate!`, sqlx offline query data if any, and the viewer page embedded by the
  # broadcast (rust-embed). cluster.nix and nix/ stay out, so editing the host list does not
  # rebuild the binaries.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (craneLib.fileset.commonCargoSources root)
      ../web
      (lib.fileset.fileFilter (file: file.hasExt "sql") ../crates)
      (lib.fileset.fileFilter (file: lib.hasPrefix "query-" file.name && file.hasExt "json") ../crates)
    ];
  };

  # The Rust tests also evaluate the generator on cluster.nix (streamctl's config tests).
  testSrc = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (lib.fileset.fromSource src)
      ../cluster.nix
      ../nix/generate.nix
    ];
  };

  commonArgs = {
    inherit src;
    pname = "streaming-cluster";
    version = (lib.importTOML ../Cargo.toml).workspace.package.version;
    strictDeps = true;
    # No database at build time: sqlx macros (if any) use the committed offline data.
    SQLX_OFFLINE = "true";
  };

  # Dependencies of the whole workspace, built once and shared by every package and check.
  cargoArtifacts = craneLib.buildDepsOnly commonArgs;

  # ffmpeg (headless: x264, AAC, freetype for drawtext) and the DejaVu font the test pattern
  # and the slate burn in. The NixOS units set PATH themselves; the wrapper is for running the
  # binary by hand (`nix run .#source -- --config ...`).
  ffmpeg = pkgs.ffmpeg-headless;
  fontsConf = pkgs.makeFontsConf { fontDirectories = [ pkgs.dejavu_fonts ]; };

  binary =
    {
      crate,
      bin,
      description,
      runtimeTools ? [ ],
    }:
    craneLib.buildPackage (
      commonArgs
      // {
        inherit cargoArtifacts;
        pname = bin;
        cargoExtraArgs = "--locked -p ${crate} --bin ${bin}";
        # The tests run once for the workspace, in checks.tests.
        doCheck = false;
        nativeBuildInputs = lib.optionals (runtimeTools != [ ]) [ pkgs.makeWrapper ];
        postInstall = lib.optionalString (runtimeTools != [ ]) ''
          wrapProgram $out/bin/${bin} \
            --prefix PATH : ${lib.makeBinPath runtimeTools} \
            --set-default FONTCONFIG_FILE ${fontsConf}
        '';
        passthru = { inherit ffmpeg; };
        meta = {
          inherit description;
          mainProgram = bin;
          license = lib.licenses.mit;
          platforms = lib.platforms.linux;
        };
      }
    );

  packages = {
    lb = binary {
      crate = "streaming-lb";
      bin = "lb";
      description = "streaming-cluster front door: signed sticky tokens, redirects to a broadcast";
    };
    broadcast = binary {
      crate = "streaming-broadcast";
      bin = "broadcast";
      description = "streaming-cluster edge: viewer page, HLS from memory, chat and accounts";
    };
    ingest = binary {
      crate = "streaming-ingest";
      bin = "ingest";
      description = "streaming-cluster ingest: RTMP(S) in, ffmpeg ladder, HLS origin";
      runtimeTools = [ ffmpeg ];
    };
    source = binary {
      crate = "streaming-source";
      bin = "source";
      description = "streaming-cluster test pattern publisher";
      runtimeTools = [ ffmpeg ];
    };
    streamctl = binary {
      crate = "streaming-streamctl";
      bin = "streamctl";
      description = "streaming-cluster operator CLI, local runner and viewer/chat simulators";
    };
  };

  checks = {
    clippy = craneLib.cargoClippy (
      commonArgs
      // {
        inherit cargoArtifacts;
        cargoClippyExtraArgs = "--workspace --all-targets -- --deny warnings";
      }
    );

    fmt = craneLib.cargoFmt { inherit (commonArgs) src pname version; };

    # `cargo test` without --include-ignored: the end-to-end tests (a whole local cluster,
    # PostgreSQL, a browser) are #[ignore]d and run by scripts/test.sh outside Nix. The
    # generator tests call nix-instantiate, which gets a private store under $TMPDIR.
    tests = craneLib.cargoTest (
      commonArgs
      // {
        inherit cargoArtifacts;
        src = testSrc;
        cargoTestExtraArgs = "--workspace";
        nativeBuildInputs = [ pkgs.nix ];
        preCheck = ''
          export HOME=$TMPDIR
          export NIX_STORE_DIR=$TMPDIR/nix/store
          export NIX_STATE_DIR=$TMPDIR/nix/var/nix
          export NIX_LOG_DIR=$TMPDIR/nix/var/log/nix
          export NIX_CONF_DIR=$TMPDIR/nix/etc
          mkdir -p $NIX_STORE_DIR $NIX_STATE_DIR $NIX_LOG_DIR $NIX_CONF_DIR
        '';
      }
    );
  };
in
{
  inherit
    craneLib
    packages
    checks
    ffmpeg
    ;

  devShell = craneLib.devShell {
    packages = [
      pkgs.ffmpeg # with ffplay, for looking at the stream
      pkgs.postgresql_15
      pkgs.patroni
      pkgs.etcd
      pkgs.chromium
      pkgs.nix
      pkgs.age
      pkgs.openssl
      pkgs.jq
      pkgs.nixfmt
      # The agenix CLI, to create and edit secrets/*.age (secrets/README.md).
      (pkgs.callPackage "${agenix}/pkgs/agenix.nix" { })
    ];
  };
}
