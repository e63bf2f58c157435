"""Quality under diffusers schedulers: the digits model sampled with DPM-Solver++ (few steps) next to DDIM.

For each sampler, full precision, plain Q-Diffusion and MoDiff are calibrated on that sampler's
own trajectories (64 images, seed 1), exported and sampled on ONNX Runtime from the same noise
as the full-precision rows (seed 0). PSNR is against full precision under the same sampler;
digits FID and classifier confidence as in the demo. Writes the `quality-schedulers` section of
BENCHMARKS.md.

    python benchmarks/schedulers.py            # 512 images: DDIM 50 quad steps vs DPM-Solver++ 20 and 10
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from report import command_line, machine, markdown_table, write_section

from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.models import load_config, load_unet
from modiff_trt.models.builtin import builtin_checkpoint
from modiff_trt.pipeline import calibration_files, export_config, score_digits, timed_samples
from modiff_trt.quant import QuantConfig
from modiff_trt.sampling.sampler import make_sampler

log = logging.getLogger("schedulers")
CONFIGS = {
    "qdiff-w8a8": QuantConfig(8, 8, modulate=False, act_scales="static"),
    "modiff-w8a8": QuantConfig(8, 8, act_scales="static"),
    "qdiff-w8a4": QuantConfig(8, 4, modulate=False, act_scales="static"),
    "modiff-w8a4": QuantConfig(8, 4, act_scales="static"),
}


def samplers(cfg):
    return {
        "ddim 50 quad": make_sampler(cfg, steps=50, skip_type="quad"),
        "dpm-solver++ 20": make_sampler(cfg, scheduler="dpm-solver++", steps=20),
        "dpm-solver++ 10": make_sampler(cfg, scheduler="dpm-solver++", steps=10),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    cfg, checkpoint = load_config("digits"), builtin_checkpoint("digits")
    float_model = load_unet(cfg, checkpoint)
    rows = []
    with tempfile.TemporaryDirectory(prefix="modiff-schedulers-") as tmp:
        for label, sampler in samplers(cfg).items():
            reference, _ = timed_samples(float_model, cfg, args.num_images, args.batch_size, sampler)
            rows.append([label, "fp32", "-", *_scores(score_digits(reference, None))[1:]])
            workdir = Path(tmp) / label.replace(" ", "-")
            workdir.mkdir()
            quants = list(CONFIGS.values())
            cals = calibration_files(cfg, checkpoint, quants, sampler, workdir)
            for (name, quant), cal in zip(CONFIGS.items(), cals, strict=True):
                out = export_config(cfg, checkpoint, quant, cal, workdir / name, sampler=sampler)
                runner = OrtRunner(out, provider="cpu", threads=args.threads)
                x0, _ = timed_samples(runner, cfg, args.num_images, args.batch_size, sampler)
                rows.append([label, name, *_scores(score_digits(x0, reference))])
                log.info("%s %s: %s", label, name, rows[-1][2:])
    table = markdown_table(["sampler", "config", "PSNR vs fp32 (dB)", "digits FID", "confidence"], rows)
    body = (
        "## Quality under diffusers schedulers (digits)\n\n"
        f"`{command_line()}` on {machine()}.\n\n"
        f"{args.num_images} images per row from the same noise; every quantized row is calibrated on its own "
        "sampler's trajectories (64 other images, 10 calls spread over each trajectory, minmax) and sampled by its export on ONNX Runtime; "
        "PSNR is against full precision under the same sampler. DPM-Solver++ is diffusers' multistep "
        "`dpmsolver++` (order 2) on the model's betas.\n\n" + table
    )
    print(body)
    if not args.no_write:
        write_section("quality-schedulers", body)


def _scores(score: dict[str, float]) -> list[str]:
    return [f"{score['psnr_db']:.2f}", f"{score['digits_fid']:.2f}", f"{score['confidence']:.3f}"]


if __name__ == "__main__":
    main()
