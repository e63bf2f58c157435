"""Do per-step-group activation scales help MoDiff at low bits? (calibrator issue, measured)

TensorRT scales are build-time constants, so a time-dependent scale s_g would be folded around
a fixed-scale quantizer: multiply the residual by s_0/s_g before Q, the layer output by s_g/s_0
after (exact, by linearity). Before building that, this script measures what it could buy in
the PyTorch reference on the trained digits model: residual scales calibrated separately for G
contiguous groups of sampling steps vs one scale for all steps (G = 1), and dynamic per-call
scales (absmax of the whole batch tensor, so driven by its outliers: not an upper bound).
Same calibration trajectories, same test noise, minmax scales.

    python benchmarks/step_scales.py [--groups 1 2 4 8] [--bits 4 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import command_line, machine, markdown_table, write_section  # noqa: E402

from modiff_trt.calibrators.collect import TrajectoryCollector, run_collectors  # noqa: E402
from modiff_trt.calibrators.search import activation_scale  # noqa: E402
from modiff_trt.engines.torch_backend import load_reference  # noqa: E402
from modiff_trt.models import load_config  # noqa: E402
from modiff_trt.models.builtin import builtin_checkpoint  # noqa: E402
from modiff_trt.pipeline import score_digits, timed_samples  # noqa: E402
from modiff_trt.quant import LayerScales, QuantConfig, ScaleSet, quantize_unet  # noqa: E402
from modiff_trt.sampling.sampler import Sampler, make_sampler  # noqa: E402


def group_scales(model, cfg, sampler: Sampler, groups: int, bits: int, cali_n: int) -> list[dict[str, LayerScales]]:
    """Residual minmax scales per contiguous step group (steps 1..S-1; step 0 is the warm-up)."""
    bounds = np.linspace(1, sampler.steps, groups + 1).round().astype(int)
    tables = []
    for g in range(groups):
        steps = list(range(bounds[g], bounds[g + 1]))
        collector = TrajectoryCollector(model, steps, True, 1, {}, 65536, seed=1)
        run_collectors([collector], sampler, cfg.sample_shape, cali_n, cali_n, 1, progress=False)
        stats = collector.stats
        tables.append(
            {
                n: LayerScales(act=[activation_scale(s.values(), s.absmax, bits, "minmax") for s in st.act])
                for n, st in stats.items()
            }
        )
    return [
        tables[int(np.searchsorted(bounds, k, side="right")) - 1] if k >= 1 else tables[0] for k in range(sampler.steps)
    ]


class StepScaled(torch.nn.Module):
    """Switches every layer's static residual scales by the index of the call in the trajectory."""

    def __init__(self, qmodel, per_step: list[dict[str, LayerScales]]):
        super().__init__()
        self.qmodel, self.per_step, self.call = qmodel, per_step, 0
        self.name, self.device = "torch", qmodel.device

    def reset_state(self) -> None:
        self.qmodel.reset_state()
        self.call = 0

    def forward(self, x, t, context=None):
        for name, layer in self.qmodel.layers.items():
            layer.scales = self.per_step[min(self.call, len(self.per_step) - 1)][name]
        self.call += 1
        return self.qmodel(x, t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--cali-n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    cfg, ckpt = load_config("digits"), builtin_checkpoint("digits")
    sampler = make_sampler(cfg, steps=args.steps)
    _, fp_model, _ = load_reference(cfg, ckpt, QuantConfig(None, None))
    reference, _ = timed_samples(fp_model, cfg, args.num_images, 256, sampler)
    rows = []
    for bits in args.bits:
        dynamic = quantize_unet(fp_model, QuantConfig(8, bits))
        x_dyn, _ = timed_samples(dynamic, cfg, args.num_images, 256, sampler)
        for groups in args.groups:
            per_step = group_scales(fp_model, cfg, sampler, groups, bits, args.cali_n)
            qmodel = quantize_unet(
                fp_model, QuantConfig(8, bits, act_scales="static"), ScaleSet(True, dict(per_step[1]), "step-groups")
            )
            x0, _ = timed_samples(StepScaled(qmodel, per_step), cfg, args.num_images, 256, sampler)
            s = score_digits(x0, reference)
            rows.append(
                [f"W8A{bits}", f"static, {groups} step group(s)", f"{s['psnr_db']:.2f}", f"{s['digits_fid']:.2f}"]
            )
            print(rows[-1], flush=True)
        s = score_digits(x_dyn, reference)
        rows.append([f"W8A{bits}", "dynamic per call (batch absmax)", f"{s['psnr_db']:.2f}", f"{s['digits_fid']:.2f}"])
        print(rows[-1], flush=True)
    body = (
        "## Per-step-group activation scales (MoDiff, digits model, PyTorch reference)\n\n"
        f"Command: `{command_line()}`. Machine: {machine()}.\n\n"
        f"{args.num_images} samples, {args.steps} quad DDIM steps, minmax residual scales from {args.cali_n} "
        "calibration trajectories, calibrated separately for G contiguous groups of steps.\n\n"
        + markdown_table(["bits", "scales", "PSNR vs fp32 (dB)", "digits FID"], rows)
    )
    write_section("step-scales", body)


if __name__ == "__main__":
    main()
