"""`modiff-trt demo` (the README's first command) on a reduced budget: files and their schema."""

from __future__ import annotations

import json
import os

from PIL import Image
from typer.testing import CliRunner

from modiff_trt.cli import app
from modiff_trt.demo import DEMO_ROWS, NVFP4_ROWS
from modiff_trt.engines.factory import fastest_cpu_backend
from modiff_trt.export.manifest import load_manifest
from modiff_trt.machine import cpu_model


def test_demo_writes_grid_and_report_and_shows_modiff_beating_plain_at_4_bits(tmp_path):
    """Also: the step-group row exports 4 groups pinned to the demo's schedule and beats one scale,
    and `--nvfp4` appends the NVFP4 row (default runs leave it out)."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "-o", str(out), "--num-images", "32", "--steps", "8", "--nvfp4"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == fastest_cpu_backend() and f"demo ({report['backend']}, CPU)" in result.output
    printed = " ".join(result.output.split())  # rich wraps long lines
    assert report["machine"].startswith(f"{cpu_model()}, {os.cpu_count()} cores") and cpu_model() in printed
    assert 0 < sum(row["seconds"] for row in report["rows"]) < report["seconds"]
    rows = {row["name"]: row for row in report["rows"]}
    assert (
        list(rows)
        == ["fp32", "qdiff-w8a8", "modiff-w8a8", "qdiff-w8a4", "modiff-w8a4", "modiff-w8a4-g4", "modiff-w8-nvfp4"]
        == list(DEMO_ROWS) + list(NVFP4_ROWS)
    )
    assert set(rows["fp32"]) == {"name", "psnr_db", "digits_fid", "confidence", "seconds", "backend"}
    # OpenVINO has no FP8/NVFP4 kernels: that row samples on ONNX Runtime, every other on the fastest backend
    assert {name: row["backend"] for name, row in rows.items() if row["backend"] != report["backend"]} == (
        {"modiff-w8-nvfp4": "ort"} if report["backend"] == "openvino" else {}
    )
    assert rows["fp32"]["psnr_db"] is None
    assert rows["modiff-w8a8"]["psnr_db"] > 30
    assert rows["modiff-w8a4"]["psnr_db"] > rows["qdiff-w8a4"]["psnr_db"] + 6
    assert rows["modiff-w8-nvfp4"]["psnr_db"] > rows["qdiff-w8a4"]["psnr_db"] + 6
    assert rows["modiff-w8a4-g4"]["psnr_db"] > rows["modiff-w8a4"]["psnr_db"]
    groups = load_manifest(out / "exports" / "modiff-w8a4-g4").step_groups  # per-group scales, pinned to 8 steps
    assert groups.count == 4 and groups.steps == 8 and len(groups.ratios) == 4
    assert load_manifest(out / "exports" / "modiff-w8a4").step_groups is None
    grid = Image.open(out / "grid.png")
    assert grid.height == len(rows) * (8 + 2) * 4  # one 8x8 strip (1 px padding) per row, upscaled 4x
    for name in rows:
        assert (out / "exports" / name / "manifest.json").is_file()
