{
  # CI only: a stand-in for nixpkgs that needs no network. packaging/check-nix-bazel runs
  #   nix flake check --no-build --override-input nixpkgs path:nix/stub-nixpkgs
  # so that Nix itself checks the flake's outputs for both systems. Nothing is buildable.
  description = "Offline stub of nixpkgs for checking SMQ's flake outputs";
  outputs = { self }: import ./default.nix { };
}
