"""The process boundary of `modiff-trt`: a signal ends it with one line and a conventional exit code.

This module imports nothing heavy on purpose. The console script and `python -m modiff_trt` both
start here, so Ctrl-C while torch, onnxruntime or OpenVINO are still importing is handled like
Ctrl-C during sampling. SIGINT and SIGTERM (a scheduler's kill, torchrun stopping its workers)
are raised as `Stopped`, a BaseException: no `except Exception` swallows it, the CLI framework
does not turn it into its own "Aborted!", and every `finally` runs, so an interrupted `sample` or
`export` leaves no temp folder beside `--out`.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_WHAT = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "terminated (SIGTERM)"}


class Stopped(BaseException):
    """A stop signal, raised wherever the main thread is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def main() -> None:
    """Console-script entry point: the Typer app; a stop signal exits 128 + its number."""
    for signum in _WHAT:
        signal.signal(signum, _raise_stopped)
    try:
        from modiff_trt.cli import app

        app()
    except Stopped as stop:
        sys.stderr.write(f"modiff-trt: {_WHAT[stop.signum]}; nothing half-written was kept\n")
        sys.exit(128 + stop.signum)
