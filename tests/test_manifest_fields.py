"""Every field of a real export's manifest.json is checked on load, found by walking the file.

The walk visits every object key of a manifest written by `modiff-trt export` (one with step
groups, so that section is filled; list elements: the first and the last). Each field is then
deleted, given a value of the wrong type, and joined by an unknown sibling: each edit must be
refused with one ArtifactError line naming the file, the field's path (`model.ema`,
`layers[50].kind`, `graphs.step.inputs[0].shape`) and the fix. A field added to the writer
without validation fails here, so the docs' "every field is checked" stays true.
"""

from __future__ import annotations

import builtins
import copy
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from modiff_trt.cli import app
from modiff_trt.errors import ArtifactError
from modiff_trt.export.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_graph

SOURCE = "/exports/e/manifest.json"
FIX = "re-run `modiff-trt export`"
WRONG = [{}]  # a list holding an object: no field of the manifest takes it
FREE_FORM = {("extra",)}  # objects whose keys are not fields (other tools' notes)

Path_ = tuple[str | int, ...]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A real digits export with 2 step groups (every section non-trivial)."""
    root = tmp_path_factory.mktemp("fields")
    cal, out = root / "g.cal.safetensors", root / "exp"
    common = ["-c", "digits", "--steps", "4"]
    made = CliRunner().invoke(
        app,
        ["calibrate", *common, "--cali-n", "1", "--cali-st", "3", "--batch-size", "1", "--step-groups", "2"]
        + ["-o", str(cal)],
    )
    assert made.exit_code == 0, made.output
    made = CliRunner().invoke(app, ["export", "-c", "digits", "--calibration", str(cal), "-o", str(out)])
    assert made.exit_code == 0, made.output
    return out


@pytest.fixture(scope="module")
def manifest(export_dir) -> dict[str, Any]:
    return json.loads((export_dir / MANIFEST_NAME).read_text())


def walk(node: Any, path: Path_ = ()) -> Iterator[Path_]:
    """The path of every object key below `node` (lists: their first and last element)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*path, key)
            if (*path, key) not in FREE_FORM:
                yield from walk(value, (*path, key))
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for index in sorted({0, len(node) - 1}):
            yield from walk(node[index], (*path, index))


