# A small stand-in for nixpkgs with the same shape as far as flake.nix uses it. Every
# package is a derivation that cannot be built, carrying `stub` (what it is and the
# arguments it was made from) so that nix/check-flake.nix can inspect the outputs.
# `versions` sets nixpkgs' Python package versions, to exercise flake.nix's overrides.
{
  versions ? { },
}:
let
  lib = import ./lib.nix;
  systems = [
    "x86_64-linux"
    "aarch64-linux"
  ];
  defaultVersions = {
    # Older than pyproject.toml's floors, as in nixpkgs at the time of writing.
    grpcio = "1.78.0";
    grpcio-health-checking = "1.78.0";
    grpcio-reflection = "1.78.0";
    grpcio-tools = "1.78.0";
    protobuf = "6.33.1";
    protobuf7 = null; # null: nixpkgs without a protobuf7 attribute
    apsw = "3.51.2.0";
    python-dotenv = "1.2.1";
    sdnotify = "0.3.2";
    nats-py = "2.10.0";
    prometheus-client = "0.23.1";
    setuptools = "80.9.0";
    hypothesis = "6.140.0";
    cryptography = "46.0.1";
    pytest = "8.4.2";
    pytest-timeout = "2.4.0";
  };
  v = defaultVersions // versions;

  pkgsFor =
    system:
    let
      fake =
        name: stub:
        derivation {
          inherit name system;
          builder = "/bin/sh";
          args = [
            "-c"
            "echo 'offline stub of nixpkgs: nothing here can be built' >&2; exit 1"
          ];
        }
        // {
          inherit stub;
        };

      mkPyPkg =
        args:
        fake "python3.11-${args.pname}-${args.version}" {
          kind = "python-package";
          inherit args;
        }
        // {
          inherit (args) pname version;
          overridePythonAttrs =
            f: mkPyPkg (args // (if builtins.isFunction f then f args else f));
        };

      basePythonPackages =
        final:
        builtins.mapAttrs (
          attr: version:
          mkPyPkg {
            pname = if attr == "protobuf7" then "protobuf" else attr;
            inherit version;
          }
        ) (lib.filterAttrs (_: version: version != null) v)
        // {
          fetchPypi =
            args:
            fake "${args.pname}-${args.version}.tar.gz" {
              kind = "fetchPypi";
              inherit args;
            };
          buildPythonApplication =
            args:
            fake "${args.pname}-${args.version}" {
              kind = "buildPythonApplication";
              inherit args;
            }
            // {
              inherit (args) pname version meta;
            };
        };

      mkPython =
        packageOverrides:
        let
          base = basePythonPackages final;
          final = base // packageOverrides final base;
        in
        fake "python3-3.11.14" { kind = "python"; }
        // {
          version = "3.11.14";
          pkgs = final;
          override =
            {
              self ? null,
              packageOverrides ? (_: _: { }),
            }:
            mkPython packageOverrides;
          withPackages =
            f:
            fake "python3-3.11.14-env" {
              kind = "python-env";
              packages = f final;
            };
        };
    in
    {
      inherit lib system;
      python3 = mkPython (_: _: { });
      mkShell =
        args:
        fake "nix-shell" {
          kind = "mkShell";
          inherit args;
        };
      runCommand =
        name: env: script:
        fake name {
          kind = "runCommand";
          inherit env script;
        };
      dockerTools.buildLayeredImage =
        args:
        fake "docker-image-${args.name}.tar.gz" {
          kind = "buildLayeredImage";
          inherit args;
        };
    };
in
{
  inherit lib;
  legacyPackages = lib.genAttrs systems pkgsFor;
}
