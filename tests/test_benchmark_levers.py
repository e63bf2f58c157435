"""benchmarks/reconstruction_levers.py: its files share one reconstruction, its table names each run.

The script screens AdaRound options by calibrating a weight-only file and MoDiff W4A4 files per
activation scale search together; that is only a fair comparison (and only as cheap as one
reconstruction) when every file asks for the same reconstruction.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from modiff_trt.calibrators.calibrate import _recon_key

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def levers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("reconstruction_levers")


def _args(**over) -> argparse.Namespace:
    base = {
        "recon_iters": 3000,
        "recon_lr": 2e-3,
        "recon_samples": 1280,
        "recon_reg": 0.01,
        "recon_seed": 3,
        "w4a8": True,
        "cali_st": 20,
        "cali_n": 64,
        "act_methods": ["minmax", "mse", "percentile:4"],
    }
    return argparse.Namespace(**{**base, **over})


def test_every_lever_file_asks_for_one_and_the_same_reconstruction(levers, tmp_path):
    rows = levers.targets(tmp_path, _args())
    assert list(rows) == [
        "W4 weight-only",
        "W4A8 MoDiff, minmax act scales",
        "W4A4 MoDiff, minmax act scales",
        "W4A4 MoDiff, mse act scales",
        "W4A4 MoDiff, percentile act scales, 4 step groups",
    ]
    options = [o for _, o in rows.values()]
    assert all(o.reconstructs for o in options)
    assert {_recon_key(o) for o in options} == {_recon_key(options[0])}
    recon = options[0].reconstruction
    assert (recon.iterations, recon.learning_rate, recon.samples, recon.reg_weight, recon.seed) == (
        3000,
        2e-3,
        1280,
        0.01,
        3,
    )
    assert {o.cali_st for o in options} == {20}
    assert [(o.act_bits, o.method, o.step_groups) for o in options[1:]] == [
        (8, "minmax", 1),
        (4, "minmax", 1),
        (4, "mse", 1),
        (4, "percentile", 4),
    ]
    assert len({path for path, _ in rows.values()}) == len(rows)
    assert options[0].act_bits is None and not options[0].modulate and all(o.modulate for o in options[1:])


def test_the_lever_table_has_one_row_per_file_with_its_command_and_load(levers):
    run = {
        "label": "iters3000",
        "command": "python benchmarks/reconstruction_levers.py --label iters3000 --recon-iters 3000",
        "machine": "AMD EPYC, 2 cores",
        "num_images": 128,
        "cali_st": 10,
        "reconstruction": {
            "iterations": 3000,
            "learning_rate": 1e-3,
            "reg_weight": 0.01,
            "seed": 0,
            "samples_used": 640,
            "seconds": 900.4,
        },
        "block_loss": {"nearest": 6.1, "adaround": 3.0},
        "calibration_seconds": 921.0,
        "loads": {"before": "2.0, 2.1, 2.2"},
        "scores": {
            "W4 weight-only": {"psnr_db": 31.234, "digits_fid": 7.0, "ort_psnr_db": 31.236},
            "W4A4 MoDiff, mse act scales": {"psnr_db": 28.5, "digits_fid": 9.0},
        },
    }
    text = levers.render([run])
    rows = [line for line in text.splitlines() if line.startswith("| iters3000")]
    assert len(rows) == 2
    assert "31.23" in rows[0] and "3000 it" in rows[0] and "640 inputs (cali-st 10), seed 0" in rows[0]
    assert "| 31.24 |" in rows[0] and "| - |" in rows[1]
    assert "900 / 921" in rows[0] and "before: 2.0, 2.1, 2.2" in rows[0]
    assert "`python benchmarks/reconstruction_levers.py --label iters3000 --recon-iters 3000`" in text


def test_the_clipping_probe_scales_every_residual_scale_and_only_those(levers):
    from modiff_trt.quant.scales import LayerScales, ScaleSet

    scales = ScaleSet(
        True,
        {
            "a": LayerScales(act=[2.0, 4.0], act_groups=[[2.0, 4.0], [8.0, 16.0]], warmup=[3.0]),
            "weights-only": LayerScales(),
        },
    )
    out = levers.scaled_acts(scales, 0.5)
    assert out.layers["a"].act == [1.0, 2.0]
    assert out.layers["a"].act_groups == [[1.0, 2.0], [4.0, 8.0]]
    assert out.layers["a"].warmup == [3.0]  # the float first step's scales are not the residual's
    assert out.layers["weights-only"].act is None and out.layers["weights-only"].act_groups is None
