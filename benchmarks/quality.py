"""Quality of every quantization mode on the embedded digits model: torch reference and ORT.

For each bit width: plain Q-Diffusion (static scales), MoDiff static, MoDiff dynamic (torch
only: dynamic scales cannot be exported), MoDiff static with a quantized warm-up, and MoDiff
static with fp16 state. Static configurations run both in the PyTorch reference and deployed
on ONNX Runtime from the exported graphs, from the same per-image noise.

    python benchmarks/quality.py            # full table (about 15 minutes on a quiet 2-core machine)
    python benchmarks/quality.py --quick    # smoke run
    python benchmarks/quality.py --method mse --bits W4A8 W4A4 --section quality-mse   # MSE scales
    python benchmarks/quality.py --step-groups 1 2 4 --bits W8A8 W8A6 W8A4 W8A3 --section quality-step-groups
    python benchmarks/quality.py --formats --num-images 256 --section quality-formats   # FP8 / NVFP4
    python benchmarks/quality.py --state --bits W8A8 W8A4 --section quality-state   # state layouts (issue 22)

`--formats` measures the activation formats instead: weight-only W8, then INT4, NVFP4 and FP8
activations with per-tensor dynamic scales on every layer (plain vs MoDiff, torch), next to the
numbers of the independent reference the formats issue quotes; then the deployable forms (each
layer in the format TensorRT runs it in, static scales), in torch and exported on ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from report import command_line, machine, markdown_table, write_section

from modiff_trt.calibrators.fileformat import load_calibration
from modiff_trt.calibrators.reconstruct import ReconstructionOptions
from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.engines.torch_backend import load_reference
from modiff_trt.models import load_config
from modiff_trt.models.builtin import builtin_checkpoint
from modiff_trt.pipeline import (
    calibration_files,
    export_config,
    ort_target,
    score_digits,
    timed_samples,
)
from modiff_trt.quant import QuantConfig
from modiff_trt.quant.scales import StepGroups
from modiff_trt.sampling.sampler import make_sampler

BITS = [(8, 8), (8, 6), (8, 4), (4, 8), (4, 4), (8, 3)]


class Row(NamedTuple):
    """One configuration: static rows are calibrated, exported and run on ORT too."""

    bits: str
    mode: str
    quant: QuantConfig
    static: bool
    step_groups: int | str = 1  # or 'auto': calibrate picks G, the row names it
    independent_db: float | None = None  # the formats issue's independent reference, same setting
    weight_method: str | None = None  # None: follow --method (minmax | mse | adaround)


def variants(w: int, a: int, step_groups: list[str] | None = None) -> list[Row]:
    """The integer rows of one bit width; with `step_groups` (counts or 'auto'), only MoDiff
    static with that many groups of per-step residual scales."""
    bits = f"W{w}A{a}"
    if step_groups:
        return [Row(bits, _groups_mode(g), QuantConfig(w, a), True, g if g == "auto" else int(g)) for g in step_groups]
    return [
        Row(bits, "Q-Diffusion static", QuantConfig(w, a, modulate=False), True),
        Row(bits, "MoDiff static", QuantConfig(w, a), True),
        Row(bits, "MoDiff dynamic", QuantConfig(w, a), False),
        Row(bits, "MoDiff static, quantized warm-up", QuantConfig(w, a, first_step="quantized"), True),
        Row(bits, "MoDiff static, fp16 state", QuantConfig(w, a, state_dtype="float16"), True),
    ]


def state_rows(w: int, a: int) -> list[Row]:
    """The state-layout study (issue 22) at one bit width: MoDiff static with fp32 state, fp16
    state (a_hat and o_hat rounded to fp16), and the scaled layout (a_hat in units of its residual
    scale) with fp16 state, one calibration for all three."""
    bits = f"W{w}A{a}"
    return [
        Row(bits, "MoDiff static, fp32 state", QuantConfig(w, a), True),
        Row(bits, "MoDiff static, fp16 state", QuantConfig(w, a, state_dtype="float16"), True),
        Row(
            bits,
            "MoDiff static, scaled fp16 state",
            QuantConfig(w, a, state_dtype="float16", state_layout="scaled"),
            True,
        ),
    ]


def format_rows() -> list[Row]:
    """The activation-format study: the formats issue's table, then the deployable forms.

    Dynamic rows put the format on every layer (`format_layers='all'`), as the issue's reference
    did; the static rows run each layer in the format TensorRT takes for it (NVFP4 only on
    Linears; convs FP8, or INT8 where TensorRT has no FP8 kernel) and are exported: FP8 in
    TensorRT's Q/DQ form (ORT runs FP8 Q/DQ), NVFP4 through the ort-cpu target's emulation.
    """
    rows = [Row("W8", "weight-only", QuantConfig(8, None, modulate=False), False, independent_db=38.5)]
    for label, fmt, bits, plain_db, modiff_db in (
        ("INT4 per-tensor", "int", 4, -1.2, 33.6),
        ("NVFP4", "nvfp4", 4, 24.7, 37.5),
        ("FP8 E4M3", "fp8", 8, 31.8, 38.5),
    ):
        every = "all" if fmt != "int" else "tensorrt"
        for modulate, db in ((False, plain_db), (True, modiff_db)):
            quant = QuantConfig(8, bits, modulate=modulate, act_format=fmt, format_layers=every)
            rows.append(
                Row(
                    f"W8 {label}",
                    f"{'MoDiff' if modulate else 'plain'} dynamic, every layer",
                    quant,
                    False,
                    independent_db=db,
                )
            )
    for label, fmt, bits in (("NVFP4", "nvfp4", 4), ("FP8 E4M3", "fp8", 8)):
        for modulate in (False, True):
            quant = QuantConfig(8, bits, modulate=modulate, act_format=fmt)
            rows.append(
                Row(f"W8 {label}", f"{'MoDiff' if modulate else 'plain'} static, TensorRT layer formats", quant, True)
            )
    return rows


def reconstruction_rows(first_last_bits: int | None, nearest: list[str]) -> list[Row]:
    """The weight-reconstruction study (issue 23): 4-bit weights rounded to nearest (`nearest`:
    the scale searches to show) vs learned by AdaRound block reconstruction, weight-only and with
    MoDiff / Q-Diffusion activations, beside the W8A8 MoDiff row the W4A8 one is compared with.
    `first_last_bits` is the input/output conv's weight width (None: W4 like every layer)."""
    ends = "" if first_last_bits is None else f", first/last W{first_last_bits}"

    def w4(act_bits: int | None, modulate: bool = True) -> QuantConfig:
        return QuantConfig(4, act_bits, modulate=modulate, first_last_bits=first_last_bits)

    return [
        *(Row("W4", f"weight-only, nearest ({m}){ends}", w4(None, False), True, weight_method=m) for m in nearest),
        Row("W4", f"weight-only, adaround{ends}", w4(None, False), True, weight_method="adaround"),
        Row("W8A8", "MoDiff static", QuantConfig(8, 8), True, weight_method="minmax"),
        Row("W4A8", f"MoDiff static, adaround{ends}", w4(8), True, weight_method="adaround"),
        Row("W4A4", f"MoDiff static, adaround{ends}", w4(4), True, weight_method="adaround"),
        Row("W4A4", f"MoDiff static, adaround{ends}, 4 step groups", w4(4), True, 4, weight_method="adaround"),
        Row("W4A8", f"Q-Diffusion static, adaround{ends}", w4(8, False), True, weight_method="adaround"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="64 images, 10 steps, W8A8 and W8A4 only")
    parser.add_argument("--json", type=Path, help="raw results (default: benchmarks/results/SECTION.json)")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument(
        "--method",
        default="minmax",
        choices=["minmax", "mse", "percentile"],
        help="calibration scale search (mse also searches per-channel weight scales)",
    )
    parser.add_argument("--bits", nargs="+", help="subset of bit widths, e.g. W4A8 W4A4")
    parser.add_argument("--section", default="quality", help="BENCHMARKS.md section to write")
    parser.add_argument(
        "--step-groups", nargs="+", help="only MoDiff static rows, per step-group count (or 'auto': calibrate picks it)"
    )
    parser.add_argument("--state", action="store_true", help="only the state-layout rows (issue 22)")
    parser.add_argument("--formats", action="store_true", help="the FP8/NVFP4 activation-format study instead")
    parser.add_argument(
        "--reconstruction", action="store_true", help="the AdaRound weight-reconstruction study instead (issue 23)"
    )
    parser.add_argument(
        "--recon-iters", type=int, default=ReconstructionOptions().iterations, help="AdaRound iterations per block"
    )
    parser.add_argument(
        "--first-last-bits",
        default="8",
        help="--reconstruction: weight bits of the input/output conv, or 'same' (W4 like every layer)",
    )
    parser.add_argument(
        "--nearest",
        nargs="*",
        default=["minmax", "mse"],
        help="--reconstruction: the nearest-rounding W4 rows to include (minmax, mse; none: no nearest rows)",
    )
    parser.add_argument("--cali-n", type=int, default=64, help="calibration trajectories")
    parser.add_argument(
        "--cali-st",
        type=int,
        default=10,
        help="calibrated UNet calls per trajectory (step groups want several per group: e.g. 49)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    num_images, steps, bits = args.num_images, args.steps, BITS
    if args.bits:
        bits = [b for b in BITS if f"W{b[0]}A{b[1]}" in args.bits]
    if args.quick:
        num_images, steps, bits = 64, 10, [(8, 8), (8, 4)]
    rows = format_rows() if args.formats else [row for w, a in bits for row in variants(w, a, args.step_groups)]
    if args.reconstruction:
        rows = reconstruction_rows(None if args.first_last_bits == "same" else int(args.first_last_bits), args.nearest)
    if args.state:
        rows = [row for w, a in bits for row in state_rows(w, a)]
    recon = ReconstructionOptions(iterations=args.recon_iters)
    cfg, ckpt = load_config("digits"), builtin_checkpoint("digits")
    sampler = make_sampler(cfg, steps=steps)
    batch = min(num_images, 256)
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modiff-quality-") as tmp:
        work = Path(tmp)
        fp_model = load_reference(cfg, ckpt, QuantConfig(None, None)).float_model
        reference, _ = timed_samples(fp_model, cfg, num_images, batch, sampler)
        fp = score_digits(reference, None)
        results.append({"bits": "fp32", "mode": "full precision", "torch": {**fp, "psnr_db": None}, "ort": None})
        static = [spec for spec in rows if spec.static]
        started_cal = time.perf_counter()
        files = calibration_files(  # all at once: one set of trajectories, one reconstruction per weight width
            cfg,
            ckpt,
            [spec.quant for spec in static],
            sampler,
            work,
            cali_st=args.cali_st,
            cali_n=args.cali_n,
            method=args.method,
            step_groups=[spec.step_groups for spec in static],
            weight_method=[spec.weight_method for spec in static],
            reconstruction=recon,
        )
        calibration_seconds = time.perf_counter() - started_cal
        cals = dict(zip([id(spec) for spec in static], files, strict=True))
        for spec in rows:
            row = {"bits": spec.bits, "mode": spec.mode, "independent_db": spec.independent_db}
            cal = cals.get(id(spec))
            if cal is not None:
                report = load_calibration(cal).meta
                row["calibration"] = {"weight_method": report.get("weight_method"), **report.get("report", {})}
                if report.get("reconstruction"):
                    row["reconstruction_seconds"] = report["reconstruction"]["seconds"]
            if spec.step_groups == "auto":
                row["mode"] = _groups_mode(load_calibration(cal).step_groups, auto=True)
            q = QuantConfig(**{**spec.quant.to_dict(), "act_scales": "static" if cal else "dynamic"})
            qmodel = load_reference(cfg, ckpt, q, cal).qmodel
            x0, _ = timed_samples(qmodel, cfg, num_images, batch, sampler)
            row["torch"] = score_digits(x0, reference)
            row["ort"] = None
            if spec.static:
                out = export_config(
                    cfg, ckpt, spec.quant, cal, work / f"export-{len(results)}", sampler, target=ort_target(spec.quant)
                )
                x_ort, _ = timed_samples(OrtRunner(out), cfg, num_images, batch, sampler)
                row["ort"] = score_digits(x_ort, reference)
                row["ort_vs_torch_rel_err"] = float((x_ort - x0).norm() / x0.norm())
            results.append(row)
            print(
                f"{row['bits']:16s} {row['mode']:44s} torch {row['torch']['psnr_db']:6.2f} dB"
                + (f"  ort {row['ort']['psnr_db']:6.2f} dB" if row["ort"] else ""),
                flush=True,
            )
    elapsed = time.perf_counter() - started
    json_path = args.json or Path(__file__).parent / "results" / f"{args.section}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps(
            {"num_images": num_images, "steps": steps, "calibration_seconds": calibration_seconds, "rows": results},
            indent=2,
        )
    )
    if not args.no_write:
        body = (
            render_formats(results, num_images, steps, elapsed)
            if args.formats
            else render_reconstruction(results, num_images, steps, elapsed, calibration_seconds, args)
            if args.reconstruction
            else render(
                results, num_images, steps, elapsed, args.method, args.cali_st, bool(args.step_groups), args.cali_n
            )
        )
        write_section(args.section, body)


