"""Peak memory and seconds per UNet call of `modiff-trt calibrate` on full-size configs (issue 21).

Each config is calibrated in a fresh process under `/usr/bin/time -v` (random weights; random
context for SD), so the peak RSS is the whole command's, loading included. The row also gives
the memory pre-check's estimate (from the command's log) and the report the file records:
seconds per UNet call (wall, and this process's CPU time, which other jobs on a shared machine
do not inflate). Heavy: SD v1 is 860M parameters; run it alone.

    python benchmarks/calibration_memory.py                          # sd-v1, --cali-n 1 --steps 2
    python benchmarks/calibration_memory.py --configs ldm-churches sd-v1 --steps 3
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from report import command_line, load, machine, markdown_table, run_modiff, write_section

from modiff_trt.calibrators import load_calibration
from modiff_trt.memory import footprint
from modiff_trt.models import load_config

GB = 10**9


def measure(config: str, cali_n: int, steps: int, folder: Path) -> list[str]:
    """One table row: calibrate `config` in a child process and read its RSS, log and report."""
    cfg = load_config(config)
    out = folder / f"{config}.safetensors"
    context = ["--random-context"] if cfg.context_shape else []
    shown = ["calibrate", "-c", config, "--random-weights", *context, "--cali-n", str(cali_n), "--steps", str(steps)]
    shown += ["--device", "cpu"]
    args = [*shown, "-o", str(out)]
    before = load()
    run = run_modiff(args)
    rss, wall, text = run.peak_rss, run.wall, run.output
    estimate = re.search(r"estimated peak ([\d.]+) GB", text).group(1)
    report = load_calibration(out).meta["report"]
    calls = re.search(r"(\d+) UNet calls took", text).group(1)
    return [
        config,
        f"{footprint(cfg, 1).params / 1e6:.0f} M",
        f"`modiff-trt {' '.join(shown)}`",
        f"{rss / GB:.2f} GB",
        f"{estimate} GB",
        calls,
        f"{report['seconds_per_unet_call']:.1f}",
        f"{report['cpu_seconds_per_unet_call']:.1f}",
        wall,
        f"{before} / {load()}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["sd-v1"])
    parser.add_argument("--cali-n", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--section", default="issue21-calibration")
    o = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(c, o.cali_n, o.steps, Path(folder)) for c in o.configs]
    table = markdown_table(
        [
            "config",
            "params",
            "command (`-o FILE` left out)",
            "peak RSS",
            "pre-check estimate",
            "UNet calls",
            "s per UNet call",
            "CPU s per UNet call",
            "wall",
            "load avg before / after",
        ],
        rows,
    )
    write_section(
        o.section,
        "### Calibration: peak RSS and seconds per UNet call\n\n"
        f"Command: `{command_line()}`  \nMachine: {machine()}.\n\n"
        "Each row is one `modiff-trt calibrate` process under `/usr/bin/time -v` (peak RSS: its "
        "maximum resident set, GB = 10^9 bytes); a UNet call is one forward of the batch (SD: 1 "
        "trajectory x 2 for guidance). Wall seconds follow the machine's load; CPU seconds are "
        "the process's own (2 threads).\n\n" + table,
    )
    print(table)


if __name__ == "__main__":
    main()
