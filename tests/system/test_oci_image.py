"""The OCI archive's writer and checker (packaging/oci_image.py), on small fake roots: the
layout podman, skopeo and docker read, the config SMQ's images need, and the same bytes
from the same inputs. Building the real images (root, mmdebstrap, minutes) and running
them (a VM with podman, qemu-user) is packaging/build-oci and packaging/verify-oci,
run by packaging/ci-checks. Also: the Debian pins and the `./dev oci` wiring."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import tarfile
from pathlib import Path

import pytest
from support import ROOT

PACKAGING = ROOT / "packaging"
spec = importlib.util.spec_from_file_location("oci_image", PACKAGING / "oci_image.py")
assert spec and spec.loader
oci_image = importlib.util.module_from_spec(spec)
spec.loader.exec_module(oci_image)
EPOCH = 1_700_000_000


def fake_root(path: Path, arch: str, mtime: int) -> Path:
    for name, text in {
        "opt/smq/bin/smq": "#!/opt/smq/bin/python3.11\n",
        "usr/bin/python3.11": arch,
        "etc/passwd": "smq:x:10001:10001::/data:/usr/sbin/nologin\n",
    }.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
        os.utime(path / name, (mtime, mtime))
    (path / "data").mkdir()
    (path / "usr/bin/python3").symlink_to("python3.11")
    os.chmod(path / "opt/smq/bin/smq", 0o755)
    return path


def build(tmp_path: Path, label: str, mtime: int) -> Path:
    roots = {
        arch: fake_root(tmp_path / f"{label}-{arch}", arch, mtime) for arch in ("arm64", "amd64")
    }
    out = tmp_path / f"{label}.tar"
    oci_image.write(out, roots, "1.2.3", "abc123", EPOCH, 10001)
    return out


def members(archive: Path) -> dict[str, bytes]:
    return oci_image.read_archive(archive)


def test_layout_holds_both_platforms_and_checks_clean(tmp_path, capsys):
    archive = build(tmp_path, "a", mtime=12345)
    assert oci_image.check(archive) == []
    files = members(archive)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (top,) = json.loads(files["index.json"])["manifests"]
    assert top["mediaType"] == oci_image.INDEX
    assert top["annotations"]["org.opencontainers.image.ref.name"] == "smq:1.2.3"
    index = json.loads(files["blobs/sha256/" + top["digest"].split(":")[1]])
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    for name, data in files.items():  # every blob is named by its sha256
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    assert "amd64: layer" in capsys.readouterr().out


def test_config_is_what_a_container_user_needs(tmp_path):
    configs = oci_image.image_configs(build(tmp_path, "a", mtime=1))
    for arch, config in configs.items():
        c = config["config"]
        assert config["architecture"] == arch and config["os"] == "linux"
        assert c["Entrypoint"] == ["/opt/smq/bin/smq"] and "Cmd" not in c
        assert "DB_PATH=/data/smq.db" in c["Env"] and "PYTHONDONTWRITEBYTECODE=1" in c["Env"]
        assert c["Volumes"] == {"/data": {}} and c["ExposedPorts"] == {"8097/tcp": {}}
        assert c["User"] == "10001:10001" and c["WorkingDir"] == "/data"
        labels = c["Labels"]
        assert labels["org.opencontainers.image.version"] == "1.2.3"
        assert labels["org.opencontainers.image.revision"] == "abc123"
        assert labels["org.opencontainers.image.licenses"] == "MIT"
        assert labels["org.opencontainers.image.source"].startswith("https://")
        assert config["created"] == "2023-11-14T22:13:20Z"  # EPOCH, not the build's time


def test_layer_entries_are_sorted_with_fixed_owners_and_times(tmp_path):
    archive = build(tmp_path, "a", mtime=999)
    files = members(archive)
    manifest = oci_image.images(files)["amd64"]
    layer = files["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
    assert layer[3] == 0 and layer[4:8] == b"\0\0\0\0"  # gzip: no name flag, mtime 0
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        infos = tar.getmembers()
    names = [i.name for i in infos]
    assert names == sorted(names)
    assert {i.mtime for i in infos} == {EPOCH}
    owners = {i.name: (i.uid, i.gid) for i in infos}
    assert owners["data"] == (10001, 10001) and owners["opt/smq/bin/smq"] == (0, 0)
    assert {i.uname for i in infos} == {""}
    link = next(i for i in infos if i.name == "usr/bin/python3")
    assert link.issym() and link.linkname == "python3.11"
    assert next(i for i in infos if i.name == "opt/smq/bin/smq").mode == 0o755


def test_same_inputs_give_the_same_bytes(tmp_path):
    """Other file mtimes, another directory, another time of day: the same archive."""
    first = build(tmp_path, "a", mtime=1).read_bytes()
    second = build(tmp_path, "b", mtime=2_000_000_000).read_bytes()
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()


def test_check_names_what_is_wrong(tmp_path):
    archive = build(tmp_path, "a", mtime=1)
    files = members(archive)
    configs = oci_image.image_configs(archive)
    broken = dict(
        configs["arm64"], config=dict(configs["arm64"]["config"], User="0", Entrypoint=["/bin/sh"])
    )
    problems = oci_image.check_config(broken, "arm64")
    assert any("User" in p for p in problems) and any("Entrypoint" in p for p in problems)
    # A blob whose bytes no longer match its digest.
    name = max((n for n in files if n.startswith("blobs/")), key=lambda n: len(files[n]))
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(tampered, "w") as tar:
        for n, data in files.items():
            data = data[:-1] + b"x" if n == name else data
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert any("digest/size differ" in p for p in oci_image.check(tampered))


def test_debian_pins_cover_both_architectures():
    """packaging/oci/debian-packages.txt: ARCH NAME VERSION, the same packages for both,
    CPython 3.11 and libstdc++ (grpcio) among them, no apt."""
    lines = [
        line.split()
        for line in (PACKAGING / "oci/debian-packages.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all(len(parts) == 3 and parts[0] in ("amd64", "arm64") for parts in lines)
    by_arch = {arch: {name for a, name, _ in lines if a == arch} for arch in ("amd64", "arm64")}
    assert by_arch["amd64"] == by_arch["arm64"]
    assert {"python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libc6"} <= by_arch["amd64"]
    assert not by_arch["amd64"] & {"apt", "gcc-12", "cpp-12", "python3-pip"}


def test_dev_oci_runs_the_build_script():
    dev = (ROOT / "dev").read_text()
    assert re.search(r"^\s*oci\)\s+exec packaging/build-oci", dev, re.M)
    ci = (PACKAGING / "ci-checks").read_text()
    assert "packaging/build-oci" in ci and "packaging/verify-oci" in ci


@pytest.mark.parametrize("script", ["build-oci", "verify-oci", "vm-oci-check"])
def test_scripts_are_executable(script):
    assert os.access(PACKAGING / script, os.X_OK)