def label(path: Path_) -> str:
    """A path as the messages write it: `graphs.step.inputs[0].shape`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def edited(data: dict[str, Any], path: Path_, edit) -> dict[str, Any]:
    data = copy.deepcopy(data)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    edit(parent, path[-1])
    return data


def refusal(data: dict[str, Any]) -> str:
    with pytest.raises(ArtifactError) as info:
        Manifest.from_dict(data, SOURCE)
    message = str(info.value)
    assert "\n" not in message and message.startswith(SOURCE) and FIX in message, message
    return message


def test_the_walk_sees_every_section_filled(manifest):
    paths = {label(p) for p in walk(manifest)}
    for field in ("model.sample_shape", "quant.act_format", "sampling.skip_type", "export.state_batch_multiplier"):
        assert field in paths
    assert {"layers[0].kind", "layers[50].act_zero_point", "graphs.step.file", "graphs.step.inputs[0].shape"} <= paths
    assert {"calibration.sha256", "step_groups.ratios", "step_groups.timesteps", "tool_version", "extra"} <= paths
    assert len(paths) > 100
    assert Manifest.from_dict(manifest, SOURCE).to_json() == json.dumps(manifest, indent=2)  # the bytes round-trip


def test_every_field_deleted_is_refused_by_name(manifest):
    for path in walk(manifest):
        message = refusal(edited(manifest, path, lambda parent, key: parent.pop(key)))
        assert label(path) in message, message


def test_every_field_of_the_wrong_type_is_refused_by_name(manifest):
    for path in walk(manifest):
        message = refusal(edited(manifest, path, lambda parent, key: parent.__setitem__(key, WRONG)))
        assert label(path) in message, message


def test_every_unknown_field_is_refused_by_name(manifest):
    objects = [()] + [p for p in walk(manifest) if isinstance(_at(manifest, p), dict) and p not in FREE_FORM]
    for path in objects:
        data = copy.deepcopy(manifest)
        _at(data, path)["bogus"] = 1
        assert label((*path, "bogus")) in refusal(data)


def _at(data: Any, path: Path_) -> Any:
    for part in path:
        data = data[part]
    return data


RANGES = {
    ("sampling", "eta"): -0.5,
    ("sampling", "steps"): 0,
    ("sampling", "beta_start"): 1.5,
    ("sampling", "num_train_timesteps"): 0,
    ("sampling", "skip_type"): "cubic",
    ("model", "sample_shape"): [0, 8, 8],
    ("model", "config_sha256"): "abc",
    ("model", "family"): "gan",
    ("quant", "weight_bits"): 9,
    ("export", "opset"): 5,
    ("export", "batch_size"): 0,
    ("export", "state_batch_multiplier"): 3,
    ("export", "scale_floor"): -1.0,
    ("export", "seconds"): -1.0,
    ("graphs", "step", "sha256"): "0" * 63,
    ("graphs", "step", "inputs", 0, "dtype"): "float99",
    ("graphs", "step", "inputs", 0, "shape"): ["rows", 1],
    ("layers", 3, "act_scale"): [-0.1],
    ("layers", 3, "a_hat_shape"): [0],
    ("layers", 3, "act_bits"): 12,
    ("layers", 3, "name"): "",
    ("calibration", "sha256"): "not a hash",
    ("step_groups", "ratios"): [[[0.0]]],
}


@pytest.mark.parametrize("path", list(RANGES), ids=[label(p) for p in RANGES])
def test_a_value_out_of_range_is_refused_by_name(manifest, path):
    message = refusal(edited(manifest, path, lambda parent, key: parent.__setitem__(key, RANGES[path])))
    assert label(path) in message and json.dumps(RANGES[path]) in message, message


def test_nan_is_no_number(manifest):
    message = refusal(edited(manifest, ("sampling", "eta"), lambda parent, key: parent.__setitem__(key, float("nan"))))
    assert "sampling.eta is NaN; it must be a finite number" in message


CONFLICTS = {
    "state dtype": (lambda m: m["export"].update(state_dtype="float16"), "export.state_dtype"),
    "guidance without text": (lambda m: m["export"].update(state_batch_multiplier=2), "model.context_shape"),
    "no step graph": (lambda m: m["graphs"].pop("step"), "graphs.step is missing"),
    "plain graph too": (lambda m: m["graphs"].update(unet=m["graphs"]["step"]), "graphs.unet is not a graph"),
    "duplicate layer": (lambda m: m["layers"].append(m["layers"][0]), "listed twice"),
    "layer bits": (lambda m: m["layers"][2].update(act_bits=4), "other bits"),
    "layer weight bits": (lambda m: m["layers"][2].update(weight_bits=4), "other bits"),
    # a W4 quant section over W8 layers: only the input and output conv may keep the first/last bits
    "first/last bits on every layer": (lambda m: m["quant"].update(weight_bits=4), "at most the UNet's input and"),
    "groups count": (lambda m: m["step_groups"].update(count=3), "step_groups.count"),
    "groups bounds": (lambda m: m["step_groups"].update(bounds=[1, 3, 2]), "step_groups.bounds"),
    "groups timesteps": (lambda m: m["step_groups"]["timesteps"].reverse(), "step_groups.timesteps"),
    "groups skip type": (lambda m: m["step_groups"].update(skip_type="uniform"), "step_groups.skip_type"),
    "groups without ratio input": (lambda m: m.update(step_groups=None), "step_scale_ratio"),
    "ratio width": (lambda m: m["step_groups"]["ratios"][1][0].pop(), "step_groups.ratios"),
    "sampling steps": (lambda m: m["sampling"].update(steps=5), "step_groups.timesteps"),
    "checkpoint without hash": (lambda m: m["model"].update(checkpoint_sha256=None), "model.checkpoint_sha256"),
    "a_hat owner not listed": (lambda m: _followers(m)[0].update(a_hat_owner="nope"), "is not a layer listed before"),
    "a_hat owner reads another's": (
        lambda m: _followers(m)[1].update(a_hat_owner=_followers(m)[0]["name"]),
        "owns no a_hat",
    ),
    "a_hat owner's scale": (lambda m: _followers(m)[0].update(act_scale=[0.5]), "another act_scale than its a_hat's"),
}


def _followers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The layers that read an earlier layer's a_hat (the digits UNet has them: q/k/v, temb_proj)."""
    found = [layer for layer in manifest["layers"] if layer["a_hat_owner"] is not None]
    assert len(found) >= 2
    return found


