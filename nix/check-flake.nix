# Offline check of flake.nix's outputs against the nixpkgs stub (CI; no network, no build):
#   nix-instantiate --eval --strict --json --read-write-mode nix/check-flake.nix \
#     --argstr scenario old|new
# "old": nixpkgs' grpcio/protobuf/grpcio-tools are older than ours, so the flake must
# rebuild them from the pinned PyPI sdists; "new": nixpkgs is new enough (protobuf as
# protobuf7), so it must use nixpkgs' own. Fails with a message naming the first broken
# expectation; prints a JSON summary (packaging/check-nix-bazel compares its hashes with
# requirements/dev-hashes.txt).
{
  scenario ? "old",
}:
let
  flake = import ../flake.nix;
  scenarios = {
    old = { };
    new = {
      grpcio = "1.90.0";
      grpcio-health-checking = "1.90.0";
      grpcio-reflection = "1.90.0";
      grpcio-tools = "1.85.1";
      protobuf = "6.33.1";
      protobuf7 = "7.40.0";
    };
  };
  stub = import ./stub-nixpkgs { versions = scenarios.${scenario}; };
  # self as a flake sees it; the tests' source path only needs to be a string here.
  self = outputs // {
    outPath = "/nix/store/00000000000000000000000000000000-source";
  };
  outputs = flake.outputs {
    inherit self;
    nixpkgs = stub;
  };

  systems = [
    "aarch64-linux"
    "x86_64-linux"
  ];
  pyproject = builtins.fromTOML (builtins.readFile ../pyproject.toml);
  upper = builtins.genList (i: builtins.substring i 1 "ABCDEFGHIJKLMNOPQRSTUVWXYZ_.") 28;
  lower = builtins.genList (i: builtins.substring i 1 "abcdefghijklmnopqrstuvwxyz--") 28;
  normalize = builtins.replaceStrings upper lower;
  # "grpcio>=1.85.1" -> { name = "grpcio"; floor = "1.85.1"; }
  parseDep =
    spec:
    let
      m = builtins.match "([A-Za-z0-9_.-]+)>=([0-9.]+)" spec;
    in
    if m == null then
      throw "check-flake: cannot parse dependency '${spec}' of pyproject.toml"
    else
      {
        name = normalize (builtins.elemAt m 0);
        floor = builtins.elemAt m 1;
      };
  wanted = map parseDep pyproject.project.dependencies;
  versionFile = builtins.readFile ../smq/__init__.py;
  version = builtins.head (builtins.match ''.*__version__ = "([^"]+)".*'' versionFile);

  sort = builtins.sort builtins.lessThan;
  str = builtins.unsafeDiscardStringContext;
  names = pkgs: sort (map (p: normalize p.pname) pkgs);
  expect = cond: msg: if cond then true else throw "check-flake (${scenario}): ${msg}";
  attrs = set: sort (builtins.attrNames set);
  same = a: b: a.drvPath == b.drvPath;

  perSystem =
    system:
    let
      pkg = outputs.packages.${system}.default;
      bin = "${str pkg.outPath}/bin/smq";
      app = outputs.apps.${system}.default;
      image = outputs.packages.${system}.oci.stub.args;
      shell = outputs.devShells.${system}.default.stub.args;
      shellEnv = builtins.head shell.packages;
      tests = outputs.checks.${system}.tests.stub;
      deps = pkg.stub.args.dependencies;
      depByName = builtins.listToAttrs (
        map (p: {
          name = normalize p.pname;
          value = p;
        }) deps
      );
      src = pkg.stub.args.src;
      # Python packages the flake rebuilds from a PyPI sdist (runtime and dev shell), once each.
      overridden = builtins.attrValues (
        builtins.listToAttrs (
          map (p: {
            name = normalize p.pname;
            value = p;
          }) (builtins.filter (p: p.stub.args ? src) (deps ++ shellEnv.stub.packages))
        )
      );
      checks = [
        (expect (pkg.stub.kind == "buildPythonApplication") "${system}: default package is not buildPythonApplication")
        (expect (pkg.stub.args.pyproject or false) "${system}: buildPythonApplication without pyproject = true")
        (expect (pkg.pname == pyproject.project.name && pkg.version == version) "${system}: name/version ${pkg.pname} ${pkg.version}")
        (expect (names pkg.stub.args.build-system == [ "setuptools" ]) "${system}: build-system is not setuptools")
        (expect (names deps == sort (map (d: d.name) wanted)) "${system}: dependencies ${toString (names deps)} are not pyproject.toml's")
        (expect (builtins.all (d: builtins.compareVersions depByName.${d.name}.version d.floor >= 0) wanted)
          "${system}: a dependency is older than pyproject.toml's floor"
        )
        (expect (pkg.meta.mainProgram == "smq") "${system}: meta.mainProgram is not smq")
        (expect (builtins.all (m: builtins.pathExists "${src}/smq/${m}") [ "server/app.py" "client/sync.py" "cli/main.py" "forward/main.py" ])
          "${system}: the package source lacks one of smq's packages (server, client, cli, forward)"
        )
        (expect (builtins.pathExists "${src}/smq/_proto/smq_pb2_grpc.py" && builtins.pathExists "${src}/pyproject.toml"
          && builtins.pathExists "${src}/README.md" && !(builtins.pathExists "${src}/tests")
        ) "${system}: the package source lacks smq/_proto, pyproject.toml or README.md, or has more")
        (expect (same outputs.packages.${system}.smq pkg) "${system}: packages.smq is not packages.default")
        (expect (app.type == "app") "${system}: apps.default.type is not \"app\"")
        (expect (str app.program == bin) "${system}: apps.default.program is not ${bin}")
        (expect (outputs.packages.${system}.oci.stub.kind == "buildLayeredImage") "${system}: packages.oci is not dockerTools.buildLayeredImage")
        (expect (map str image.config.Entrypoint == [ bin ]) "${system}: the image's entry point is not ${bin}")
        (expect (attrs image.config.Volumes == [ "/data" ]) "${system}: the image's volume is not /data")
        (expect (builtins.elem "DB_PATH=/data/smq.db" image.config.Env) "${system}: the image's database is not in /data")
        (expect (attrs image.config.ExposedPorts == [ "8097/tcp" ]) "${system}: the image does not expose 8097/tcp")
        (expect (image.name == "smq" && image.tag == version) "${system}: image name/tag")
        # As packaging/build-oci's images (packaging/oci_image.py): a non-root user, the labels.
        (expect (image.config.User == "10001:10001") "${system}: the image's user is not 10001:10001")
        (expect (image.config.Labels."org.opencontainers.image.version" == version
          && image.config.Labels."org.opencontainers.image.licenses" == "MIT"
          && builtins.hasAttr "org.opencontainers.image.revision" image.config.Labels
          && builtins.hasAttr "org.opencontainers.image.source" image.config.Labels)
          "${system}: the image lacks org.opencontainers.image.* labels")
        (expect (shellEnv.stub.kind == "python-env") "${system}: devShells.default has no Python environment")
        (expect (
          names shellEnv.stub.packages == sort (
            map (d: d.name) wanted
            ++ [
              "cryptography"
              "grpcio-tools"
              "hypothesis"
              "pytest"
              "pytest-timeout"
            ]
          )
        ) "${system}: the dev shell's Python lacks runtime or test packages")
        (expect (same outputs.checks.${system}.package pkg) "${system}: checks.package is not the package")
        (expect (tests.kind == "runCommand" && str tests.env.SMQ_TEST_SERVER == bin) "${system}: checks.tests does not test the packaged server")
        (expect (builtins.match ".*python -m pytest[^\n]* tests\n.*" tests.script != null) "${system}: checks.tests does not run pytest on tests/")
        # The tests' Python must find smq: PYTHONPATH is the flake's source (self, a
        # stand-in path here), and that source is this checkout, which holds the package.
        (expect (str (tests.env.PYTHONPATH or "") == str self.outPath
          && builtins.pathExists ../smq/__main__.py && builtins.pathExists ../smq/server/app.py)
          "${system}: checks.tests cannot import smq (PYTHONPATH is not the flake's source)")
        (expect (attrs outputs.devShells.${system} == [ "default" ] && attrs outputs.apps.${system} == [ "default" ]) "${system}: extra apps or dev shells")
      ];
    in
    builtins.deepSeq checks {
      program = str app.program;
      entrypoint = map str image.config.Entrypoint;
      dependencies = builtins.mapAttrs (_: p: p.version) depByName;
      rebuilt_from_pypi = map (p: {
        name = normalize p.pname;
        inherit (p) version;
        sdist = p.stub.args.src.stub.args.pname;
        hash = p.stub.args.src.stub.args.hash;
      }) overridden;
    };

  top = [
    (expect (attrs outputs == [ "apps" "checks" "devShells" "packages" ]) "outputs are ${toString (attrs outputs)}")
    (expect (builtins.all (o: attrs outputs.${o} == systems) [ "apps" "checks" "devShells" "packages" ])
      "every output must cover exactly ${toString systems}"
    )
    (expect (builtins.all (s: attrs outputs.packages.${s} == [ "default" "oci" "smq" ]) systems) "packages are not default, oci, smq")
  ];
  result = {
    inherit scenario version;
    systems = builtins.listToAttrs (
      map (s: {
        name = s;
        value = perSystem s;
      }) systems
    );
  };
  expectations = {
    # Which packages the flake must rebuild from PyPI in each scenario.
    old = [
      "grpcio"
      "grpcio-health-checking"
      "grpcio-reflection"
      "grpcio-tools"
      "protobuf"
    ];
    new = [ ];
  };
  rebuilt = s: sort (map (r: r.name) result.systems.${s}.rebuilt_from_pypi);
in
builtins.deepSeq top (
  builtins.deepSeq (map (
    s:
    expect (
      rebuilt s == expectations.${scenario}
    ) "${s}: rebuilt from PyPI ${toString (rebuilt s)}, expected ${toString expectations.${scenario}}"
  ) systems) result
)
