"""Peak memory, wall time and file sizes of `modiff-trt export` on full-size configs (issue 21).

Each export runs in a fresh process under `/usr/bin/time -v` (random weights), so the peak RSS
is the whole command's, model building included; the memory pre-check's estimate is read from
its log. Static scales come from a short calibration per (weight bits, modulation), made once
in `--workdir` and reused (`--cali-n 1 --steps 2`: the scales' quality is not the point here).
Heavy: run one config at a time on a quiet machine, SD v1 alone.

    python benchmarks/export_memory.py --configs ddim-cifar10 ldm-churches ldm-bedrooms
    python benchmarks/export_memory.py --configs sd-v1 --variants modiff-w8a8-fp16-trt modiff-w8a8-fp32-trt
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

from report import command_line, load, machine, markdown_table, run_modiff, write_section

from modiff_trt.export.manifest import load_manifest
from modiff_trt.memory import footprint
from modiff_trt.models import load_config

GB, MB = 10**9, 10**6


class Variant(NamedTuple):
    weight_bits: int
    modulate: bool
    float_format: str
    target: str

    @property
    def name(self) -> str:
        return f"{'modiff' if self.modulate else 'plain'}-w{self.weight_bits}a8-{self.float_format}-{self.target}"


VARIANTS = {
    v.name: v
    for v in (
        Variant(8, True, "fp16", "trt"),
        Variant(8, True, "fp32", "trt"),
        Variant(4, True, "fp16", "trt"),
        Variant(8, False, "fp16", "trt"),
        Variant(8, True, "fp32", "ort-cpu"),
    )
}


def calibration(config: str, variant: Variant, workdir: Path) -> Path:
    """The short calibration this variant's scales come from, made once per (bits, modulation)."""
    out = workdir / f"{config}-w{variant.weight_bits}a8-{'modiff' if variant.modulate else 'plain'}.safetensors"
    if not out.is_file():
        context = ["--random-context"] if load_config(config).context_shape else []
        modulate = "--modulate" if variant.modulate else "--no-modulate"
        run_modiff(
            ["calibrate", "-c", config, "--random-weights", *context, "--cali-n", "1", "--steps", "2", modulate]
            + ["--weight-bits", str(variant.weight_bits), "--act-bits", "8", "--device", "cpu", "-o", str(out)]
        )
    return out


def state_bytes(export: Path) -> tuple[int, int]:
    """MoDiff state per image (guidance's two samples counted) in fp32 and fp16: a_hat + o_hat of every layer."""
    manifest = load_manifest(export)
    elements = sum(math.prod(layer.a_hat_shape) + math.prod(layer.o_hat_shape) for layer in manifest.layers)
    per_image = elements * manifest.export.state_batch_multiplier
    return 4 * per_image, 2 * per_image


def measure(config: str, variant: Variant, workdir: Path, keep: bool) -> list[str]:
    cal = calibration(config, variant, workdir)
    out = workdir / f"{config}-{variant.name}"
    shown = ["export", "-c", config, "--random-weights", "--calibration", "CAL"]
    shown += ["--float", variant.float_format, "--target", variant.target]
    before = load()
    run = run_modiff([*shown[:5], str(cal), *shown[6:], "-o", str(out)])
    estimate = re.search(r"export on cpu: estimated peak ([\d.]+) GB", run.output)
    graphs = sum(f.stat().st_size for f in out.glob("*.onnx"))
    data = sum(f.stat().st_size for f in out.glob("*.onnx.data"))
    fp32, fp16 = state_bytes(out) if variant.modulate else (0, 0)
    if not keep:
        shutil.rmtree(out)
    return [
        config,
        variant.name,
        f"{run.peak_rss / GB:.2f} GB",
        f"{estimate.group(1)} GB" if estimate else "-",
        run.wall,
        f"{graphs / MB:.1f} MB",
        f"{data / MB:.0f} MB" if data else "-",
        f"{fp32 / 2**20:,.0f} / {fp16 / 2**20:,.0f} MiB" if variant.modulate else "-",
        f"{before} / {load()}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["ddim-cifar10", "ldm-churches", "ldm-bedrooms", "sd-v1"])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--workdir", type=Path, help="keeps the calibrations between runs (default: a temp folder)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the exports in --workdir (full_size_step.py reads one)"
    )
    parser.add_argument("--section", default="issue21-export")
    o = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = o.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [measure(c, VARIANTS[v], workdir, o.keep) for c in o.configs for v in o.variants]
    params = ", ".join(f"{c} {footprint(load_config(c), 1).params / 1e6:.0f} M" for c in o.configs)
    table = markdown_table(
        [
            "config",
            "variant",
            "peak RSS",
            "pre-check estimate",
            "wall",
            "graphs",
            "external data",
            "state per image fp32 / fp16",
            "load avg before / after",
        ],
        rows,
    )
    write_section(
        o.section,
        "### Export: peak RSS, wall time and file sizes\n\n"
        f"Command: `{command_line()}`  \nMachine: {machine()}.\n\n"
        "Each row is one `modiff-trt export -c CONFIG --random-weights --calibration CAL --float F --target T` "
        "process under `/usr/bin/time -v` (peak RSS: its maximum resident set, GB = 10^9 bytes), CAL a "
        "`--cali-n 1 --steps 2` calibration of the same bits and modulation. Parameters: "
        f"{params}. Graphs: the `.onnx` files; external data: their `.onnx.data` weights (written when "
        "a model's weights pass 256 MiB). State: a_hat + o_hat of every layer per image (SD: two "
        "samples under guidance). Wall times follow the machine's load.\n\n" + table,
    )
    print(table)


if __name__ == "__main__":
    main()
