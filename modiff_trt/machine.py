"""One line that says which machine and runtimes produced a timing (demo report, benchmarks).

Timings on a shared 2-core machine and on a workstation differ by an order of magnitude, so
every number the project prints carries this line.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

RUNTIMES = ("onnxruntime", "openvino")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine() -> str:
    """CPU, cores, load average, Python and the versions of torch and the installed runtimes."""
    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    versions = []
    for package in RUNTIMES:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return (
        f"{cpu_model()}, {os.cpu_count()} cores (load avg {load}), Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {', '.join(versions)}"
    )
