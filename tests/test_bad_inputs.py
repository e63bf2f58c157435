"""A new user's bad inputs, across every command: each is refused with one clear line, before work.

Every case asserts the exit code (2: the user can fix it; 1 only for lint violations), a message
naming the offending option or file, no traceback, and, where the command would have destroyed
something, that every pre-existing file is byte-identical afterwards. The model is the packaged
`digits` UNet with tiny step counts, so the whole corpus stays fast.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from modiff_trt.cli import app
from modiff_trt.models.builtin import builtin_checkpoint

runner = CliRunner()
DIGITS_YAML = Path(__file__).resolve().parents[1] / "modiff_trt" / "configs" / "digits.yml"


@dataclass(frozen=True)
class Case:
    """One bad command line: `{name}` placeholders are paths of the `world` fixture."""

    args: tuple[str, ...]
    needle: str  # must appear in the output: the option or file the message names (placeholders too)
    code: int = 2
    keep: tuple[str, ...] = field(default=())  # world files that must stay byte-identical


def case(command: str, needle: str, code: int = 2, keep: tuple[str, ...] = ()) -> Case:
    return Case(tuple(command.split()), needle, code, keep)


SAMPLE = "sample -c digits -n 1 --batch-size 1 --steps 2 -o {tmp}/s"
CAL = "calibrate -c digits --cali-n 1 --cali-st 1 --steps 2 --batch-size 1"
EXPORT = "export -c digits --calibration {cal}"
COMPARE = "compare {export} --backends torch,ort -n 1 --steps 2"


def _set(section: str, key: str, value):
    return lambda manifest: manifest[section].update({key: value})


def _drop(section: str, key: str):
    return lambda manifest: manifest[section].pop(key)


def _layer(key: str, value):
    return lambda manifest: manifest["layers"][3].update({key: value})


FIX = ": re-run `modiff-trt export`"
#: Hand edits of an export's manifest.json, a missing or wrong-typed field in each section: refused
#: on load, naming `section.field` and the fix, before any graph runs.
MANIFEST_EDITS = {
    "model-missing": (_drop("model", "sample_shape"), "model.sample_shape is missing" + FIX),
    "model-bool": (_set("model", "ema", "yes"), 'model.ema is "yes"; it must be true or false' + FIX),
    "model-shape": (
        _set("model", "sample_shape", [1, "8", 8]),
        'model.sample_shape is [1, "8", 8]; it must be a list of integers' + FIX,
    ),
    "quant-missing": (_drop("quant", "act_format"), "quant.act_format is missing" + FIX),
    "quant-type": (_set("quant", "weight_bits", "8"), 'quant.weight_bits is "8"; it must be an integer or null' + FIX),
    "quant-range": (_set("quant", "weight_bits", 16), "quant.weight_bits is 16; it must be within 2..8" + FIX),
    "quant-choice": (_set("quant", "first_step", "float"), 'quant.first_step is "float"; it must be one of "fp"'),
    "sampling-missing": (_drop("sampling", "beta_end"), "sampling.beta_end is missing" + FIX),
    "sampling-type": (_set("sampling", "steps", "10"), 'sampling.steps is "10"; it must be an integer' + FIX),
    "sampling-null": (lambda m: m.update(sampling=None), "sampling is null, not sampler settings" + FIX),
    "export-missing": (_drop("export", "float"), "export.float is missing" + FIX),
    "export-batch": (
        _set("export", "batch_size", "4"),
        'export.batch_size is "4"; it must be an integer or null' + FIX,
    ),
    "export-bool-batch": (_set("export", "batch_size", True), "export.batch_size is true; it must be an integer"),
    "export-target": (
        _set("export", "target", "tensorrt"),
        'export.target is "tensorrt"; it must be one of "trt", "ort-cpu"' + FIX,
    ),
    "export-layout-missing": (_drop("export", "state_layout"), "export.state_layout is missing" + FIX),
    "export-layout": (
        _set("export", "state_layout", "int16"),
        'export.state_layout is "int16"; it must be one of "plain", "scaled"' + FIX,
    ),
    "quant-layout": (_set("quant", "state_layout", "packed"), 'quant.state_layout is "packed"; it must be one of'),
    "export-unknown": (_set("export", "precision", "int8"), "export.precision is not a known field" + FIX),
    "export-list": (lambda m: m.update(export=[17]), "export is [17]; it must be an object" + FIX),
    # issue 20: removed fields get no default, wrong-typed layer fields, ranges, cross-section edits
    "sampling-skip-type-removed": (_drop("sampling", "skip_type"), "sampling.skip_type is missing" + FIX),
    "sampling-eta-negative": (_set("sampling", "eta", -0.5), "sampling.eta is -0.5; it must be a number >= 0" + FIX),
    "sampling-unknown": (_set("sampling", "order", 2), "sampling.order is not a ddim sampler setting" + FIX),
    "layer-kind": (_layer("kind", 7), 'layers[3].kind is 7; it must be one of "conv1d", "conv2d", "linear"' + FIX),
    "layer-scale": (_layer("act_scale", "0.1"), 'layers[3].act_scale is "0.1"; it must be a list of finite numbers'),
    "layer-scale-negative": (
        _layer("act_scale", [-0.1]),
        "layers[3].act_scale is [-0.1]; it must be made of numbers > 0",
    ),
    "layer-zero-point": (_layer("act_zero_point", ["a"]), 'layers[3].act_zero_point is ["a"]; it must be a list of'),
    "layer-shape": (
        _layer("a_hat_shape", [32, "8"]),
        'layers[3].a_hat_shape is [32, "8"]; it must be a list of integers',
    ),
    "layer-act-format": (_layer("act_format", "int4"), 'layers[3].act_format is "int4"; it must be one of "int"'),
    "layer-constant-input": (
        _layer("constant_input", "no"),
        'layers[3].constant_input is "no"; it must be true or false',
    ),
    "layer-name": (_layer("name", 5), "layers[3].name is 5; it must be a string" + FIX),
    "layer-missing": (lambda m: m["layers"][3].pop("kind"), "layers[3].kind is missing" + FIX),
    "layer-unknown": (_layer("bias", 1), "layers[3].bias is not a known field" + FIX),
    "step-groups-added": (
        lambda m: m.update(step_groups={"count": 1, "bounds": [1, 2], "steps": 2, "skip_type": "quad"}),
        "step_groups.timesteps is missing" + FIX,
    ),
    "step-groups-set": (
        lambda m: m.update(
            step_groups={"count": 1, "bounds": [1, 2], "steps": 2, "skip_type": "quad", "timesteps": [800, 0]}
            | {"ratios": [[[1.0], [1.0]]]}
        ),
        "step_groups is set, but the step graph has no step_scale_ratio input" + FIX,
    ),
    "export-state-dtype": (_set("export", "state_dtype", "float16"), 'export.state_dtype is "float16", but quant'),
    "export-state-slots": (_set("export", "state_batch_multiplier", 2), "export.state_batch_multiplier is 2"),
    "export-state-slots-3": (
        _set("export", "state_batch_multiplier", 3),
        "export.state_batch_multiplier is 3; it must be one of 1, 2" + FIX,
    ),
    "top-unknown": (lambda m: m.update(notes="mine"), "manifest.json: notes is not a known field" + FIX),
    "calibration-sha": (_set("calibration", "sha256", "abc"), 'calibration.sha256 is "abc"; it must be 64 lowercase'),
    "graphs-unknown": (lambda m: m["graphs"].update(extra=m["graphs"]["step"]), "graphs.extra is not a graph"),
}

#: Graph file names that point outside the export directory (`outside.onnx` beside it is a real
#: graph that hashes right, so only the name check can stop it): refused before any file is opened.
PATH_EDITS = {
    "absolute": lambda world: str(world["outside_graph"]),
    "dotdot": lambda world: "../outside.onnx",
    "folder": lambda world: "sub/step.onnx",
}
PLAIN = "it must be a plain file name inside the export directory"

CASES: dict[str, Case] = {
    **{
        f"inspect-manifest-{name}": case(f"inspect {{manifest_{name}}}", needle)
        for name, (_, needle) in MANIFEST_EDITS.items()
    },
    "sample-manifest-export-batch": case(
        "sample {manifest_export-batch} -b ort -n 1 --steps 2 -o {tmp}/s", "export.batch_size"
    ),
    "compare-manifest-sampling-type": case(
        "compare {manifest_sampling-type} --backends torch,ort -n 1 --steps 2", "sampling.steps"
    ),
    "sample-manifest-skip-type-removed": case(
        "sample {manifest_sampling-skip-type-removed} -b ort -n 1 --steps 2 -o {tmp}/s", "sampling.skip_type is missing"
    ),
    "sample-manifest-eta-negative": case(
        "sample {manifest_sampling-eta-negative} -b ort -n 1 -o {tmp}/s", "sampling.eta is -0.5"
    ),
    "sample-manifest-layer-kind": case("sample {manifest_layer-kind} -b ort -n 1 -o {tmp}/s", "layers[3].kind is 7"),
    "compare-manifest-layer-shape": case(
        "compare {manifest_layer-shape} --backends torch,ort -n 1 --steps 2", "layers[3].a_hat_shape"
    ),
    "build-manifest-step-groups-set": case("build {manifest_step-groups-set}", "step_groups is set"),
    # --- paths: graph and external-data names stay inside the export directory ---------------
    **{
        f"{command}-paths-{how}": case(line.format(exp=f"{{paths_{how}}}"), PLAIN)
        for how in PATH_EDITS
        for command, line in (
            ("inspect", "inspect {exp}"),
            ("lint", "inspect {exp} --lint"),
            ("sample", "sample {exp} -b ort -n 1 --steps 2 -o {{tmp}}/s"),
            ("compare", "compare {exp} --backends torch,ort -n 1 --steps 2"),
        )
    },
    "export-paths-absolute-out": case(
        f"{EXPORT} -o {{paths_absolute}}", "not a complete earlier export", keep=("paths_absolute", "outside_graph")
    ),
    "inspect-paths-external-data": case("inspect {paths_external}", "keeps weights in '../outside.data'"),
    "sample-paths-external-data": case(
        "sample {paths_external} -b ort -n 1 --steps 2 -o {tmp}/s", "keeps weights in '../outside.data'"
    ),
    # --- provenance: the torch reference uses the export's own calibration, hash-checked ----
    "compare-provenance-copy-swapped": case(
        "compare {prov_swapped} --backends torch,ort -n 1 --steps 2", "calibration.safetensors is not the calibration"
    ),
    "sample-provenance-copy-swapped": case(
        "sample {prov_swapped} -b torch -n 1 --steps 2 -o {tmp}/s", "its sha256 differs from the manifest"
    ),
    "compare-provenance-old-recalibrated": case(
        "compare {prov_old} --backends torch,ort -n 1 --steps 2", "edited.cal.safetensors is not the calibration"
    ),
    "sample-provenance-old-recalibrated": case(
        "sample {prov_old} -b torch -n 1 --steps 2 -o {tmp}/s", "calibration.sha256"
    ),
    "compare-provenance-old-gone": case(
        "compare {prov_gone} --backends torch,ort -n 1 --steps 2", "is gone and the export holds no copy"
    ),
    # --- corrupt graphs: one line naming the file and the fix, on every backend path ---------
    **{
        f"{command}-corrupt-{how}": case(line.format(exp=f"{{corrupt_{how}}}"), needle)
        for how, needle in (
            ("garbage", "step.onnx is not a readable ONNX graph"),
            ("truncated", "step.onnx is not a readable ONNX graph"),
            ("stale-hash", "step.onnx does not match"),
        )
        for command, line in (
            ("inspect", "inspect {exp}"),
            ("lint", "inspect {exp} --lint"),
            ("sample", "sample {exp} -b ort -n 1 --steps 2 -o {{tmp}}/s"),
            ("openvino", "sample {exp} -b openvino -n 1 --steps 2 -o {{tmp}}/s"),
            ("torch", "sample {exp} -b torch -n 1 --steps 2 -o {{tmp}}/s"),
            ("compare", "compare {exp} --backends torch,ort -n 1 --steps 2"),
        )
    },
    "export-corrupt-out": case(
        f"{EXPORT} -o {{corrupt_garbage}}", "not a complete earlier export", keep=("corrupt_garbage",)
    ),
    # --- an export follows its calibration; an explicit conflicting option names both --------
    "export-calibration-a4-act-bits-8": case(
        "export -c digits --calibration {cal_a4} --act-bits 8 -o {tmp}/e", "--act-bits 8 (file: 4)"
    ),
    "export-calibration-a4-weight-bits": case(
        "export -c digits --calibration {cal_a4} --weight-bits 4 -o {tmp}/e", "--weight-bits 4 (file: 8)"
    ),
    "export-calibration-a4-fp8": case(
        "export -c digits --calibration {cal_a4} --act-format fp8 -o {tmp}/e", "--act-format fp8 (file: int)"
    ),
    "sample-calibration-a4-act-bits-8": case(
        f"{SAMPLE} --calibration {{cal_a4}} --act-bits 8", "--act-bits 8 (file: 4)"
    ),
    "sample-calibration-a4-modulate": case(
        f"{SAMPLE} --calibration {{cal_a4}} --no-modulate", "--modulate off (file: on)"
    ),
    # --- sample: ranges --------------------------------------------------------------------
    "sample-steps-0": case(f"{SAMPLE} --steps 0", "--steps 0"),
    "sample-steps-negative": case(f"{SAMPLE} --steps -1", "--steps -1"),
    "sample-steps-above-T": case(f"{SAMPLE} --steps 1001", "--steps 1001"),
    "sample-n-0": case(f"{SAMPLE} -n 0", "--num-images 0"),
    "sample-n-negative": case(f"{SAMPLE} -n -3", "--num-images -3"),
    "sample-batch-0": case(f"{SAMPLE} --batch-size 0", "--batch-size 0"),
    "sample-seed-negative": case(f"{SAMPLE} --seed -1", "--seed -1"),
    "sample-eta-nan": case(f"{SAMPLE} --eta nan", "--eta nan"),
    "sample-eta-inf": case(f"{SAMPLE} --eta inf", "--eta inf"),
    "sample-eta-negative": case(f"{SAMPLE} --eta -0.5", "--eta -0.5"),
    "sample-eta-above-1-diverges": case(f"{SAMPLE} --eta 20", "--eta 20.0"),
    "export-sample-eta-above-1-diverges": case(
        "sample {export} -b ort -n 1 --steps 2 -o {tmp}/s --eta 20", "--eta 20.0"
    ),
    "sample-weight-bits-1": case(f"{SAMPLE} --weight-bits 1", "weight"),
    "sample-act-bits-9": case(f"{SAMPLE} --act-bits 9", "act"),
    # --- sample: choices -------------------------------------------------------------------
    "sample-skip-type": case(f"{SAMPLE} --skip-type foo", "--skip-type"),
    "sample-backend": case(f"{SAMPLE} --backend foo", "--backend"),
    "sample-first-step": case(f"{SAMPLE} --first-step foo", "--first-step"),
    "sample-state-dtype": case(f"{SAMPLE} --state-dtype float64", "--state-dtype"),
    "sample-act-scales": case(f"{SAMPLE} --act-scales foo", "--act-scales"),
    "sample-ort-provider": case(f"{SAMPLE} --ort-provider foo", "--ort-provider"),
    "sample-sampler": case(f"{SAMPLE} --sampler foo", "--sampler"),
    "sample-act-format": case(f"{SAMPLE} --act-format int4", "--act-format"),
    # --- sample: what cannot apply ---------------------------------------------------------
    "sample-no-config": case("sample -n 1 -o {tmp}/s", "--config"),
    "sample-backend-without-export": case(f"{SAMPLE} --backend ort", "--backend ort"),
    "sample-cuda-graph-without-export": case(f"{SAMPLE} --cuda-graph", "--cuda-graph"),
    "sample-random-weights-with-checkpoint": case(
        f"{SAMPLE} --checkpoint {{ckpt}} --random-weights", "--random-weights"
    ),
    "sample-checkpoint-dir": case(f"{SAMPLE} --checkpoint {{tmp}}", "--checkpoint {tmp} is a directory"),
    "sample-checkpoint-missing": case(f"{SAMPLE} --checkpoint {{tmp}}/none.ckpt", "none.ckpt"),
    "sample-checkpoint-junk": case(f"{SAMPLE} --checkpoint {{junk}}", "junk.ckpt"),
    "sample-calibration-missing": case(f"{SAMPLE} --calibration {{tmp}}/none.safetensors", "none.safetensors"),
    "sample-calibration-not-one": case(f"{SAMPLE} --calibration {{ckpt}}", "digits-copy.safetensors"),
    "sample-calibration-act-bits": case(f"{SAMPLE} --calibration {{cal}} --act-bits 4", "--act-bits 4"),
    "sample-calibration-no-modulate": case(f"{SAMPLE} --calibration {{cal}} --no-modulate", "--modulate off"),
    "sample-calibration-float": case(f"{SAMPLE} --calibration {{cal}} --act-bits 0", "--act-bits 0"),
    "sample-calibration-scale-edited": case(
        f"{SAMPLE} --calibration {{cal_edited}}", "act scale 1e+30 cannot come from its measured absmax"
    ),
    "sample-config-missing": case("sample -c {tmp}/none.yml -n 1 --steps 2 -o {tmp}/s", "none.yml"),
    "sample-config-fraction": case("sample -c {yaml_fraction} --random-weights -n 1 --steps 2 -o {tmp}/s", "model.ch"),
    "sample-config-negative": case("sample -c {yaml_negative} --random-weights -n 1 --steps 2 -o {tmp}/s", "model.ch"),
    "sample-config-short-T": case("sample -c {yaml_short_t} --random-weights -n 1 -o {tmp}/s", "--steps 100"),
    "sample-config-betas": case("sample -c {yaml_betas} --random-weights -n 1 --steps 2 -o {tmp}/s", "beta_start"),
    "sample-config-missing-field": case("sample -c {yaml_no_ch} --random-weights -n 1 --steps 2 -o {tmp}/s", "'ch'"),
    # --- sample: outputs -------------------------------------------------------------------
    "sample-out-is-file": case("sample -c digits -n 1 --steps 2 -o {notes}", "--out", keep=("notes",)),
    "sample-out-not-empty": case(
        "sample -c digits -n 1 --steps 2 -o {old_samples}", "--overwrite", keep=("old_samples",)
    ),
    "sample-out-under-file": case(
        "sample -c digits -n 1 --steps 2 -o {notes}/s", "not a writable directory", keep=("notes",)
    ),
    # --- sample with an export: options the export fixed ----------------------------------
    "export-sample-act-bits": case("sample {export} -b ort -n 1 --steps 2 -o {tmp}/s --act-bits 4", "--act-bits"),
    "export-sample-weight-bits": case(
        "sample {export} -b ort -n 1 --steps 2 -o {tmp}/s --weight-bits 4", "--weight-bits"
    ),
    "export-sample-modulate": case(
        "sample {export} -b ort -n 1 --steps 2 -o {tmp}/s --no-modulate",
        "--no-modulate cannot apply to an export directory: the export fixed it",
    ),
    "export-sample-act-format": case(
        "sample {export} -b ort -n 1 --steps 2 -o {tmp}/s --act-format fp8", "--act-format"
    ),
    "export-sample-act-scales": case(
        "sample {export} -b ort -n 1 --steps 2 -o {tmp}/s --act-scales dynamic", "--act-scales"
    ),
    "export-sample-config": case("sample {export} -b ort -n 1 --steps 2 -o {tmp}/s -c digits", "--config"),
    "export-sample-checkpoint": case(
        "sample {export} -b ort -n 1 --steps 2 -o {tmp}/s --checkpoint {ckpt}", "--checkpoint"
    ),
    "export-sample-calibration": case(
        "sample {export} -b ort -n 1 --steps 2 -o {tmp}/s --calibration {cal}", "--calibration"
    ),
    "export-sample-cuda-graph-ort": case(
        "sample {export} -b ort -n 1 --steps 2 -o {tmp}/s --cuda-graph", "--cuda-graph"
    ),
    "export-sample-steps-0": case("sample {export} -b ort -n 1 --steps 0 -o {tmp}/s", "--steps 0"),
    "export-sample-not-export": case("sample {tmp} -b ort -n 1 --steps 2 -o {tmp}/s", "manifest.json"),
    "export-sample-out-not-empty": case(
        "sample {export} -b ort -n 1 --steps 2 -o {old_samples}", "--overwrite", keep=("old_samples",)
    ),
    # --- calibrate -------------------------------------------------------------------------
    "calibrate-out-is-checkpoint": case(f"{CAL} --checkpoint {{ckpt}} -o {{ckpt}}", "--checkpoint", keep=("ckpt",)),
    "calibrate-out-is-weights": case(f"{CAL} -o {{ckpt}}", "not a calibration file", keep=("ckpt",)),
    "calibrate-out-is-notes": case(f"{CAL} -o {{notes}}", "not a calibration file", keep=("notes",)),
    "calibrate-out-is-dir": case(f"{CAL} -o {{old_samples}}", "is a directory", keep=("old_samples",)),
    "calibrate-out-under-file": case(f"{CAL} -o {{notes}}/c.safetensors", "not a writable directory", keep=("notes",)),
    "calibrate-cali-n-0": case(f"{CAL} --cali-n 0 -o {{tmp}}/c.safetensors", "--cali-n 0"),
    "calibrate-cali-st-0": case(f"{CAL} --cali-st 0 -o {{tmp}}/c.safetensors", "--cali-st 0"),
    "calibrate-batch-0": case(f"{CAL} --batch-size 0 -o {{tmp}}/c.safetensors", "--batch-size 0"),
    "calibrate-seed-negative": case(f"{CAL} --seed -2 -o {{tmp}}/c.safetensors", "--seed -2"),
    "calibrate-eta-nan": case(f"{CAL} --eta nan -o {{tmp}}/c.safetensors", "--eta nan"),
    "calibrate-steps-0": case(f"{CAL} --steps 0 -o {{tmp}}/c.safetensors", "--steps 0"),
    "calibrate-method": case(f"{CAL} --method foo -o {{tmp}}/c.safetensors", "--method"),
    "calibrate-act-format": case(f"{CAL} --act-format fp4 -o {{tmp}}/c.safetensors", "--act-format"),
    "calibrate-nvfp4-mse": case(f"{CAL} --act-format nvfp4 --method mse -o {{tmp}}/c.safetensors", "--method mse"),
    "calibrate-act-bits-0": case(f"{CAL} --act-bits 0 -o {{tmp}}/c.safetensors", "no activation scales to measure"),
    "calibrate-act-format-without-bits": case(
        f"{CAL} --act-bits 0 --act-format fp8 -o {{tmp}}/c.safetensors", "--act-format fp8 with --act-bits 0"
    ),
    "sample-scheduler-unknown": case(f"{SAMPLE} --scheduler heun", "--scheduler"),
    "sample-scheduler-and-sampler": case(f"{SAMPLE} --scheduler pndm --sampler ddim", "--sampler and --scheduler"),
    "sample-config-folder-not-diffusers": case(
        "sample -c {old_samples} -n 1 --steps 2 -o {tmp}/s", "neither a diffusers UNet folder", keep=("old_samples",)
    ),
    "sample-act-format-without-bits": case(f"{SAMPLE} --act-bits 0 --act-format nvfp4", "--act-format nvfp4 with"),
    "export-act-format-without-bits": case(
        "export -c digits --act-bits 0 --act-format fp8 -o {tmp}/e", "--act-format fp8 with --act-bits 0"
    ),
    "sample-dist-timeout-0": case(f"{SAMPLE} --dist-timeout 0", "--dist-timeout 0.0 is invalid"),
    "sample-dist-timeout-negative": case(f"{SAMPLE} --dist-timeout -1", "--dist-timeout -1.0 is invalid"),
    "sample-dist-timeout-nan": case(f"{SAMPLE} --dist-timeout nan", "--dist-timeout nan is invalid"),
    "sample-n-beyond-the-disk": case(
        "sample -c digits -n 1000000000000 --steps 2 -o {tmp}/s", "-n 1000000000000 needs at least"
    ),
    "calibrate-first-step": case(f"{CAL} --first-step foo -o {{tmp}}/c.safetensors", "--first-step"),
    "calibrate-skip-type": case(f"{CAL} --skip-type foo -o {{tmp}}/c.safetensors", "--skip-type"),
    "calibrate-both-sources": case(
        f"{CAL} --checkpoint {{ckpt}} --from-qdiffusion {{junk}} -o {{tmp}}/c.safetensors", "--from-qdiffusion"
    ),
    "calibrate-random-weights-with-checkpoint": case(
        f"{CAL} --checkpoint {{ckpt}} --random-weights -o {{tmp}}/c.safetensors", "--random-weights"
    ),
    "calibrate-checkpoint-dir": case(
        f"{CAL} --checkpoint {{tmp}} -o {{tmp}}/c.safetensors", "--checkpoint {tmp} is a directory"
    ),
    "calibrate-qdiffusion-dir": case(
        f"{CAL} --from-qdiffusion {{tmp}} -o {{tmp}}/c.safetensors", "--from-qdiffusion {tmp} is a directory"
    ),
    "export-checkpoint-dir": case(f"{EXPORT} --checkpoint {{tmp}} -o {{tmp}}/e", "--checkpoint {tmp} is a directory"),
    "export-calibration-dir": case(
        "export -c digits --calibration {tmp} -o {tmp}/e", "--calibration {tmp} is a directory"
    ),
    "sample-calibration-dir": case(f"{SAMPLE} --calibration {{tmp}}", "--calibration {tmp} is a directory"),
    # --- export ----------------------------------------------------------------------------
    "export-batch-0": case(f"{EXPORT} --batch-size 0 -o {{tmp}}/e", "--batch-size 0"),
    "export-batch-negative": case(f"{EXPORT} --batch-size -1 -o {{tmp}}/e", "--batch-size -1"),
    "export-batch-and-dynamic": case(f"{EXPORT} --batch-size 2 --dynamic-batch -o {{tmp}}/e", "--dynamic-batch"),
    "export-float": case(f"{EXPORT} --float fp64 -o {{tmp}}/e", "--float"),
    "export-target": case(f"{EXPORT} --target foo -o {{tmp}}/e", "--target"),
    "export-opset": case(f"{EXPORT} --opset 5 -o {{tmp}}/e", "opset 5"),
    "export-out-unrelated": case(f"{EXPORT} -o {{user_dir}}", "NOTES.md", keep=("user_dir",)),
    "export-out-skeletal-manifest": case(
        f"{EXPORT} -o {{skeletal}}", "not a complete earlier export", keep=("skeletal",)
    ),
    "export-out-export-plus-notes": case(f"{EXPORT} -o {{export_notes}}", "NOTES.md", keep=("export_notes",)),
    "export-out-is-file": case(f"{EXPORT} -o {{notes}}", "--out", keep=("notes",)),
    "export-calibration-act-bits": case(f"{EXPORT} --act-bits 4 -o {{tmp}}/e", "--act-bits 4"),
    "export-calibration-weight-bits": case(f"{EXPORT} --weight-bits 4 -o {{tmp}}/e", "--weight-bits 4"),
    "export-calibration-no-modulate": case(f"{EXPORT} --no-modulate -o {{tmp}}/e", "--modulate off"),
    "export-calibration-first-step": case(f"{EXPORT} --first-step quantized -o {{tmp}}/e", "--first-step quantized"),
    "export-calibration-float": case(f"{EXPORT} --act-bits 0 -o {{tmp}}/e", "--act-bits 0"),
    "export-calibration-act-format": case(f"{EXPORT} --act-format fp8 -o {{tmp}}/e", "--act-format fp8 (file: int)"),
    "sample-calibration-act-format": case(
        f"{SAMPLE} --calibration {{cal}} --act-format nvfp4", "--act-format nvfp4 (file: int)"
    ),
    "export-calibration-scale-edited": case(
        "export -c digits --calibration {cal_edited} -o {tmp}/e", "act scale 1e+30 cannot come from its measured absmax"
    ),
    "export-random-weights-with-checkpoint": case(
        f"{EXPORT} --checkpoint {{ckpt}} --random-weights -o {{tmp}}/e", "--random-weights"
    ),
    # --- inspect ---------------------------------------------------------------------------
    "inspect-batch-0": case("inspect {export} --batch 0", "--batch 0"),
    "inspect-batch-negative": case("inspect {export} --batch -4", "--batch -4"),
    "inspect-not-export": case("inspect {tmp}", "manifest.json"),
    "inspect-missing-dir": case("inspect {tmp}/nowhere", "manifest.json"),
    "inspect-manifest-not-json": case("inspect {bad_json}", "not valid JSON"),
    "inspect-manifest-schema": case("inspect {skeletal}", "not a modiff-trt manifest"),
    "inspect-manifest-edited-bits": case("inspect {edited_bits}", "other bits"),
    "inspect-manifest-edited-io": case("inspect {edited_io} --lint", "inputs differ"),
    "inspect-manifest-dropped-layer": case(
        "inspect {dropped_layer}", "the warmup graph writes the state a_hat_out.conv_out, against the manifest's"
    ),
    "sample-manifest-edited-io": case("sample {edited_io} -b ort -n 1 --steps 2 -o {tmp}/s", "inputs differ"),
    # --- compare ---------------------------------------------------------------------------
    "compare-n-0": case(f"{COMPARE} -n 0", "--num-images 0"),
    "compare-steps-0": case(f"{COMPARE} --steps 0", "--steps 0"),
    "compare-steps-above-T": case(f"{COMPARE} --steps 2000", "--steps 2000"),
    "compare-one-backend": case("compare {export} --backends torch", "--backends"),
    "compare-unknown-backend": case("compare {export} --backends torch,foo", "foo"),
    "compare-skip-type": case(f"{COMPARE} --skip-type foo", "--skip-type"),
    "compare-seed-negative": case(f"{COMPARE} --seed -1", "--seed -1"),
    "compare-json-under-file": case(f"{COMPARE} --json {{notes}}/x.json", "--json", keep=("notes",)),
    "compare-json-is-dir": case(f"{COMPARE} --json {{tmp}}", "--json"),
    "compare-json-exists": case(f"{COMPARE} --json {{notes}}", "--overwrite", keep=("notes",)),
    "compare-json-into-the-export": case(
        f"{COMPARE} --json {{export}}/manifest.json --overwrite", "inside the export directory", keep=("export",)
    ),
    # --- train-digits ----------------------------------------------------------------------
    "train-out-exists": case("train-digits --iterations 1 --out {ckpt}", "--overwrite", keep=("ckpt",)),
    "train-iterations-0": case("train-digits --iterations 0 --out {tmp}/w.safetensors", "--iterations 0"),
    "train-seed-negative": case("train-digits --seed -1 --out {tmp}/w.safetensors", "--seed -1"),
    "train-out-dir": case("train-digits --iterations 1 --out {old_samples}", "is a directory", keep=("old_samples",)),
    # --- demo ------------------------------------------------------------------------------
    "demo-n-0": case("demo -n 0 -o {tmp}/d", "--num-images 0"),
    "demo-steps-0": case("demo --steps 0 -o {tmp}/d", "--steps 0"),
    "demo-seed-negative": case("demo --seed -1 -o {tmp}/d", "--seed -1"),
    "demo-out-not-empty": case("demo -n 1 --steps 2 -o {old_samples}", "--overwrite", keep=("old_samples",)),
    # --- build / profile -------------------------------------------------------------------
    "build-max-batch-0": case("build {export} --max-batch 0", "--max-batch 0"),
    "build-workspace-0": case("build {export} --workspace-gb 0", "--workspace-gb"),
    "build-not-export": case("build {tmp}", "manifest.json"),
    "profile-batch-0": case("profile {export} --batch 0 --dry-run", "--batch 0"),
    "profile-engine": case("profile {export} --engine foo", "--engine"),
    "profile-top-0": case("profile {export} --top 0 --dry-run", "--top 0"),
}


def _write_yaml(path: Path, edit) -> Path:
    raw = yaml.safe_load(DIGITS_YAML.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Files a user might have lying around, plus a real calibration and export of `digits`."""
    root = tmp_path_factory.mktemp("world")
    paths = {
        "ckpt": root / "digits-copy.safetensors",
        "junk": root / "junk.ckpt",
        "notes": root / "NOTES.md",
        "old_samples": root / "old-samples",
        "user_dir": root / "user-dir",
        "skeletal": root / "skeletal",
        "bad_json": root / "bad-json",
        "cal": root / "digits.cal.safetensors",
        "export": root / "exp",
        "export_notes": root / "exp-notes",
    }
    shutil.copy(builtin_checkpoint("digits"), paths["ckpt"])
    paths["junk"].write_text("not a checkpoint")
    paths["notes"].write_text("my notes\n")
    paths["old_samples"].mkdir()
    (paths["old_samples"] / "000000.png").write_bytes(b"an old sample")
    paths["user_dir"].mkdir()
    (paths["user_dir"] / "NOTES.md").write_text("do not delete\n")
    paths["skeletal"].mkdir()
    (paths["skeletal"] / "manifest.json").write_text(json.dumps({"schema": "something else"}))
    (paths["skeletal"] / "data.bin").write_bytes(b"\x00\x01")
    paths["bad_json"].mkdir()
    (paths["bad_json"] / "manifest.json").write_text("{not json")
    paths["yaml_fraction"] = _write_yaml(root / "fraction.yml", lambda r: r["model"].update(ch=32.5))
    paths["yaml_negative"] = _write_yaml(root / "negative.yml", lambda r: r["model"].update(ch=-32))
    paths["yaml_short_t"] = _write_yaml(root / "short.yml", lambda r: r["diffusion"].update(num_diffusion_timesteps=5))
    paths["yaml_betas"] = _write_yaml(root / "betas.yml", lambda r: r["diffusion"].update(beta_start=0.5))
    paths["yaml_no_ch"] = _write_yaml(root / "no-ch.yml", lambda r: r["model"].pop("ch"))
    made = runner.invoke(app, [*CAL.split(), "-o", str(paths["cal"])])
    assert made.exit_code == 0, made.output
    made = runner.invoke(app, [*EXPORT.format(cal=paths["cal"]).split(), "-o", str(paths["export"])])
    assert made.exit_code == 0, made.output
    paths["cal_edited"] = _edited_calibration(paths["cal"], root / "edited.cal.safetensors")
    shutil.copytree(paths["export"], paths["export_notes"])
    (paths["export_notes"] / "NOTES.md").write_text("mine\n")
    paths["edited_bits"] = _edited_export(paths["export"], root / "exp-bits", lambda m: m["quant"].update(act_bits=4))
    paths["edited_io"] = _edited_export(
        paths["export"], root / "exp-io", lambda m: m["graphs"]["step"]["inputs"][0].update(name="image")
    )
    paths["dropped_layer"] = _edited_export(paths["export"], root / "exp-layers", lambda m: m["layers"].pop())
    for name, (edit, _) in MANIFEST_EDITS.items():
        paths[f"manifest_{name}"] = _edited_export(paths["export"], root / f"exp-{name}", edit)
    _issue_20_world(paths, root)
    return paths


