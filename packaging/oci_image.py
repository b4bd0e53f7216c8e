"""Write, check and unpack SMQ's OCI image layout archive (standard library only).

  python3 packaging/oci_image.py write OUT.tar --version V --revision R --epoch E \\
      [--app-uid U] amd64=ROOT arm64=ROOT
      One image per ROOT (a root file system, one layer each) and an index holding
      them; the bytes depend only on the roots' contents and the arguments.
  python3 packaging/oci_image.py check ARCHIVE
      Exit 1 unless ARCHIVE is a layout as `write` makes it (every digest and size,
      both platforms, the config SMQ's images need); prints each image's sizes.
  python3 packaging/oci_image.py extract ARCHIVE ARCH DIR
      Unpack ARCH's root file system into DIR (owners kept: run as root).

The archive (what podman load, skopeo copy oci-archive:... and docker load >= 25 read):

  oci-layout                      {"imageLayoutVersion": "1.0.0"}
  index.json                      one descriptor: the image index, named smq:<version>
  blobs/sha256/<index>            linux/amd64 and linux/arm64 (v8) image manifests
  blobs/sha256/<manifest>, <config>, <layer> (tar+gzip) per image

Reproducible: tar entries sorted by name, owner 0:0 (the data directory: the app's
user), every mtime the epoch, gzip without file name and with mtime 0, JSON with sorted
keys and no spaces.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PLATFORMS = {
    "amd64": {"architecture": "amd64", "os": "linux"},
    "arm64": {"architecture": "arm64", "os": "linux", "variant": "v8"},
}
PORT = 8097
DATA = "/data"
ENTRYPOINT = ["/opt/smq/bin/smq"]
# The published source distribution (pyproject.toml: smq-queue); --source overrides it.
SOURCE = "https://pypi.org/project/smq-queue/"
LICENSES = "MIT"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def labels(version: str, revision: str, epoch: int, source: str = SOURCE) -> dict[str, str]:
    """The org.opencontainers.image.* annotations, on configs and manifests alike."""
    return {
        "org.opencontainers.image.title": "smq",
        "org.opencontainers.image.description": "SMQ: a small durable gRPC message queue server",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.source": source,
        "org.opencontainers.image.licenses": LICENSES,
        "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)),
    }


def image_config(
    arch: str,
    diff_id: str,
    version: str,
    revision: str,
    epoch: int,
    app_uid: int,
    source: str = SOURCE,
) -> dict[str, Any]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    return {
        **PLATFORMS[arch],
        "created": created,
        "config": {
            "User": f"{app_uid}:{app_uid}",
            "Entrypoint": ENTRYPOINT,
            "Env": [
                "PATH=/opt/smq/bin:/usr/bin:/bin",
                f"DB_PATH={DATA}/smq.db",
                "LANG=C.UTF-8",
                "PYTHONUNBUFFERED=1",
                "PYTHONDONTWRITEBYTECODE=1",  # compiled at build time; the root may be read-only
            ],
            "WorkingDir": DATA,
            "ExposedPorts": {f"{PORT}/tcp": {}},
            "Volumes": {DATA: {}},
            "StopSignal": "SIGTERM",
            "Labels": labels(version, revision, epoch, source),
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "packaging/build-oci"}],
    }


def layer_tar(root: Path, epoch: int, owners: dict[str, int]) -> bytes:
    """ROOT as an uncompressed tar: sorted, fixed owners and mtimes, no device nodes."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(paths):
            full = root / rel
            st = full.lstat()
            info = tarfile.TarInfo(rel)
            info.mtime = epoch
            info.mode = stat.S_IMODE(st.st_mode)
            owner = next(
                (uid for top, uid in owners.items() if rel == top or rel.startswith(top + "/")), 0
            )
            info.uid = info.gid = owner
            info.uname = info.gname = ""
            if stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(full)
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                with open(full, "rb") as f:
                    tar.addfile(info, f)
            else:
                raise SystemExit(f"oci_image: {full}: not a file, directory or symlink")
    return raw.getvalue()


