"""Time AdaRound block reconstruction on the CIFAR-10 UNet (random weights) and project the total.

A full CIFAR-10 reconstruction (about 50 units x 1000 iterations) is hours on two CPU cores, so
this measures a few units and projects the rest: per unit, the seconds per iteration and the
seconds to collect its inputs and targets are taken as proportional to the unit's multiply-adds
per sample (Conv/Linear only, measured by hooks on one forward pass), with the factor fitted on
the measured units.

    python benchmarks/reconstruction_time.py                      # 2 units, 50 iterations, 256 samples
    python benchmarks/reconstruction_time.py --units down.0.block.0 mid.attn_1 --iterations 100

The default units are the largest (up.0.block.0: 256 -> 128 channels at 32x32, its shortcut a
skip-concat layer) and an attention block at 16x16.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from report import command_line, machine, markdown_table, write_section
from torch import nn

from modiff_trt.calibrators.blocks import find_blocks
from modiff_trt.calibrators.collect import calibration_steps, run_collectors
from modiff_trt.calibrators.recon_data import UNetInputCollector
from modiff_trt.calibrators.reconstruct import ReconstructionOptions, reconstruct_weights
from modiff_trt.models import load_config, load_unet
from modiff_trt.quant.config import QuantConfig
from modiff_trt.quant.model import layer_weight_bits, quantizable_layers
from modiff_trt.sampling.sampler import make_sampler


def unit_macs(model: nn.Module, blocks, x: torch.Tensor, t: torch.Tensor) -> dict[str, int]:
    """Multiply-adds per sample of every unit's Conv/Linear layers (one forward pass at batch 1)."""
    macs: dict[str, int] = {}
    owner = {layer: b.name for b in blocks for layer in b.layers}

    def hook(name: str):
        def count(module: nn.Module, _: tuple, out: torch.Tensor) -> None:
            per_out = module.weight[0].numel()  # multiply-adds per output element
            macs[owner[name]] = macs.get(owner[name], 0) + per_out * out[0].numel()

        return count

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in quantizable_layers(model) if n in owner]
    with torch.no_grad():
        model(x, t)
    for handle in handles:
        handle.remove()
    return macs


def project(data: dict) -> tuple[list[list[str]], dict[int, float]]:
    """Table rows of the measured units and the projected seconds for 1000 and 20,000 iterations.

    Seconds per iteration scale with a unit's multiply-adds, with one factor for attention units
    (their softmax and matmuls are not in the MAC count) and one for the rest, each fitted on the
    measured units of its kind; collection scales with the MACs of the forward passes up to the unit.
    """
    macs, units, iterations = data["macs"], data["units"], data["iterations"]
    order = list(macs)  # filled in call order
    prefix = {name: sum(macs[n] for n in order[: i + 1]) for i, name in enumerate(order)}
    rows, per_mac, collect_per_mac = [], {}, []
    for unit in units:
        per_iter = (unit["seconds"] - unit["collect_seconds"]) / iterations
        per_mac.setdefault("attn" in unit["name"], []).append(per_iter / macs[unit["name"]])
        collect_per_mac.append(unit["collect_seconds"] / prefix[unit["name"]])
        rows.append(
            [
                unit["name"],
                f"{macs[unit['name']] / 1e6:.1f}",
                f"{unit['collect_seconds']:.1f}",
                f"{per_iter * 1000:.0f}",
                f"{unit['seconds']:.1f}",
            ]
        )
    every = [f for factors in per_mac.values() for f in factors]
    factor = {kind: sum(f) / len(f) for kind, f in per_mac.items()}
    iterate = sum(macs[n] * factor.get("attn" in n, sum(every) / len(every)) for n in order)
    collect = sum(collect_per_mac) / len(collect_per_mac) * sum(prefix.values())
    return rows, {n: data["trajectories_seconds"] + collect + iterate * n for n in (1000, 20000)}


def measure(args: argparse.Namespace) -> dict:
    """Sample the calibration inputs and reconstruct `args.units` (the rest rounds to nearest)."""
    cfg = load_config("ddim-cifar10")
    model = load_unet(cfg, None)  # random weights: the timing does not depend on them
    sampler = make_sampler(cfg, steps=10)
    steps = calibration_steps(sampler.model_calls(), 10, False)
    cali_n = -(-args.samples // len(steps))  # every trajectory gives one input per calibration step
    batch = min(32, cali_n)
    collector = UNetInputCollector(model, steps, args.samples, -(-cali_n // batch), 0)
    started = time.perf_counter()
    run_collectors([collector], sampler, cfg.sample_shape, cali_n, batch, 0, progress=False)
    trajectories = time.perf_counter() - started
    inputs = collector.inputs(args.samples)
    blocks = find_blocks(model, lambda m: m(inputs.x[:1], inputs.t[:1]))
    options = ReconstructionOptions(iterations=args.iterations, samples=args.samples)
    bits = layer_weight_bits(model, QuantConfig(4, None))
    result = reconstruct_weights(model, inputs, bits, {}, options, progress=False, only=args.units)
    return {
        "units": [u.__dict__ for u in result.units],
        "macs": unit_macs(model, blocks, inputs.x[:1], inputs.t[:1]),
        "trajectories_seconds": trajectories,
        "iterations": args.iterations,
        "samples": args.samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", nargs="+", default=["up.0.block.0", "down.1.attn.0"])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--section", default="reconstruction-time-cifar10")
    parser.add_argument("--render", type=Path, help="re-render the section from a results JSON of an earlier run")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    path = Path(__file__).parent / "results" / f"{args.section}.json"
    if args.render:
        data = {"iterations": args.iterations, "samples": args.samples, **json.loads(args.render.read_text())}
    else:
        data = measure(args)
    rows, projected = project(data)
    data["projected_seconds"] = projected
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(json.dumps({"rows": rows, "projected_hours": {k: v / 3600 for k, v in projected.items()}}, indent=1))
    if args.no_write:
        return
    body = (
        "## AdaRound reconstruction time on the CIFAR-10 UNet (random weights)\n\n"
        f"Command: `{command_line()}`. Machine: {machine()}.\n\n"
        f"{len(data['macs'])} units (ResnetBlocks, attention blocks, single layers), "
        f"{sum(data['macs'].values()) / 1e6:.0f} M multiply-adds per sample in all. Measured: "
        f"{data['iterations']} iterations at batch 32 on {data['samples']} calibration inputs, torch 1 thread. "
        "Projection for every unit: seconds per iteration proportional to the unit's multiply-adds (one factor "
        "for attention units, one for the rest, each from the measured unit of its kind), collection time "
        "proportional to the multiply-adds of the forward passes up to the unit, plus the "
        f"{data['trajectories_seconds']:.0f} s of float trajectories that gave the inputs.\n\n"
        + markdown_table(
            ["unit", "M MACs / sample", "collect inputs+targets (s)", "ms / iteration", "unit total (s)"], rows
        )
        + f"\n\nProjected full reconstruction, every unit: {projected[1000] / 3600:.1f} h at 1000 iterations per "
        f"unit (the default), {projected[20000] / 3600:.1f} h at Q-Diffusion's 20,000.\n"
    )
    write_section(args.section, body)


if __name__ == "__main__":
    main()