def _issue_20_world(paths: dict[str, Path], root: Path) -> None:
    """Exports whose graph names point outside, whose calibration changed, whose graphs are
    damaged, and a 4-bit calibration for the options an export takes from it."""
    export = paths["export"]
    paths["outside_graph"] = root / "outside.onnx"
    shutil.copy(export / "step.onnx", paths["outside_graph"])
    for how, name in PATH_EDITS.items():
        edit = lambda m, file=name(paths): m["graphs"]["step"].update(file=file)  # noqa: E731
        paths[f"paths_{how}"] = _edited_export(export, root / f"exp-paths-{how}", edit)
    paths["paths_external"] = _damaged_export(export, root / "exp-paths-external", _weights_outside, rehash=True)
    paths["prov_swapped"] = _damaged_export(
        export, root / "exp-prov-swapped", lambda d: shutil.copy(paths["cal_edited"], d / "calibration.safetensors")
    )
    for name, recorded in (("old", paths["cal_edited"]), ("gone", root / "moved-away.cal.safetensors")):
        out = _edited_export(
            export, root / f"exp-prov-{name}", lambda m, p=recorded: m["calibration"].update(path=str(p))
        )
        (out / "calibration.safetensors").unlink()  # an export made before exports kept a copy
        paths[f"prov_{name}"] = out
    garbage = lambda d: (d / "step.onnx").write_bytes(b"not an onnx graph\n" * 64)  # noqa: E731
    truncated = lambda d: (d / "step.onnx").write_bytes((d / "step.onnx").read_bytes()[:100_000])  # noqa: E731
    paths["corrupt_garbage"] = _damaged_export(export, root / "exp-garbage", garbage, rehash=True)
    paths["corrupt_truncated"] = _damaged_export(export, root / "exp-truncated", truncated, rehash=True)
    paths["corrupt_stale-hash"] = _damaged_export(export, root / "exp-stale-hash", truncated)
    paths["cal_a4"] = root / "a4.cal.safetensors"
    made = runner.invoke(app, [*CAL.split(), "--act-bits", "4", "-o", str(paths["cal_a4"])])
    assert made.exit_code == 0, made.output