def gzipped(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


class Layout:
    """Blobs by digest, then written as one tar (entries sorted, fixed metadata)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
        d = digest(data)
        self.blobs[d] = data
        return {"mediaType": media_type, "digest": d, "size": len(data), **extra}

    def write(self, path: Path, index: dict[str, Any], epoch: int) -> None:
        files = {
            "oci-layout": canonical({"imageLayoutVersion": "1.0.0"}),
            "index.json": canonical(index),
        }
        for d, data in self.blobs.items():
            files["blobs/sha256/" + d.split(":", 1)[1]] = data
        dirs = ["blobs", "blobs/sha256"]
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted([*dirs, *files]):
                info = tarfile.TarInfo(name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "", ""
                if name in files:
                    info.mode, info.size = 0o644, len(files[name])
                    tar.addfile(info, io.BytesIO(files[name]))
                else:
                    info.mode, info.type = 0o755, tarfile.DIRTYPE
                    tar.addfile(info)
        os.replace(tmp, path)


def write(
    out: Path,
    roots: dict[str, Path],
    version: str,
    revision: str,
    epoch: int,
    app_uid: int,
    source: str = SOURCE,
) -> None:
    layout = Layout()
    annotations = labels(version, revision, epoch, source)
    manifests = []
    for arch in sorted(roots):
        tar = layer_tar(roots[arch], epoch, {DATA.lstrip("/"): app_uid})
        layer = layout.add(LAYER, gzipped(tar))
        config = layout.add(
            CONFIG,
            canonical(image_config(arch, digest(tar), version, revision, epoch, app_uid, source)),
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config,
            "layers": [layer],
            "annotations": annotations,
        }
        manifests.append(layout.add(MANIFEST, canonical(manifest), platform=PLATFORMS[arch]))
    image_index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": manifests,
        "annotations": annotations,
    }
    name = f"smq:{version}"
    top = layout.add(
        INDEX,
        canonical(image_index),
        annotations={
            "org.opencontainers.image.ref.name": name,  # podman load, skopeo
            "io.containerd.image.name": f"docker.io/library/{name}",  # docker load (containerd)
        },
    )
    layout.write(out, {"schemaVersion": 2, "mediaType": INDEX, "manifests": [top]}, epoch)


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def blob(files: dict[str, bytes], desc: dict[str, Any], problems: list[str]) -> bytes:
    data = files.get("blobs/sha256/" + desc["digest"].split(":", 1)[1], b"")
    if digest(data) != desc["digest"] or len(data) != desc["size"]:
        problems.append(f"blob {desc['digest']}: missing, or digest/size differ")
    return data


def check(path: Path) -> list[str]:
    """Problems with the archive at PATH (none: it is as `write` makes it); prints sizes."""
    files = read_archive(path)
    problems: list[str] = []
    if json.loads(files.get("oci-layout", b"{}")).get("imageLayoutVersion") != "1.0.0":
        problems.append("oci-layout missing or not 1.0.0")
    top = json.loads(files.get("index.json", b"{}"))
    if len(top.get("manifests", [])) != 1 or top["manifests"][0].get("mediaType") != INDEX:
        return [*problems, "index.json must hold one image index"]
    ref = top["manifests"][0].get("annotations", {}).get("org.opencontainers.image.ref.name", "")
    if not ref.startswith("smq:"):
        problems.append(f"index.json: ref.name {ref!r} is not smq:<version>")
    index = json.loads(blob(files, top["manifests"][0], problems) or b"{}")
    found = {}
    for desc in index.get("manifests", []):
        arch = desc.get("platform", {}).get("architecture")
        found[arch] = desc.get("platform")
        try:
            check_image(files, desc, arch, problems)
        except (ValueError, KeyError, OSError, EOFError, tarfile.TarError) as exc:
            problems.append(f"{arch}: unreadable: {exc!r}")
    if found != PLATFORMS:
        problems.append(f"platforms {found} are not {PLATFORMS}")
    return problems


def check_image(
    files: dict[str, bytes], desc: dict[str, Any], arch: str, problems: list[str]
) -> None:
    """Append what is wrong with the image DESC names to PROBLEMS; print its sizes."""
    manifest = json.loads(blob(files, desc, problems) or b"{}")
    config = json.loads(blob(files, manifest["config"], problems) or b"{}")
    layers = manifest.get("layers", [])
    if manifest.get("mediaType") != MANIFEST or len(layers) != 1 or layers[0]["mediaType"] != LAYER:
        problems.append(f"{arch}: manifest is not one gzip layer")
        return
    tar = gzip.decompress(blob(files, layers[0], problems))
    if config.get("rootfs", {}).get("diff_ids") != [digest(tar)]:
        problems.append(f"{arch}: diff_id does not match the layer")
    problems += [f"{arch}: {p}" for p in check_config(config, arch)]
    with tarfile.open(fileobj=io.BytesIO(tar)) as layer:
        names = set(layer.getnames())
    for needed in ("opt/smq/bin/smq", "usr/bin/python3.11", "data", "etc/passwd"):
        if needed not in names:
            problems.append(f"{arch}: {needed} missing from the layer")
    print(
        f"{arch}: layer {layers[0]['size'] / 1e6:.1f} MB compressed, {len(tar) / 1e6:.1f} MB "
        f"unpacked, {len(names)} entries; manifest {desc['digest'][:19]}"
    )


def check_config(config: dict[str, Any], arch: str) -> list[str]:
    problems = []
    c = config.get("config", {})
    if {k: config.get(k) for k in PLATFORMS[arch]} != PLATFORMS[arch]:
        problems.append("config's platform differs from the index's")
    if c.get("Entrypoint") != ENTRYPOINT:
        problems.append(f"Entrypoint {c.get('Entrypoint')}")
    if f"DB_PATH={DATA}/smq.db" not in c.get("Env", []):
        problems.append("Env lacks DB_PATH=/data/smq.db")
    if c.get("Volumes") != {DATA: {}} or c.get("ExposedPorts") != {f"{PORT}/tcp": {}}:
        problems.append(f"Volumes {c.get('Volumes')} / ExposedPorts {c.get('ExposedPorts')}")
    if c.get("User", "0").split(":")[0] in ("", "0", "root"):
        problems.append(f"User {c.get('User')!r} is root")
    want = {"version", "revision", "source", "licenses"}
    have = {
        k.rsplit(".", 1)[1]
        for k, v in c.get("Labels", {}).items()
        if v and k.startswith("org.opencontainers.image.")
    }
    if want - have:
        problems.append(f"labels missing: {sorted(want - have)}")
    return problems


def images(files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """Each platform's manifest in an archive's files (architecture -> manifest)."""
    problems: list[str] = []
    top = json.loads(files["index.json"])["manifests"][0]
    index = json.loads(blob(files, top, problems))
    found = {
        d["platform"]["architecture"]: json.loads(blob(files, d, problems))
        for d in index["manifests"]
    }
    if problems:
        raise SystemExit("; ".join(problems))
    return found


def image_configs(path: Path) -> dict[str, dict[str, Any]]:
    """Each platform's image config in the archive at PATH (architecture -> config)."""
    files = read_archive(path)
    return {arch: json.loads(blob(files, m["config"], [])) for arch, m in images(files).items()}


def extract(path: Path, arch: str, dest: Path) -> None:
    files = read_archive(path)
    layer = blob(files, images(files)[arch]["layers"][0], [])
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        # (our own archive: owners, modes and symlinks as they are; filter= exists from 3.11.4)
        trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, numeric_owner=True, **trusted)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("out", type=Path)
    w.add_argument("roots", nargs="+", help="ARCH=ROOT")
    w.add_argument("--version", required=True)
    w.add_argument("--revision", required=True)
    w.add_argument("--epoch", type=int, required=True)
    w.add_argument("--app-uid", type=int, default=10001)
    w.add_argument("--source", default=SOURCE)
    c = sub.add_parser("check")
    c.add_argument("archive", type=Path)
    e = sub.add_parser("extract")
    e.add_argument("archive", type=Path)
    e.add_argument("arch", choices=sorted(PLATFORMS))
    e.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "write":
        roots = dict(item.split("=", 1) for item in args.roots)
        write(
            args.out,
            {a: Path(r) for a, r in roots.items()},
            args.version,
            args.revision,
            args.epoch,
            args.app_uid,
            args.source,
        )
        return 0
    if args.command == "extract":
        extract(args.archive, args.arch, args.dest)
        return 0
    problems = check(args.archive)
    for problem in problems:
        print("problem:", problem)
    print(f"{args.archive}: {'OK' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
