"""The installed entry points, run as a user runs them: real processes, real signals.

CliRunner calls the Typer app inside pytest's process, so it cannot see a broken console script,
an import that only fails on a fresh machine, or what a signal does to the process. These tests
start `modiff-trt` and `python -m modiff_trt` as subprocesses of the interpreter running pytest.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMANDS = ("demo", "calibrate", "export", "build", "sample", "profile", "inspect", "compare")


def _console_script() -> str:
    """The `modiff-trt` script installed beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name("modiff-trt")
    found = str(beside) if beside.exists() else shutil.which("modiff-trt")
    assert found, "modiff-trt is not installed: run pip install -e '.[test]' first"
    return found


@pytest.mark.parametrize("launcher", ["console-script", "python-m"])
def test_installed_entry_points_print_help_listing_every_command(launcher: str) -> None:
    argv = [_console_script()] if launcher == "console-script" else [sys.executable, "-m", "modiff_trt"]
    result = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout, f"{command} missing from --help"
    assert result.stderr == ""


def _wait_for(predicate, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"exited early: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "timed out waiting for the command to reach the point under test"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_stop_signal_mid_sample_exits_with_one_line_and_leaves_no_temp_folder(tmp_path, signum, code, word) -> None:
    out = tmp_path / "samples"
    argv = [sys.executable, "-m", "modiff_trt", "sample", "-c", "digits", "-n", "20000", "--steps", "50"]
    proc = subprocess.Popen([*argv, "--batch-size", "16", "-o", str(out)], stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(tmp_path.glob(".samples.tmp-*/*")), 240, proc)  # the first batch is written
    returncode, err = _stop(proc, signum)
    assert returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert word in lines[-1] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [], "a stopped sample must leave nothing beside --out"


def test_ctrl_c_while_still_importing_prints_one_line_and_exits_130(tmp_path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # -X importtime writes a line per finished import to stderr: once torch has started importing,
    # the interrupt lands inside the heavy imports, before the CLI exists
    argv = [sys.executable, "-X", "importtime", "-m", "modiff_trt", "sample", "-c", "digits", "-o", str(tmp_path / "o")]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if re.search(r"\|\s+torch\.", line):  # a torch submodule finished importing
            break
    returncode, err = _stop(proc, signal.SIGINT)
    lines = [line for line in err.splitlines() if line.strip() and "import time:" not in line]
    assert returncode == 130, err
    assert lines == ["modiff-trt: interrupted (Ctrl-C); nothing half-written was kept"], err
    assert not (tmp_path / "o").exists()