def _damaged_export(export: Path, out: Path, damage, rehash: bool = False) -> Path:
    """A copy of `export` whose files `damage(out)` changed; `rehash`: the manifest's step sha256
    follows the new step.onnx, so only reading the graph itself can find the damage."""
    shutil.copytree(export, out)
    damage(out)
    if rehash:
        from modiff_trt.export.manifest import sha256_graph

        manifest = json.loads((out / "manifest.json").read_text())
        manifest["graphs"]["step"]["sha256"] = sha256_graph(out / "step.onnx")
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _weights_outside(out: Path) -> None:
    """Move the largest initializer of step.onnx to `../outside.data` (external data outside the export)."""
    import onnx

    model = onnx.load(str(out / "step.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (out.parent / "outside.data").write_bytes(tensor.raw_data)
    tensor.external_data.add(key="location", value="../outside.data")
    tensor.external_data.add(key="length", value=str(len(tensor.raw_data)))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    (out / "step.onnx").write_bytes(model.SerializeToString())


def _edited_calibration(cal: Path, out: Path) -> Path:
    """A copy of `cal` whose first layer's activation scale a user set to 1e30 by hand."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(cal), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(cal)
    first = json.loads(metadata["modiff_trt"])["layers"][0]
    tensors[f"{first}.act"][0] = 1e30
    save_file(tensors, out, metadata=metadata)
    return out


def _edited_export(export: Path, out: Path, edit) -> Path:
    """A copy of `export` whose manifest a user edited by hand (the graphs stay as exported)."""
    shutil.copytree(export, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_in_one_line(name, world, tmp_path):
    bad = CASES[name]
    paths = {**world, "tmp": tmp_path}  # outputs go to a fresh folder: one case cannot spoil the next
    names = {k: str(v) for k, v in paths.items()}
    args = [arg.format(**names) for arg in bad.args]
    before = {key: snapshot(world[key]) for key in bad.keep}
    result = runner.invoke(app, args)
    output = result.output
    assert result.exit_code == bad.code, output
    assert "Traceback" not in output and not isinstance(result.exception, (AssertionError, NameError)), output
    assert bad.needle.format(**names) in output, output
    ours = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(ours) <= 1 and (ours or "Invalid value" in output or "Error" in output), output
    for key in bad.keep:
        assert snapshot(world[key]) == before[key], f"{key} changed"
    leftovers = [
        p.name
        for folder in (tmp_path, world["notes"].parent)
        for p in folder.iterdir()
        if ".tmp-" in p.name or ".old-" in p.name
    ]
    assert not leftovers and not (tmp_path / "s").exists()


def test_corpus_covers_every_command():
    commands = {c.args[0] for c in CASES.values()}
    assert commands == {
        "sample",
        "calibrate",
        "export",
        "inspect",
        "compare",
        "train-digits",
        "demo",
        "build",
        "profile",
    }
    assert len(CASES) >= 80


#: The classes of bad input issue 20 found handled poorly, by the word their case names carry.
ISSUE_20_CLASSES = {"fields": "-manifest-", "paths": "-paths-", "provenance": "-provenance-", "corrupt": "-corrupt-"}


def corpus_classes(names) -> dict[str, int]:
    """How many cases of `names` fall in each class of `ISSUE_20_CLASSES`."""
    return {label: sum(word in name for name in names) for label, word in ISSUE_20_CLASSES.items()}


def test_corpus_covers_every_class_of_issue_20():
    counts = corpus_classes(CASES)
    assert all(count >= 5 for count in counts.values()), counts


def test_unexpected_errors_are_one_line_and_v_shows_the_traceback(monkeypatch, tmp_path):
    from modiff_trt.export import manifest

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(manifest, "load_manifest", boom)
    quiet = runner.invoke(app, ["inspect", str(tmp_path)])
    assert quiet.exit_code == 1
    assert quiet.output.strip() == "error: inspect failed: RuntimeError: disk on fire (run with -v for the traceback)"
    loud = runner.invoke(app, ["-v", "inspect", str(tmp_path)])
    assert loud.exit_code == 1 and "Traceback" in loud.output and "disk on fire" in loud.output


def test_overwrite_replaces_a_sample_directory_as_a_whole(world, tmp_path):
    out = tmp_path / "samples"
    shutil.copytree(world["old_samples"], out)
    (out / "stale.png").write_bytes(b"stale")
    result = runner.invoke(app, ["sample", "-c", "digits", "-n", "1", "--steps", "2", "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "grid.png", "samples.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]


def test_export_replaces_an_earlier_export_and_says_which_engines_go(world, tmp_path):
    out = tmp_path / "exp"
    shutil.copytree(world["export"], out)
    (out / "step.plan").write_bytes(b"engine built from the old graphs")
    result = runner.invoke(app, [*EXPORT.format(cal=world["cal"]).split(), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "step.plan" in result.output and not (out / "step.plan").exists()
    assert (out / "manifest.json").is_file()


def _tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under `path`, hidden ones too, with a file's bytes (None for a folder)."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("earlier", [False, True], ids=["new-out", "overwrite"])
def test_a_full_disk_mid_sample_leaves_nothing_new(world, tmp_path, monkeypatch, earlier):
    from modiff_trt.sampling.writer import SampleWriter

    real_add, batches = SampleWriter.add, []

    def add_until_the_disk_fills(self, first_index, x0, **extra):
        batches.append(first_index)
        if len(batches) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_add(self, first_index, x0, **extra)

    monkeypatch.setattr(SampleWriter, "add", add_until_the_disk_fills)
    out = tmp_path / "samples"
    if earlier:
        shutil.copytree(world["old_samples"], out)
    before = _tree(tmp_path)
    result = runner.invoke(
        app,
        [
            "sample",
            "-c",
            "digits",
            "-n",
            "4",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "-o",
            str(out),
            *(["--overwrite"] if earlier else []),
        ],
    )
    assert result.exit_code == 2 and batches == [0, 2], result.output
    untouched = ", the earlier one is untouched" if earlier else ""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {out}: no space left on the device while writing it, so nothing was kept{untouched}: "
        "free space or write somewhere else"
    ], result.output
    assert _tree(tmp_path) == before  # no partial PNGs, no temporary folder, the earlier run intact


def test_export_and_sample_take_their_settings_from_the_calibration(world, tmp_path):
    from modiff_trt.export.manifest import load_manifest

    out = tmp_path / "e"
    result = runner.invoke(app, ["export", "-c", "digits", "--calibration", str(world["cal_a4"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert (manifest.quant.weight_bits, manifest.quant.act_bits) == (8, 4)
    assert {layer.act_bits for layer in manifest.layers} == {4}
    sample = [*SAMPLE.format(tmp=tmp_path).split(), "--calibration", str(world["cal_a4"])]
    result = runner.invoke(app, sample)
    assert result.exit_code == 0, result.output


def _compare(export: Path) -> None:
    result = runner.invoke(app, ["compare", str(export), "--backends", "torch,ort", "-n", "1", "--steps", "2"])
    assert result.exit_code == 0, result.output


def test_an_export_keeps_its_own_calibration(world, tmp_path):
    """Recalibrating into the file an export was made from no longer changes its torch reference."""
    from modiff_trt.export.manifest import load_manifest, sha256_file

    cal, out = tmp_path / "c.cal.safetensors", tmp_path / "e"
    shutil.copy(world["cal"], cal)
    result = runner.invoke(app, [*EXPORT.format(cal=cal).split(), "-o", str(out)])
    assert result.exit_code == 0, result.output
    copy = out / "calibration.safetensors"
    assert copy.read_bytes() == cal.read_bytes()
    assert load_manifest(out).calibration.sha256 == sha256_file(copy)
    shutil.copy(world["cal_a4"], cal)  # the user recalibrates into the same path
    _compare(out)
    result = runner.invoke(app, [*EXPORT.format(cal=copy).split(), "-o", str(out)])  # re-export from its own copy
    assert result.exit_code == 0, result.output
    assert copy.read_bytes() == world["cal"].read_bytes()


def test_an_export_without_a_copy_uses_the_recorded_calibration_while_it_is_unchanged(world, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(world["export"], out)
    (out / "calibration.safetensors").unlink()
    _compare(out)