def _groups_mode(groups: int | str | StepGroups | None, auto: bool = False) -> str:
    """The row label of MoDiff static with `groups` step groups (a StepGroups: what 'auto' picked)."""
    if groups == "auto":
        return "MoDiff static, auto step groups"
    count = 1 if groups is None else groups.count if isinstance(groups, StepGroups) else int(groups)
    return f"MoDiff static, {count} step group{'s' if count > 1 else ''}{' (auto)' if auto else ''}"


def _fmt(scores: dict | None, key: str, spec: str) -> str:
    if scores is None or scores.get(key) is None:
        return "-"
    return format(scores[key], spec)


def render(
    results: list[dict],
    num_images: int,
    steps: int,
    elapsed: float,
    method: str = "minmax",
    cali_st: int = 10,
    step_groups: bool = False,
    cali_n: int = 64,
) -> str:
    header = [
        "bits",
        "mode",
        "PSNR torch (dB)",
        "PSNR ORT (dB)",
        "digits FID torch",
        "digits FID ORT",
        "confidence torch",
        "confidence ORT",
    ]
    rows = [
        [
            r["bits"],
            r["mode"],
            _fmt(r["torch"], "psnr_db", ".2f"),
            _fmt(r["ort"], "psnr_db", ".2f"),
            _fmt(r["torch"], "digits_fid", ".2f"),
            _fmt(r["ort"], "digits_fid", ".2f"),
            _fmt(r["torch"], "confidence", ".3f"),
            _fmt(r["ort"], "confidence", ".3f"),
        ]
        for r in results
    ]
    return (
        f"## {'Step-group scales' if step_groups else 'Quality'} on the embedded digits model ({method} calibration"
        f"{f', --cali-st {cali_st}' if step_groups else ''})\n\n"
        f"Command: `{command_line()}` ({elapsed / 60:.1f} min). Machine: {machine()}.\n\n"
        f"{num_images} samples per row, {steps} quad DDIM steps, eta 0, the same per-image noise for every row. "
        "PSNR is against the full-precision samples from the same noise; digits FID is the Fréchet distance "
        "of classifier features to the real digits (docs/metrics.md; compare only at equal N); confidence is the "
        f"classifier's mean max-softmax. Static scales: {method} calibration on {cali_n} other trajectories at "
        f"{cali_st} evenly spaced UNet calls each (residuals for MoDiff, raw inputs for Q-Diffusion; mse also sets "
        "per-channel weight scales, dynamic rows keep absmax weights); step-group rows calibrate the residual "
        "scales per group of contiguous steps and run them through the one step graph's `step_scale_ratio` input "
        "(docs/export.md). ORT = the exported graphs on ONNX Runtime (CPU).\n\n" + markdown_table(header, rows)
    )


