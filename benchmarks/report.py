"""Shared by the benchmark scripts: machine description and BENCHMARKS.md section updates.

Each script owns one section between `<!-- NAME:begin -->` and `<!-- NAME:end -->`, so the
scripts can be re-run independently without clobbering each other's tables.
"""

from __future__ import annotations

import re
import shlex
import sys
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
