{
  description = "SMQ: a small durable message queue server for edge devices (gRPC + SQLite)";

  # No flake.lock is committed yet: it cannot be produced offline. The first `nix flake
  # lock` (or `nix run`) with network access pins a nixos-unstable revision; commit it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];

      version = builtins.head (
        builtins.match ''.*__version__ = "([^"]+)".*'' (builtins.readFile ./smq/__init__.py)
      );

      # The committed generated code (smq/_proto) refuses older runtimes: protobuf checks
      # its version on import and smq_pb2_grpc.py checks grpcio's. Where nixpkgs' package
      # is older than pyproject.toml's floor, it is rebuilt from the PyPI sdist of the
      # version in requirements/runtime.txt (grpcio-tools: the exact generator version of
      # requirements/dev.txt, for the test that regenerates the code). Each hash is the
      # sdist's sha256 from requirements/dev-hashes.txt (packaging/check-nix-bazel checks).
      pins = {
        grpcio = {
          floor = "1.85.1";
          version = "1.85.3";
          sdist = "grpcio";
          hash = "sha256-jhjxXRsJuHce2/WdY0smy+SQO8JXfLZnJkk0pmVeuLQ=";
        };
        grpcio-health-checking = {
          floor = "1.85.1";
          version = "1.85.1";
          sdist = "grpcio_health_checking";
          hash = "sha256-k6XuspJiFllJsy/aqGUF8RAY0bgWE4LuNzqFUwsR0oE=";
        };
        grpcio-reflection = {
          floor = "1.85.1";
          version = "1.85.1";
          sdist = "grpcio_reflection";
          hash = "sha256-oyV/NcyBfjcs/jMLo0EfwMYfI7CalN0tj5EYWVXFUzw=";
        };
        protobuf = {
          floor = "7.35.1";
          version = "7.36.2";
          sdist = "protobuf";
          hash = "sha256-SX0EY/8zFmgdpsC56NBstGXWGrzgC2E6tCImF1ZE0bs=";
        };
        grpcio-tools = {
          floor = "1.85.1";
          exact = true;
          version = "1.85.1";
          sdist = "grpcio_tools";
          hash = "sha256-1vHuIToH3pRiyQ7l3r5KeN/yAwag+zlKZdSLL5T+MaE=";
        };
      };

      satisfies =
        pin: pkg:
        if pin.exact or false then pkg.version == pin.version else !(lib.versionOlder pkg.version pin.floor);

      runtimeDeps =
        ps: with ps; [
          apsw
          grpcio
          grpcio-health-checking
          grpcio-reflection
          protobuf
          python-dotenv
          sdnotify
          nats-py
          prometheus-client
        ];
      # requirements/dev.txt's test tools (pysmq is not in nixpkgs: tests/e2e/test_pysmq.py
      # skips without it, outside CI).
      testDeps =
        ps: with ps; [
          cryptography
          grpcio-tools
          hypothesis
          pytest
          pytest-timeout
        ];

      perSystem =
        pkgs:
        let
          python = pkgs.python3.override {
            self = python;
            packageOverrides =
              final: prev:
              lib.mapAttrs (
                name: pin:
                if satisfies pin prev.${name} then
                  prev.${name}
                else if name == "protobuf" && prev ? protobuf7 && satisfies pin prev.protobuf7 then
                  prev.protobuf7
                else
                  prev.${name}.overridePythonAttrs (_: {
                    inherit (pin) version;
                    src = final.fetchPypi {
                      pname = pin.sdist;
                      inherit (pin) version hash;
                    };
                    # nixpkgs' patches target its own version; only relax exact build pins.
                    patches = [ ];
                    postPatch = ''
                      if [ -f pyproject.toml ]; then
                        sed -i -E 's/"([Cc]ython|setuptools|wheel)[<>=!~][^"]*"/"\1"/g' pyproject.toml
                      fi
                    '';
                  })
              ) pins;
          };
          testPython = python.withPackages (ps: runtimeDeps ps ++ testDeps ps);

          smq = python.pkgs.buildPythonApplication {
            pname = "smq-queue"; # the distribution's name (pyproject.toml); the program is smq
            inherit version;
            pyproject = true;
            src = lib.sourceByRegex ./. [
              "pyproject.toml"
              "README.md"
              "smq(/[a-z_]+)*" # the package and its packages (server, client, cli, ...)
              "smq/.*\\.pyi?"
            ];
            build-system = [ python.pkgs.setuptools ];
            dependencies = runtimeDeps python.pkgs;
            # The test suite starts servers and reads the checkout: checks.*.tests runs it.
            doCheck = false;
            pythonImportsCheck = [
              "smq"
              "smq.server.app"
              "smq.client.sync"
              "smq.cli.main"
              "smq.forward.main"
              "smq._proto.smq_pb2_grpc"
            ];
            meta = {
              description = "Small durable message queue server for edge devices (gRPC + SQLite)";
              license = lib.licenses.mit;
              mainProgram = "smq";
              platforms = systems;
            };
          };
        in
        {
          inherit python testPython smq;

          # A docker-archive tarball for this system (`docker load < result`, `podman load`,
          # `skopeo copy docker-archive:result oci-archive:smq.tar`), configured as the
          # images of `./dev oci` (packaging/build-oci, docs/containers.md): the server as
          # entry point, its database in the /data volume, user 10001, port 8097, the same
          # environment and org.opencontainers.image.* labels. Those are one OCI index for
          # amd64 and arm64 from Debian packages and the PEX's locked wheels, and the ones
          # verified; this one (nixpkgs' Python packages, one architecture) is never built here.
          oci = pkgs.dockerTools.buildLayeredImage {
            name = "smq";
            tag = version;
            fakeRootCommands = ''
              install -d -m 0755 -o 10001 -g 10001 data
              install -d -m 1777 tmp
            '';
            config = {
              Entrypoint = [ "${smq}/bin/smq" ];
              Env = [
                "DB_PATH=/data/smq.db"
                "LANG=C.UTF-8"
                "PYTHONUNBUFFERED=1"
                "PYTHONDONTWRITEBYTECODE=1"
              ];
              WorkingDir = "/data";
              User = "10001:10001";
              ExposedPorts = {
                "8097/tcp" = { };
              };
              Volumes = {
                "/data" = { };
              };
              StopSignal = "SIGTERM";
              Labels = {
                "org.opencontainers.image.title" = "smq";
                "org.opencontainers.image.version" = version;
                "org.opencontainers.image.revision" = self.rev or "dirty";
                "org.opencontainers.image.source" = "https://pypi.org/project/smq-queue/";
                "org.opencontainers.image.licenses" = "MIT";
              };
            };
          };

          devShell = pkgs.mkShell { packages = [ testPython ]; };

          # The test suite against the packaged server (SMQ_TEST_SERVER, tests/support/servers.py).
          tests =
            pkgs.runCommand "smq-tests-${version}"
              {
                nativeBuildInputs = [ testPython ];
                SMQ_TEST_SERVER = "${smq}/bin/smq";
                # testPython holds the dependencies, not smq: the tests import it (and
                # start `python -m smq` servers) from this flake's source.
                PYTHONPATH = "${self}";
              }
              ''
                cp -r ${self} source
                chmod -R u+w source
                cd source
                export HOME=$TMPDIR
                python -m pytest -p no:cacheprovider tests
                touch $out
              '';
        };

      bySystem = lib.genAttrs systems (system: perSystem nixpkgs.legacyPackages.${system});
    in
    {
      packages = lib.mapAttrs (_: s: {
        default = s.smq;
        inherit (s) smq oci;
      }) bySystem;

      # `nix run`: the server on port 8097 with ./dbtest.db, like `./dev serve`.
      apps = lib.mapAttrs (_: s: {
        default = {
          type = "app";
          program = "${s.smq}/bin/smq";
          meta.description = "SMQ server (port 8097, ./dbtest.db; flags as for smq)";
        };
      }) bySystem;

      # `nix develop`: Python with the runtime and test dependencies; from the checkout,
      # `python -m smq` serves and `python -m pytest` runs the suite.
      devShells = lib.mapAttrs (_: s: { default = s.devShell; }) bySystem;

      # `nix flake check`: builds the package and runs the test suite against it.
      checks = lib.mapAttrs (_: s: {
        package = s.smq;
        inherit (s) tests;
      }) bySystem;
    };
}
