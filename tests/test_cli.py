"""The CLI as a user meets it: outputs on disk in their documented formats, and clear errors."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from modiff_trt import __version__
from modiff_trt.cli import app

runner = CliRunner()


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).output.strip() == f"modiff-trt {__version__}"
    result = runner.invoke(app, ["--help"])
    for command in ("sample", "calibrate", "export", "inspect", "compare", "build", "profile", "demo", "train-digits"):
        assert command in result.output


def test_sample_writes_pngs_grid_and_npz_in_documented_layout(tmp_path, tiny_config, tiny_checkpoint):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "sample",
            "-c",
            str(tiny_config),
            "--checkpoint",
            str(tiny_checkpoint),
            "-n",
            "3",
            "--batch-size",
            "2",
            "--steps",
            "3",
            "--act-bits",
            "4",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(out / "000000.png").size == (16, 16)
    assert Image.open(out / "grid.png").mode == "RGB"
    data = np.load(out / "samples.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (3, 16, 16, 3)  # NHWC for the evaluator
    assert data["x0"].dtype == np.float32 and data["x0"].shape == (3, 3, 16, 16)
    expected = np.round((np.clip(data["x0"], -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(data["arr_0"], expected)


def test_missing_checkpoint_is_refused_not_silently_random(tmp_path, tiny_config):
    result = runner.invoke(
        app, ["sample", "-c", str(tiny_config), "-n", "1", "--steps", "2", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "--checkpoint is required" in result.output and "--random-weights" in result.output
    assert not (tmp_path / "o").exists()
    ok = runner.invoke(
        app,
        ["sample", "-c", str(tiny_config), "--random-weights", "-n", "1", "--steps", "2", "-o", str(tmp_path / "o")],
    )
    assert ok.exit_code == 0, ok.output


def test_bad_inputs_exit_2_with_the_file_named(tmp_path, tiny_config):
    bad = tmp_path / "model.ckpt"
    bad.write_text("not a checkpoint")
    result = runner.invoke(app, ["sample", "-c", str(tiny_config), "--checkpoint", str(bad), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "model.ckpt" in result.output and "not a torch checkpoint" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json not found" in result.output


def test_export_inspect_lint_and_compare(tmp_path, tiny_config, tiny_checkpoint):
    out = tmp_path / "exp"
    result = runner.invoke(
        app, ["export", "-c", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "--act-bits", "0", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", str(out), "--lint", "--batch", "4"])
    assert result.exit_code == 0, result.output
    assert "all TensorRT explicit-quantization rules hold" in result.output
    assert "MiB per sample" in result.output
    report = tmp_path / "cmp.json"
    result = runner.invoke(app, ["compare", str(out), "--steps", "3", "-n", "2", "--json", str(report)])
    assert result.exit_code == 0, result.output
    import json

    rows = json.loads(report.read_text())
    assert len(rows) == 3 and all(r["backend"] == "ort" and r["rel_err"] < 1e-5 for r in rows)


def test_sample_with_calibration_uses_its_static_scales_by_default(tmp_path, tiny_config, tiny_checkpoint):
    cal = tmp_path / "cal.safetensors"
    result = runner.invoke(
        app,
        [
            "calibrate",
            "-c",
            str(tiny_config),
            "--checkpoint",
            str(tiny_checkpoint),
            "--steps",
            "6",
            "--cali-st",
            "3",
            "--cali-n",
            "4",
            "--batch-size",
            "4",
            "--act-bits",
            "4",
            "-o",
            str(cal),
        ],
    )
    assert result.exit_code == 0, result.output
    common = [
        "sample",
        "-c",
        str(tiny_config),
        "--checkpoint",
        str(tiny_checkpoint),
        "-n",
        "2",
        "--steps",
        "6",
        "--act-bits",
        "4",
        "--no-pngs",
    ]
    outputs = {}
    for name, extra in {
        "default": ["--calibration", str(cal)],
        "static": ["--calibration", str(cal), "--act-scales", "static"],
        "dynamic": ["--act-scales", "dynamic"],
    }.items():
        assert runner.invoke(app, common + extra + ["-o", str(tmp_path / name)]).exit_code == 0
        outputs[name] = np.load(tmp_path / name / "samples.npz")["x0"]
    assert np.array_equal(outputs["default"], outputs["static"])
    assert not np.array_equal(outputs["default"], outputs["dynamic"])