def render_reconstruction(
    results: list[dict], num_images: int, steps: int, elapsed: float, calibration_seconds: float, args
) -> str:
    """The weight-reconstruction table, with the time calibration (and reconstruction) took."""
    recon = next((r["reconstruction_seconds"] for r in results if r.get("reconstruction_seconds")), None)
    return (
        render(results, num_images, steps, elapsed, args.method, args.cali_st, cali_n=args.cali_n).replace(
            "## Quality on the embedded digits model",
            "## Weight reconstruction (AdaRound) on the embedded digits model",
            1,
        )
        + f"\n\nCalibration of every row together: {calibration_seconds:.0f} s, of which the AdaRound reconstruction "
        f"(W4, {args.recon_iters} iterations per block, shared by every adaround row) took "
        f"{'-' if recon is None else f'{recon:.0f}'} s. Rows marked adaround carry the reconstructed integer "
        "weights in their calibration file and export; nearest rows round to nearest on absmax (minmax) or "
        "MSE-searched per-channel scales.\n"
    )


def render_formats(results: list[dict], num_images: int, steps: int, elapsed: float) -> str:
    header = [
        "weights / activations",
        "mode",
        "PSNR torch (dB)",
        "PSNR ORT (dB)",
        "independent ref. (dB)",
        "torch - independent (dB)",
        "digits FID torch",
        "confidence torch",
    ]
    rows = []
    for r in results:
        ours, theirs = r["torch"].get("psnr_db"), r.get("independent_db")
        delta = "-" if ours is None or theirs is None else f"{ours - theirs:+.2f}"
        rows.append(
            [
                r["bits"],
                r["mode"],
                _fmt(r["torch"], "psnr_db", ".2f"),
                _fmt(r["ort"], "psnr_db", ".2f"),
                "-" if theirs is None else f"{theirs:.1f}",
                delta,
                _fmt(r["torch"], "digits_fid", ".2f"),
                _fmt(r["torch"], "confidence", ".3f"),
            ]
        )
    return (
        "## Activation formats on the embedded digits model: INT4, NVFP4, FP8\n\n"
        f"Command: `{command_line()}` ({elapsed / 60:.1f} min). Machine: {machine()}.\n\n"
        f"{num_images} samples per row (one batch), {steps} quad DDIM steps, eta 0, seed 0 (the same per-image "
        "noise for every row); weights W8 per output channel (int8, absmax); PSNR of the final samples against "
        "full precision on [-1, 1]. Dynamic rows recompute one per-tensor scale per call over the whole batch "
        "(NVFP4: the fp32 tensor scale; block scales are always dynamic) and put the format on every layer; "
        "the independent column is the table the formats issue quotes, measured with another reference on "
        "another digits model. Static rows: each layer in the format TensorRT runs it in (docs/formats.md), "
        "minmax scales from 64 other trajectories, exported (FP8: TensorRT's Q/DQ graph; NVFP4: the ort-cpu "
        "target's standard-op emulation of TensorRT's NVFP4) and sampled on ONNX Runtime (CPU).\n\n"
        + markdown_table(header, rows)
    )


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
