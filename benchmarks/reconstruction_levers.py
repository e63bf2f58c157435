"""Which AdaRound levers close the digits gaps (issue 23): one reconstruction per run, scored in torch.

Each run calibrates, from one set of float trajectories and ONE W4 reconstruction with the given
options, the W4 weight-only file and a MoDiff W4A4 file per activation scale search (the
reconstruction ignores activations, so every file carries the same integer weights), then
samples each in the PyTorch reference and scores PSNR against the float samples from the same
noise. Weight-only rows are identical on torch and ONNX Runtime (exact export), so torch PSNR is
a valid screen. Each run writes one JSON under benchmarks/results/reconstruction-levers/;
`--render` turns them all into the BENCHMARKS.md section.

    OMP_NUM_THREADS=1 python benchmarks/reconstruction_levers.py --label default --keep /tmp/lev/default
    OMP_NUM_THREADS=1 python benchmarks/reconstruction_levers.py --label iters3000 --recon-iters 3000
    OMP_NUM_THREADS=1 python benchmarks/reconstruction_levers.py --label default --keep /tmp/lev/default \\
        --num-images 512        # re-scores the kept files: no second calibration
    python benchmarks/reconstruction_levers.py --render
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from report import command_line, load, machine, markdown_table, write_section

from modiff_trt.calibrators.calibrate import CalibrationOptions, calibrate_together
from modiff_trt.calibrators.fileformat import load_calibration
from modiff_trt.calibrators.reconstruct import ReconstructionOptions
from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.engines.torch_backend import load_reference, load_scales
from modiff_trt.models import load_config
from modiff_trt.models.builtin import builtin_checkpoint
from modiff_trt.pipeline import export_config, ort_target, score_digits, timed_samples
from modiff_trt.quant import QuantConfig, ScaleSet, quantize_unet
from modiff_trt.sampling.sampler import make_sampler

RESULTS = Path(__file__).parent / "results" / "reconstruction-levers"


def targets(work: Path, args: argparse.Namespace) -> dict[str, tuple[Path, CalibrationOptions]]:
    """Row name -> (file, options): W4 weight-only and MoDiff W4A4 per activation method, adaround."""
    recon = ReconstructionOptions(
        iterations=args.recon_iters,
        learning_rate=args.recon_lr,
        samples=args.recon_samples,
        reg_weight=args.recon_reg,
        seed=args.recon_seed,
    )
    common = {
        "weight_bits": 4,
        "weight_method": "adaround",
        "cali_st": args.cali_st,
        "cali_n": args.cali_n,
        "batch_size": 64,
        "seed": 1,
        "reconstruction": recon,
    }
    rows = {
        "W4 weight-only": (work / "w4.cal.safetensors", CalibrationOptions(act_bits=None, modulate=False, **common))
    }
    if args.w4a8:
        rows["W4A8 MoDiff, minmax act scales"] = (
            work / "w4a8-minmax.cal.safetensors",
            CalibrationOptions(act_bits=8, modulate=True, method="minmax", **common),
        )
    for spec in args.act_methods:
        method, _, groups = spec.partition(":")
        label, tag = (f", {groups} step groups", f"-g{groups}") if groups not in ("", "1") else ("", "")
        rows[f"W4A4 MoDiff, {method} act scales{label}"] = (
            work / f"w4a4-{method}{tag}.cal.safetensors",
            CalibrationOptions(act_bits=4, modulate=True, method=method, step_groups=int(groups or 1), **common),
        )
    return rows


def scaled_acts(scales: ScaleSet, factor: float) -> ScaleSet:
    """`scales` with every activation (residual) scale times `factor`: one global clipping knob,
    the crudest stand-in for learned step sizes (LSQ), to see how much scale tuning could buy."""
    for layer in scales.layers.values():
        if layer.act is not None:
            layer.act = [a * factor for a in layer.act]
        if layer.act_groups is not None:
            layer.act_groups = [[a * factor for a in group] for group in layer.act_groups]
    return scales


def run(args: argparse.Namespace, work: Path) -> dict:
    cfg, ckpt = load_config("digits"), builtin_checkpoint("digits")
    sampler = make_sampler(cfg, steps=args.steps)
    rows = targets(work, args)
    loads = {"before": load()}
    calibrated = not all(path.is_file() for path, _ in rows.values())
    if calibrated:
        started = time.perf_counter()
        calibrate_together(cfg, ckpt, {path: options for path, options in rows.values()}, sampler, progress=False)
        wall = time.perf_counter() - started
        loads["after calibration"] = load()
    meta = load_calibration(next(iter(rows.values()))[0]).meta
    recon = meta["reconstruction"]
    batch = min(args.num_images, 256)
    fp_model = load_reference(cfg, ckpt, QuantConfig(None, None)).float_model
    reference, _ = timed_samples(fp_model, cfg, args.num_images, batch, sampler)
    scores = {}
    for name, (path, options) in rows.items():
        quant = QuantConfig(**{**options.quant.to_dict(), "act_scales": "static"})
        for factor in [1.0] + ([] if options.act_bits is None else args.act_factors):
            scales = scaled_acts(load_scales(path, cfg, ckpt, quant), factor)
            x0, _ = timed_samples(quantize_unet(fp_model, quant, scales), cfg, args.num_images, batch, sampler)
            row = name if factor == 1.0 else f"{name}, x{factor:g}"
            scores[row] = score_digits(x0, reference)
            if args.ort and factor == 1.0:
                out = export_config(
                    cfg, ckpt, quant, path, work / f"export-{path.stem}", sampler, target=ort_target(quant)
                )
                x_ort, _ = timed_samples(OrtRunner(out), cfg, args.num_images, batch, sampler)
                scores[row]["ort_psnr_db"] = score_digits(x_ort, reference)["psnr_db"]
            logging.info("%s: %.2f dB (ORT %s)", row, scores[row]["psnr_db"], scores[row].get("ort_psnr_db"))
    loads["after scoring"] = load()
    return {
        "label": args.label,
        "finished": time.time(),
        "command": command_line(),
        "machine": machine(),
        "num_images": args.num_images,
        "steps": args.steps,
        "cali_n": args.cali_n,
        "cali_st": args.cali_st,
        "reconstruction": {**recon["options"], "samples_used": recon["samples"], "seconds": recon["seconds"]},
        "block_loss": {
            "nearest": sum(u["nearest_loss"] for u in recon["units"]),
            "adaround": sum(u["loss"] for u in recon["units"]),
        },
        "calibration_seconds": meta["report"]["seconds"],
        "calibration_wall_this_run": round(wall, 1) if calibrated else None,
        "loads": loads,
        "scores": scores,
    }


def render(results: list[dict]) -> str:
    """The BENCHMARKS.md section: one row per (run, row), in the order the runs were made."""
    table = []
    for r in results:
        rec = r["reconstruction"]
        lever = (
            f"{rec['iterations']} it, lr {rec['learning_rate']:g}, reg {rec['reg_weight']:g}, "
            f"{rec['samples_used']} inputs (cali-st {r['cali_st']}), seed {rec['seed']}"
        )
        for name, score in r["scores"].items():
            table.append(
                [
                    r["label"],
                    lever,
                    str(r["num_images"]),
                    name,
                    f"{score['psnr_db']:.2f}",
                    f"{score['ort_psnr_db']:.2f}" if "ort_psnr_db" in score else "-",
                    f"{score['digits_fid']:.2f}",
                    f"{r['block_loss']['adaround']:.3f}",
                    f"{rec['seconds']:.0f} / {r['calibration_seconds']:.0f}",
                    "; ".join(f"{k}: {v}" for k, v in r["loads"].items()),
                ]
            )
    header = [
        "run",
        "reconstruction",
        "images",
        "row",
        "PSNR torch (dB)",
        "PSNR ORT (dB)",
        "digits FID",
        "summed block loss",
        "recon / calibration (s)",
        "load average",
    ]
    commands = "\n".join(f"- {r['label']}: `{r['command']}`" for r in results)
    return (
        "## AdaRound levers on the embedded digits model (PyTorch reference)\n\n"
        f"Commands (each with `OMP_NUM_THREADS=1`, torch 1 thread, one after another):\n\n{commands}\n\n"
        f"Machine: {results[-1]['machine']}.\n\n"
        "One W4 reconstruction per run (first/last layer W8, 64 calibration trajectories, seed 1), shared by "
        "its weight-only file and its MoDiff W4A4 files (one per activation scale search and step-group count). "
        "PSNR against the float samples from the same noise, 50 quad DDIM steps; digits FID only compares at "
        "equal image counts. A run with 512 images re-scores the files its 128-image run kept. Times are "
        "shared-machine times (another benchmark ran beside these runs); the load averages are 1/5/15 min. A "
        "command without `--recon-iters` ran at the default of its day: the reconstruction column says what ran "
        "(give `--recon-iters` to repeat it).\n\n" + markdown_table(header, table) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", help="the run's name (its JSON file: LABEL-NUM_IMAGES.json)")
    parser.add_argument("--num-images", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cali-n", type=int, default=64)
    parser.add_argument("--cali-st", type=int, default=10)
    defaults = ReconstructionOptions()
    parser.add_argument("--recon-iters", type=int, default=defaults.iterations)
    parser.add_argument("--recon-lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--recon-samples", type=int, default=defaults.samples)
    parser.add_argument("--recon-reg", type=float, default=defaults.reg_weight)
    parser.add_argument(
        "--recon-seed", type=int, default=defaults.seed, help="the reconstruction's batch order (run-to-run spread)"
    )
    parser.add_argument(
        "--act-methods",
        nargs="*",
        default=["minmax", "mse", "percentile"],
        help="one MoDiff W4A4 row per METHOD[:STEP_GROUPS] (activation scale search, residual scales per group)",
    )
    parser.add_argument(
        "--act-factors",
        nargs="*",
        type=float,
        default=[],
        help="W4A4 rows: also score with every activation scale times each factor (a global clipping probe)",
    )
    parser.add_argument("--w4a8", action="store_true", help="also a MoDiff W4A8 row (minmax scales)")
    parser.add_argument("--ort", action="store_true", help="also export each row and sample it on ONNX Runtime")
    parser.add_argument("--keep", type=Path, help="keep the calibration files here (and reuse them when present)")
    parser.add_argument("--render", action="store_true", help="only write the section from the saved runs")
    parser.add_argument("--section", default="reconstruction-levers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.render:
        if not args.label:
            parser.error("give --label (or --render)")
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        with tempfile.TemporaryDirectory(prefix="modiff-levers-") as tmp:
            work = args.keep or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            result = run(args, work)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.label}-{args.num_images}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("label", "num_images", "loads", "calibration_seconds")}), flush=True)
        for name, score in result["scores"].items():
            print(f"{name:50s} {score['psnr_db']:6.2f} dB  ORT {score.get('ort_psnr_db', '-')}", flush=True)
        return
    runs = sorted((json.loads(p.read_text()) for p in RESULTS.glob("*.json")), key=lambda r: r.get("finished", 0))
    write_section(args.section, render(runs))


if __name__ == "__main__":
    main()
