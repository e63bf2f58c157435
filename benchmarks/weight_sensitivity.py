"""Which units limit 4-bit weights on the digits model: W4 one unit at a time, and 8-bit end layers.

Reconstruction can only lower a unit's error on its grid; a layer whose grid is too coarse for
any rounding caps the whole model. This quantizes the weights of ONE reconstruction unit to W4
(nearest, MSE grid; the rest float) and scores the samples, then scores a calibration file's
W4 weights (e.g. AdaRound) with conv_in/conv_out kept at 8 bits, BRECQ's convention for the
first and last layer, to show what that convention would buy. PyTorch reference, weight-only.

    python benchmarks/weight_sensitivity.py --calibration w4.safetensors   # from calibrate --act-bits 0
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from report import command_line, machine, markdown_table, write_section

from modiff_trt.calibrators.adaround import AdaRoundWeight
from modiff_trt.calibrators.blocks import find_blocks
from modiff_trt.calibrators.fileformat import load_calibration
from modiff_trt.calibrators.reconstruct import layer_grid
from modiff_trt.metrics import psnr_db
from modiff_trt.models import load_config, load_unet
from modiff_trt.models.builtin import builtin_checkpoint
from modiff_trt.quant import QuantConfig, quantize_unet
from modiff_trt.sampling.run import sample_batches
from modiff_trt.sampling.sampler import make_sampler


def nearest(model: torch.nn.Module, name: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes on the MSE-searched per-channel grid (what AdaRound starts from)."""
    layer = model.get_submodule(name)
    scale, groups = layer_grid(layer, bits, 0)
    return AdaRoundWeight(layer.weight, scale, groups, bits).nearest_codes(), scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=Path, help="a W4 calibration file whose weights to score")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--section", default="weight-sensitivity")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg, ckpt = load_config("digits"), builtin_checkpoint("digits")
    model = load_unet(cfg, ckpt)
    sampler = make_sampler(cfg, steps=args.steps)

    def run(runner) -> torch.Tensor:
        return sample_batches(sampler, runner, cfg.sample_shape, args.num_images, 256, 0, progress=False)

    def score(weights: dict[str, tuple[torch.Tensor, torch.Tensor] | None]) -> float:
        qmodel = quantize_unet(model, QuantConfig(4, None, modulate=False))
        for name, layer in qmodel.layers.items():
            layer.set_weight_codes(*(weights.get(name) or (None, None)))
        return psnr_db(run(qmodel), reference)

    reference = run(model)
    blocks = find_blocks(model, lambda m: m(torch.zeros(1, *cfg.sample_shape), torch.tensor([500])))
    rows, results = [], {}
    for block in blocks:
        db = score({n: nearest(model, n, 4) for n in block.layers})
        results[block.name] = db
        rows.append([f"only {block.name} W4 (nearest, mse grid)", f"{db:.2f}"])
        print(rows[-1], flush=True)
    if args.calibration is not None:
        cal = load_calibration(args.calibration)
        method = cal.meta.get("weight_method")
        weights = {n: (e.weight_codes, e.weight_scale) for n, e in cal.layers.items()}
        for label, eight in (
            ("every layer W4", ()),
            ("conv_out W8", ("conv_out",)),
            ("conv_in, conv_out W8", ("conv_in", "conv_out")),
        ):
            db = score({**weights, **{n: nearest(model, n, 8) for n in eight}})
            results[f"{method}: {label}"] = db
            rows.append([f"{method} weights, {label}", f"{db:.2f}"])
            print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / f"{args.section}.json"
    out.write_text(json.dumps(results, indent=2))
    if args.no_write:
        return
    write_section(
        args.section,
        "## Which units limit 4-bit weights (digits model, PyTorch reference, weight-only)\n\n"
        f"Command: `{command_line()}`. Machine: {machine()}.\n\n"
        f"{args.num_images} samples, {args.steps} quad DDIM steps, PSNR against float samples from the same noise. "
        "First rows: one unit's weights at W4 (nearest on the MSE grid), everything else float. Last rows: the "
        "calibration file's W4 weights, with conv_in/conv_out re-rounded to 8 bits (BRECQ's first/last-layer "
        "convention, calibrate's `--first-last-bits 8`; give a file made with `--first-last-bits same`, whose "
        "end layers are W4).\n\n" + markdown_table(["weights", "PSNR (dB)"], rows) + "\n",
    )


if __name__ == "__main__":
    main()
