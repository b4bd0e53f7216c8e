"""Complete-platform files: how packaging/platforms/*.json were made, and `derive`.

A complete platform is `pex3 interpreter inspect --markers --tags` run on the target
Python. Most of ours come from real interpreters (see packaging/platforms/README.md
and `packaging/make-platforms`). Where no real interpreter could be had here
(CPython 3.12 on aarch64), `derive` builds one from real files:

  tags(V, arch) = tags(V, x86_64) with each x86_64 platform tag mapped to arch,
                  keeping only the platform tags that exist for arch

The interpreter/ABI part of a tag depends only on the Python version, and the set of
platform tags only on the architecture and the glibc version, so the mapping is
learnt from a pair of real inspections of one version (x86_64 and arch, same glibc),
and the method is checked by re-deriving every real arch file we have (`check`).

  python3 packaging/complete_platforms.py derive X86_V.json X86_REF.json ARCH_REF.json OUT.json
  python3 packaging/complete_platforms.py check X86_REF.json ARCH_REF.json [X86_V.json ARCH_V.json ...]
"""
from __future__ import annotations

import json
import sys

DERIVED_NOTE = "derived"


def platform_part(tag: str) -> str:
    return tag.split("-", 2)[2]


def machine(data: dict) -> str:
    return data["marker_environment"]["platform_machine"]


def derive(x86_target: dict, x86_ref: dict, arch_ref: dict) -> dict:
    arch = machine(arch_ref)
    if machine(x86_target) != "x86_64" or machine(x86_ref) != "x86_64":
        raise SystemExit("derive: the first two files must be x86_64 inspections")
    arch_platforms = {platform_part(t) for t in arch_ref["compatible_tags"]}
    ref_platforms = {platform_part(t) for t in x86_ref["compatible_tags"]}
    tags = []
    for tag in x86_target["compatible_tags"]:
        interp, abi, plat = tag.split("-", 2)
        if plat == "any":
            tags.append(tag)
            continue
        if plat not in ref_platforms:
            raise SystemExit(f"derive: {tag}: platform {plat} is not in the x86_64 reference "
                             "(different glibc?); inspect both on the same system")
        mapped = plat.replace("x86_64", arch)
        if mapped in arch_platforms:
            tags.append(f"{interp}-{abi}-{mapped}")
    markers = dict(x86_target["marker_environment"])
    for key in ("platform_machine", "platform_release", "platform_version"):
        markers[key] = arch_ref["marker_environment"][key]
    return {
        "path": f"{DERIVED_NOTE}: python {markers['python_full_version']} x86_64 inspection "
                f"mapped to {arch} (packaging/complete_platforms.py)",
        "compatible_tags": tags,
        "marker_environment": markers,
    }


def same_tags(derived: dict, real: dict) -> list[str]:
    """Differences between a derived file's tags and a real one's, ignoring manylinux
    levels newer than the derived file's glibc (a newer system only adds those)."""
    derived_tags = derived["compatible_tags"]
    newest = max((int(t.split("manylinux_2_")[1].split("_")[0])
                  for t in derived_tags if "manylinux_2_" in t), default=0)

    def within(tag: str) -> bool:
        if "manylinux_2_" not in tag:
            return True
        return int(tag.split("manylinux_2_")[1].split("_")[0]) <= newest

    real_tags = [t for t in real["compatible_tags"] if within(t)]
    if derived_tags == real_tags:
        return []
    missing = [t for t in real_tags if t not in derived_tags]
    extra = [t for t in derived_tags if t not in real_tags]
    return [f"missing {t}" for t in missing[:10]] + [f"extra {t}" for t in extra[:10]] or [
        "same tags, different order"]


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(argv: list[str]) -> int:
    if argv[:1] == ["derive"] and len(argv) == 5:
        out = derive(load(argv[1]), load(argv[2]), load(argv[3]))
        with open(argv[4], "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        print(f"{argv[4]}: {len(out['compatible_tags'])} tags", file=sys.stderr)
        return 0
    if argv[:1] == ["check"] and len(argv) >= 3 and len(argv) % 2 == 1:
        x86_ref, arch_ref = load(argv[1]), load(argv[2])
        pairs = [(argv[1], argv[2])] + list(zip(argv[3::2], argv[4::2]))
        failed = False
        for x86_path, real_path in pairs:
            problems = same_tags(derive(load(x86_path), x86_ref, arch_ref), load(real_path))
            verdict = "OK, identical tags" if not problems else "; ".join(problems)
            print(f"derive({x86_path}) vs real {real_path}: {verdict}")
            failed |= bool(problems)
        return 1 if failed else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