@pytest.mark.parametrize("name", list(CONFLICTS))
def test_sections_that_contradict_each_other_are_refused(manifest, name):
    edit, needle = CONFLICTS[name]
    data = copy.deepcopy(manifest)
    edit(data)
    assert needle in refusal(data)


# --- graph and external-data file names stay inside the export directory ----------------------


def _outside_copy(export_dir: Path, tmp_path: Path, file: str) -> tuple[Path, Path]:
    """A copy of the export, and beside it (outside) a real graph identical to its `file`."""
    exp = tmp_path / "exp"
    shutil.copytree(export_dir, exp)
    outside = tmp_path / "x.onnx"
    shutil.copy(export_dir / file, outside)
    return exp, outside


def _touched_during(monkeypatch, action) -> set[Path]:
    """Every path opened or stat'ed (`is_file`: whether a file exists is already a leak) by `action`."""
    touched: set[Path] = set()

    def recording(real):
        def call(file, *args, **kwargs):
            if isinstance(file, (str, Path)):
                touched.add(Path(os.path.abspath(file)))
            return real(file, *args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        for module, name in ((builtins, "open"), (io, "open"), (os, "stat")):
            patch.setattr(module, name, recording(getattr(module, name)))
        action()
    return touched


@pytest.mark.parametrize("how", ["absolute", "dotdot", "folder"])
def test_a_graph_outside_the_export_is_refused_before_it_is_opened(export_dir, tmp_path, monkeypatch, how):
    exp, outside = _outside_copy(export_dir, tmp_path, "step.onnx")
    name = {"absolute": str(outside), "dotdot": "../x.onnx", "folder": "sub/step.onnx"}[how]
    data = json.loads((exp / MANIFEST_NAME).read_text())
    data["graphs"]["step"]["file"] = name  # the outside graph hashes right: only the name check stops it
    (exp / MANIFEST_NAME).write_text(json.dumps(data))

    def load():
        with pytest.raises(ArtifactError, match=r"graphs\.step\.file is .*a plain file name inside the export"):
            load_manifest(exp)

    touched = _touched_during(monkeypatch, load)
    assert (exp / MANIFEST_NAME).resolve() in touched
    assert not any(path.is_relative_to(tmp_path) and not path.is_relative_to(exp) for path in touched), touched


def test_external_weights_outside_the_export_are_refused(export_dir, tmp_path):
    import onnx

    exp = tmp_path / "exp"
    shutil.copytree(export_dir, exp)
    model = onnx.load(str(exp / "warmup.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))  # its bytes move to ../w.data
    (tmp_path / "w.data").write_bytes(tensor.raw_data)
    tensor.external_data.add(key="location", value="../w.data")
    tensor.external_data.add(key="length", value=str(len(tensor.raw_data)))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    (exp / "warmup.onnx").write_bytes(model.SerializeToString())
    data = json.loads((exp / MANIFEST_NAME).read_text())
    data["graphs"]["warmup"]["sha256"] = sha256_graph(exp / "warmup.onnx")
    (exp / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"warmup\.onnx keeps weights in '\.\./w\.data', not in warmup\.onnx\.data"):
        load_manifest(exp)
