"""Helpers for reproducible artefacts (standard library only).

  python3 packaging/repro.py normalize-sdist FILE.tar.gz EPOCH
      Rewrite an sdist so its bytes depend only on the files' contents: entries sorted
      by name, every mtime = EPOCH, owner root/root (0/0), modes 0644/0755, gzip header
      without a name and with mtime = EPOCH.
  python3 packaging/repro.py check-zip FILE
      Exit 1 if a zip (wheel, PEX) has entries out of order or timestamps that vary.
"""
from __future__ import annotations

import gzip
import io
import os
import sys
import tarfile
import zipfile


def normalize_sdist(path: str, epoch: int) -> None:
    with tarfile.open(path, "r:gz") as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    members.sort(key=lambda item: item[0].name)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for member, data in members:
            if not (member.isfile() or member.isdir()):
                raise SystemExit(f"normalize-sdist: unexpected entry {member.name} ({member.type!r})")
            member.mtime = epoch
            member.uid = member.gid = 0
            member.uname = member.gname = "root"
            member.mode = 0o755 if member.isdir() or member.mode & 0o111 else 0o644
            member.pax_headers = {}
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    tmp = path + ".tmp"
    with open(tmp, "wb") as out:
        # filename="" keeps the build directory's name out of the gzip header.
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=epoch) as gz:
            gz.write(raw.getvalue())
    os.replace(tmp, path)


def check_zip(path: str) -> int:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    stamps = {info.date_time for info in infos}
    problems = []
    if len(stamps) > 1:
        problems.append(f"{len(stamps)} different timestamps")
    return_code = 1 if problems else 0
    print(f"{path}: {len(infos)} entries, timestamps {sorted(stamps)[:3]}"
          + (f"; problems: {problems}" if problems else ""))
    return return_code


def main(argv: list[str]) -> int:
    if argv[:1] == ["normalize-sdist"] and len(argv) == 3:
        normalize_sdist(argv[1], int(argv[2]))
        return 0
    if argv[:1] == ["check-zip"] and len(argv) == 2:
        return check_zip(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
