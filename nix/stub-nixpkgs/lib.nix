# The few nixpkgs lib functions flake.nix uses, with nixpkgs' semantics.
let
  removePrefix =
    prefix: s:
    let
      n = builtins.stringLength prefix;
    in
    if builtins.substring 0 n s == prefix then
      builtins.substring n (builtins.stringLength s - n) s
    else
      s;
in
{
  inherit removePrefix;
  genAttrs =
    names: f:
    builtins.listToAttrs (
      map (name: {
        inherit name;
        value = f name;
      }) names
    );
  mapAttrs = builtins.mapAttrs;
  filterAttrs =
    pred: set:
    builtins.listToAttrs (
      builtins.concatMap (
        name:
        if pred name set.${name} then
          [
            {
              inherit name;
              value = set.${name};
            }
          ]
        else
          [ ]
      ) (builtins.attrNames set)
    );
  versionOlder = a: b: builtins.compareVersions b a == 1;
  licenses.mit = {
    spdxId = "MIT";
    shortName = "mit";
  };
  # As lib.sources.sourceByRegex: keep the paths (relative to src) that match a regex.
  sourceByRegex =
    src: regexes:
    builtins.path {
      name = "source";
      path = src;
      filter =
        path: type:
        let
          relPath = removePrefix (toString src + "/") (toString path);
        in
        builtins.any (re: builtins.match re relPath != null) regexes;
    };
}
