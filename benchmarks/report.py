"""Shared by the benchmark scripts: machine description, BENCHMARKS.md section updates and
`modiff-trt` commands timed in a child process.

Each script owns one section between `<!-- NAME:begin -->` and `<!-- NAME:end -->`, so the
scripts can be re-run independently without clobbering each other's tables.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# modiff-trt benchmarks\n\nEvery table below was written by the script named in it; re-run the command to refresh it.\n"


def machine() -> str:
    """One line: CPU model, cores, load, Python/torch/runtime versions."""
    from modiff_trt.machine import describe_machine

    return describe_machine()


def command_line() -> str:
    return "python " + shlex.join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the `name` section of BENCHMARKS.md with `body`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


@dataclass
class TimedRun:
    """A finished `modiff-trt` child process: peak RSS (bytes), wall clock (h:mm:ss), its output."""

    peak_rss: int
    wall: str
    output: str


def run_modiff(args: list[str]) -> TimedRun:
    """Run `modiff-trt ARGS` under `/usr/bin/time -v`: the peak RSS is the whole command's,
    loading included. Exits with the child's stderr when it fails."""
    run = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "modiff_trt", *args], capture_output=True, text=True, check=False
    )
    text = " ".join((run.stdout + run.stderr).split())
    if run.returncode != 0:
        raise SystemExit(f"modiff-trt {shlex.join(args)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    return TimedRun(rss, wall, text)
