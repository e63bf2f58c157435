"""How large the scaled a_hat gets: A = a_hat / s past fp16's exact-integer range (|A| > 2048).

State layout 'scaled' (issue 22) stores a_hat in units of the layer's residual scale s. The
residual codes then add as integers, which fp16 holds exactly up to 2048; past it fp16 spaces
its values 2 apart (4 past 4096), so A rounds by up to one code (two past 4096). This runs the
torch reference of the digits model with the scaled layout in float32 (no rounding) at each
activation width, calibrated as `benchmarks/quality.py` calibrates, and counts the A elements
past 2048 and 4096 over every layer and step of the trajectories -> BENCHMARKS.md `state-range`.

    python benchmarks/state_range.py                  # 512 images, 50 steps, A8/A6/A4
    python benchmarks/state_range.py --num-images 64  # quick
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from report import command_line, machine, markdown_table, write_section

from modiff_trt.engines.torch_backend import load_reference
from modiff_trt.models import load_config
from modiff_trt.models.builtin import builtin_checkpoint
from modiff_trt.pipeline import calibration_files, timed_samples
from modiff_trt.quant import QuantConfig
from modiff_trt.quant.layer import QuantLayer
from modiff_trt.sampling.sampler import make_sampler

FP16_EXACT = 2048  # fp16 holds every integer up to 2^11


class RangeCounter:
    """Forward hooks that count, after every call, the elements of each layer's stored A."""

    def __init__(self) -> None:
        self.total = self.over_2048 = self.over_4096 = 0
        self.peak = 0.0
        self.layers_over: set[str] = set()

    def hook(self, layer: QuantLayer, _args: tuple, _out: torch.Tensor) -> None:
        if layer.a_hat is None or layer.state_unit() is None:
            return
        a = layer.a_hat.abs()
        over = int((a > FP16_EXACT).sum())
        self.total += a.numel()
        self.over_2048 += over
        self.over_4096 += int((a > 2 * FP16_EXACT).sum())
        self.peak = max(self.peak, float(a.max()))
        if over:
            self.layers_over.add(layer.name)


def measure(cfg, ckpt, quant: QuantConfig, cal: Path, num_images: int, sampler) -> RangeCounter:
    """Run the reference with the scaled float32 layout and count A's range."""
    static = QuantConfig(**{**quant.to_dict(), "act_scales": "static"})
    qmodel = load_reference(cfg, ckpt, static, cal).qmodel
    counter = RangeCounter()
    for layer in qmodel.layers.values():
        layer.register_forward_hook(counter.hook)
    timed_samples(qmodel, cfg, num_images, min(num_images, 256), sampler)
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--act-bits", type=int, nargs="+", default=[8, 6, 4])
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg, ckpt = load_config("digits"), builtin_checkpoint("digits")
    sampler = make_sampler(cfg, steps=args.steps)
    quants = [QuantConfig(8, a, state_layout="scaled") for a in args.act_bits]
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="modiff-state-range-") as tmp:
        files = calibration_files(cfg, ckpt, quants, sampler, Path(tmp))
        for quant, cal in zip(quants, files, strict=True):
            c = measure(cfg, ckpt, quant, cal, args.num_images, sampler)
            rows.append(
                [
                    f"W8A{quant.act_bits}",
                    f"{c.total:,}",
                    f"{c.peak:.0f}",
                    f"{c.over_2048 / c.total:.2e}",
                    f"{c.over_4096 / c.total:.2e}",
                    ", ".join(sorted(c.layers_over)) or "-",
                ]
            )
            logging.warning("%s", rows[-1])
    # "\|": a bare "|" in a cell would split the markdown column
    header = ["bits", "A elements seen", r"max \|A\|", r"share \|A\| > 2048", r"share \|A\| > 4096", "layers past 2048"]
    body = (
        "## Range of the scaled a_hat on the embedded digits model (issue 22)\n\n"
        f"Command: `{command_line()}` ({(time.perf_counter() - started) / 60:.1f} min). Machine: {machine()}.\n\n"
        f"{args.num_images} samples, {args.steps} quad DDIM steps, minmax calibration (as `quality.py`). A = a_hat / s "
        "of every layer after every UNet call (warm-up included), counted in float32: past 2048 an fp16 state "
        "rounds A to the nearest even code (one code of error), past 4096 to a multiple of 4.\n\n"
        + markdown_table(header, rows)
    )
    print(body)
    if not args.no_write:
        write_section("state-range", body)


if __name__ == "__main__":
    main()
