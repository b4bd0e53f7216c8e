"""The README's and docs' examples stay true: their Python examples run (README.md and
docs/client.md), and their shell sessions (README.md's five-minute start and
docs/cli.md's session) replay with the same output against a real server."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT
from support.servers import clean_env

MARKER = "<!-- transcript: tests/system/test_cli_readme.py replays it -->"
# Each page with a session, and the fewest `$ ` steps it must have.
SESSIONS = {"README.md": 4, "docs/cli.md": 10}


def python_examples(page: str) -> list[str]:
    """The ```python blocks (not ```python skip ones), in order."""
    return re.findall(r"^```python\n(.*?)^```$", (ROOT / page).read_text(), re.S | re.M)


def transcript(page: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each `$ ` line of the page's session."""
    text = (ROOT / page).read_text().split(MARKER, 1)[1]
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


def run_examples(examples: list[str], port: int, cwd: Path) -> list[str]:
    outputs = []
    for example in examples:
        code = example.replace("8097", str(port))
        result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=clean_env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{example}\n{result.stderr}"
        outputs.append(result.stdout)
    return outputs


def test_readme_python_example_runs(start_server, tmp_path: Path) -> None:
    server = start_server()
    examples = python_examples("README.md")
    assert len(examples) >= 1
    (output,) = run_examples(examples, server.port, tmp_path)
    assert output == "True {'t': 21.5}\n1 {'t': 21.5}\n"


def test_client_page_python_examples_run(start_server, tmp_path: Path) -> None:
    server = start_server()
    examples = python_examples("docs/client.md")
    assert len(examples) >= 6
    outputs = run_examples(examples, server.port, tmp_path)
    assert outputs[1] == "the last at offset 1000\n"  # the Producer, on a topic of its own
    assert "read up to 2501" in outputs[3]
    assert outputs[4].startswith("uploader is at 2501\nuploader: committed 2501, 0 behind\n")
    assert outputs[5].startswith("604800 0\nSMQ 0.1.0: 3501 messages, ")
    assert outputs[6].startswith("listening on ")  # the embedded server
    assert outputs[7] == "100 alerts stored\nthe last ping is at 1100\n"  # the async client


@pytest.mark.parametrize("page", SESSIONS)
def test_session_transcript_replays(page: str, start_server, tmp_path: Path) -> None:
    server = start_server()
    steps = transcript(page)
    assert len(steps) >= SESSIONS[page]
    # Markers between the outputs; `$?` still sees the previous command's exit code.
    script = "status=0\n" + "".join(f"echo '@@@ {i}'; (exit $status); {command} 2>&1; status=$?\n"
                                    for i, (command, _) in enumerate(steps))
    env = clean_env(SMQ_HOST="localhost", PORT=str(server.port))
    # `smq` (on PATH, or .venv/bin/smq as the README's start says after `./dev serve`) is
    # this interpreter's smq, whether or not a console script was installed (under Bazel
    # there is none).
    for bin_dir in (tmp_path / "bin", tmp_path / ".venv" / "bin"):
        bin_dir.mkdir(parents=True)
        (bin_dir / "smq").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m smq "$@"\n')
        (bin_dir / "smq").chmod(0o755)
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    outputs = re.split(r"^@@@ \d+\n", result.stdout.replace(str(server.port), "8097"), flags=re.M)[1:]
    assert len(outputs) == len(steps), result.stdout + result.stderr
    for (command, expected), actual in zip(steps, outputs):
        actual_lines = actual.splitlines()
        assert len(actual_lines) == len(expected) and all(
            matches(e, a) for e, a in zip(expected, actual_lines)), \
            f"$ {command}\nexpected:\n" + "\n".join(expected) + "\nactual:\n" + actual
