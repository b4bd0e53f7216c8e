"""README.md's client and CLI sections stay true: its Python examples run, and its shell session
replays with the same output against a real server."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from support import ROOT
from support.servers import clean_env

README = ROOT / "README.md"
MARKER = "<!-- transcript: tests/test_cli_readme.py replays it -->"


def python_examples() -> list[str]:
    """The ```python blocks (not ```python skip ones), in order."""
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.S | re.M)


def transcript() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each `$ ` line of the session."""
    text = README.read_text().split(MARKER, 1)[1]
    block = re.search(r"```console\n(.*?)```", text, re.S).group(1)
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def matches(expected: str, actual: str) -> bool:
    """Equal up to runs of blanks (tabs may become spaces in an editor); `...` is anything."""
    expected, actual = " ".join(expected.split()), " ".join(actual.split())
    return re.fullmatch(re.escape(expected).replace(r"\.\.\.", ".*"), actual) is not None


def test_python_examples_run(start_server, tmp_path: Path) -> None:
    server = start_server()
    examples = python_examples()
    assert len(examples) >= 5
    outputs = []
    for example in examples:
        code = example.replace("8097", str(server.port))
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{example}\n{result.stderr}"
        outputs.append(result.stdout)
    assert "read up to 2501" in outputs[2]
    assert outputs[3].startswith("uploader is at 2501\nuploader: committed 2501, 0 behind\n")
    assert outputs[4].startswith("604800 0\nSMQ 0.1.0: 2501 messages, ")


def test_session_transcript_replays(start_server, tmp_path: Path) -> None:
    server = start_server()
    steps = transcript()
    assert len(steps) >= 10
    # Markers between the outputs; `$?` still sees the previous command's exit code.
    script = "status=0\n" + "".join(f"echo '@@@ {i}'; (exit $status); {command} 2>&1; status=$?\n"
                                    for i, (command, _) in enumerate(steps))
    env = clean_env(SMQ_HOST="localhost", PORT=str(server.port))
    # `smq` is this interpreter's smq, whether or not a console script was installed
    # (under Bazel there is none).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "smq").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m smq "$@"\n')
    (bin_dir / "smq").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    outputs = re.split(r"^@@@ \d+\n", result.stdout.replace(str(server.port), "8097"), flags=re.M)[1:]
    assert len(outputs) == len(steps), result.stdout + result.stderr
    for (command, expected), actual in zip(steps, outputs):
        actual_lines = actual.splitlines()
        assert len(actual_lines) == len(expected) and all(
            matches(e, a) for e, a in zip(expected, actual_lines)), \
            f"$ {command}\nexpected:\n" + "\n".join(expected) + "\nactual:\n" + actual
