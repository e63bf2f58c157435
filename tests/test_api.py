"""The typed library API behind the commands: the same checks as the CLI, and the whole workflow without it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modiff_trt import api
from modiff_trt.errors import ArtifactError, OptionError

DIGITS = api.ModelOptions("digits")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (api.SampleOptions(model=DIGITS, sampling=api.SamplerOptions(steps=0)), "--steps 0 is invalid"),
        (api.SampleOptions(model=DIGITS, num_images=0), "--num-images 0 is invalid"),
        (api.SampleOptions(model=DIGITS, sampling=api.SamplerOptions(eta=float("nan"))), "--eta nan is invalid"),
        (api.SampleOptions(model=DIGITS, backend="ort"), "--backend ort runs an export directory"),
        (api.SampleOptions(), "give an export directory, or --config"),
    ],
)
def test_sample_refuses_what_the_cli_refuses_before_any_work(tmp_path, options, message):
    import dataclasses

    with pytest.raises(OptionError, match=message):
        api.sample(dataclasses.replace(options, out=tmp_path / "s"))
    assert not any(tmp_path.iterdir())


def test_calibrate_export_sample_compare_through_the_api(tmp_path):
    sampling = api.SamplerOptions(steps=3)
    cal = api.calibrate(
        api.CalibrateOptions(tmp_path / "cal.safetensors", DIGITS, sampling=sampling, cali_st=2, cali_n=2, batch_size=2)
    )
    assert cal.path == tmp_path / "cal.safetensors" and cal.meta["act_bits"] == 8
    manifest = api.export(api.ExportOptions(tmp_path / "exp", DIGITS, calibration=cal.path))
    assert manifest.quant.act_scales == "static" and (tmp_path / "exp" / "step.onnx").is_file()
    with pytest.raises(OptionError, match="--act-bits cannot apply to an export directory"):
        api.sample(api.SampleOptions(tmp_path / "s", tmp_path / "exp", "ort", quant=api.QuantOptions(act_bits=4)))
    with pytest.raises(ArtifactError, match="not empty: pass --overwrite"):
        api.sample(api.SampleOptions(tmp_path / "exp", tmp_path / "exp", "ort"))
    result = api.sample(
        api.SampleOptions(
            tmp_path / "s", tmp_path / "exp", "ort", sampling=sampling, num_images=3, batch_size=2, ort_provider="cpu"
        )
    )
    assert (result.num_images, result.processes, result.written) == (3, 1, True)
    with np.load(tmp_path / "s" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (3, 8, 8, 1) and npz["x0"].shape == (3, 1, 8, 8)
    table = tmp_path / "new" / "folder" / "c.json"  # --json creates its folders
    rows = api.compare(api.CompareOptions(tmp_path / "exp", num_images=2, steps=3, json_out=table))
    assert [(r.step, r.backend) for r in rows] == [(0, "ort"), (1, "ort"), (2, "ort")]
    assert max(r.rel_err for r in rows) < 1e-3 and [row["step"] for row in json.loads(table.read_text())] == [0, 1, 2]


def test_an_fp16_state_defaults_to_the_scaled_layout():
    """The measured default: a_hat in units of its scale in fp16 (0.01 dB at W8A8 against 0.42 for a
    plain fp16 a_hat); fp32 stays plain; an explicit layout wins."""
    from modiff_trt.api import QuantOptions

    assert QuantOptions(state_dtype="float16").config("static").state_layout == "scaled"
    assert QuantOptions().config("static").state_layout == "plain"
    assert QuantOptions(state_dtype="float16", state_layout="plain").config("static").state_layout == "plain"
