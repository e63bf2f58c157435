"""Issue 21, calibration half: `--device`, the memory pre-check, the time estimate, streaming statistics."""

from __future__ import annotations

import gc
import importlib
import io
import logging
import re
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from modiff_trt import memory
from modiff_trt.calibrators import CalibrationOptions, calibrate
from modiff_trt.calibrators.call_time import CallTimer, duration
from modiff_trt.calibrators.collect import TrajectoryCollector, run_collectors
from modiff_trt.cli import app
from modiff_trt.devices import AUTO, runner_device, torch_device
from modiff_trt.errors import BackendUnavailableError, OptionError
from modiff_trt.models import load_config, load_unet
from modiff_trt.quant import quantizable_layers
from modiff_trt.sampling import make_sampler

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
runner = CliRunner()
FAST = dict(cali_st=5, cali_n=8, batch_size=4, reservoir=4096)
calibrate_module = importlib.import_module("modiff_trt.calibrators.calibrate")  # the package re-exports its function


def _calibrate(config, checkpoint, out, **options):
    cfg = load_config(config)
    return calibrate(
        cfg, checkpoint, out, make_sampler(cfg, steps=10), CalibrationOptions(**{**FAST, **options}), progress=False
    )


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- --device ---------------------------------------------------------------------------------
def test_device_option_resolves_auto_and_refuses_what_cannot_run(monkeypatch, no_cuda):
    assert torch_device(AUTO) == torch.device("cpu") and torch_device("cpu") == torch.device("cpu")
    with pytest.raises(OptionError, match="--device 'tpu:0' is not a device"):
        torch_device("tpu:0")
    with pytest.raises(OptionError, match="--device meta: torch code here runs on cpu or cuda"):
        torch_device("meta")
    with pytest.raises(BackendUnavailableError, match="--device cuda:1: CUDA is not available"):
        torch_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert torch_device(AUTO, local_rank=1) == torch.device("cuda", 1)
    assert torch_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(OptionError, match="2 CUDA device"):
        torch_device("cuda:2")
    # per backend: torch places the reference, trt names its CUDA device, ort/openvino take only auto
    assert runner_device("trt", AUTO) == "cuda" and runner_device("trt", "cuda:1") == "cuda:1"
    assert runner_device("ort", AUTO) == AUTO
    with pytest.raises(OptionError, match="--ort-provider"):
        runner_device("ort", "cuda")
    with pytest.raises(OptionError, match="runs on the CPU"):
        runner_device("openvino", "cpu")


def test_device_cuda_without_cuda_is_one_line_before_any_work(tmp_path, tiny_config, tiny_checkpoint, no_cuda):
    out = tmp_path / "c.safetensors"
    result = runner.invoke(
        app,
        ["calibrate", "-c", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "--device", "cuda", "-o", str(out)],
    )
    assert result.exit_code == 2 and "--device cuda" in result.output and "calibrating" not in result.output
    assert not out.exists()
    sample = ["sample", "-c", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "-n", "1", "--steps", "2"]
    result = runner.invoke(app, [*sample, "--device", "cuda", "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--device cuda" in result.output and not (tmp_path / "s").exists()
    result = runner.invoke(app, ["compare", str(tmp_path / "no-export"), "--device", "cuda:0"])
    assert result.exit_code == 2 and "--device cuda:0" in result.output
    result = runner.invoke(app, ["sample", str(tmp_path / "no-export"), "-b", "ort", "--device", "cpu"])
    assert result.exit_code == 2 and "--device applies to --backend torch and trt" in result.output


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
def test_torch_backend_and_calibration_run_on_the_device_given(tmp_path, tiny_config, tiny_checkpoint, device):
    model = ["-c", str(tiny_config), "--checkpoint", str(tiny_checkpoint)]
    result = runner.invoke(app, ["export", *model, "--act-bits", "0", "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    from modiff_trt.engines.factory import open_runner

    reference, _ = open_runner(tmp_path / "e", "torch", device=device)
    assert reference.device.type == device
    result = runner.invoke(app, ["compare", str(tmp_path / "e"), "--steps", "2", "-n", "1", "--device", device])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["sample", *model, "-n", "1", "--steps", "2", "--device", device, "-o", str(tmp_path / "s")]
    )
    assert result.exit_code == 0 and (tmp_path / "s" / "samples.npz").is_file(), result.output
    cfg = load_config(tiny_config)
    cal = calibrate(
        cfg,
        tiny_checkpoint,
        tmp_path / "c.st",
        make_sampler(cfg, steps=4),
        CalibrationOptions(**FAST),
        device=device,
        progress=False,
    )
    report = cal.meta["report"]
    assert report["seconds_per_unet_call"] > 0 and (report["peak_cuda_mb"] is None) == (device == "cpu")


# -- memory pre-check --------------------------------------------------------------------------
class _Chain(torch.nn.Module):
    """Three 1 MiB intermediates, at most two alive at once."""

    def forward(self, x):
        a = x * 2
        b = a * 3
        del a
        return b + 1


def test_live_bytes_counts_tensors_alive_at_once_not_all_ever_made():
    x = torch.zeros(256, 1024, device="meta")  # 1 MiB fp32
    live = memory.LiveBytes()
    with torch.no_grad(), live:
        out = _Chain()(x)
    assert live.peak == 2 * 2**20 and live.live == 2**20  # `out` still alive
    del out


def test_estimate_follows_the_model_and_the_batch(tiny_config):
    cfg = load_config(tiny_config)
    one, four = memory.footprint(cfg, 1), memory.footprint(cfg, 4)
    model = load_unet(cfg, None)
    assert one.params == sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert one.layers == len(quantizable_layers(model))
    assert four.layer_inputs == 4 * one.layer_inputs and four.activation_peak > 3 * one.activation_peak
    (plain,) = memory.calibration_estimate(cfg, 4, modulate=False)
    (modiff,) = memory.calibration_estimate(cfg, 4, modulate=True)
    held = modiff.total - plain.total  # the previous-step inputs, and what the allocator keeps of them
    assert held == pytest.approx(4 * four.layer_inputs * memory.OVERHEAD["cpu"], abs=2)
    assert modiff.parts["previous-step layer inputs"] == 4 * four.layer_inputs
    assert 0 < memory.available_bytes("cpu")


def test_a_job_that_does_not_fit_is_refused_before_the_model_loads(tmp_path, tiny_config, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10**6)

    def never(*args, **kwargs):
        raise AssertionError("the model loaded before the memory check")

    monkeypatch.setattr(calibrate_module, "load_unet", never)
    out = tmp_path / "c.safetensors"
    with pytest.raises(
        memory.NotEnoughMemoryError, match=r"needs about \d+\.\d GB on cpu .* 0\.0 GB available: .*--batch-size"
    ):
        _calibrate(tiny_config, tiny_checkpoint, out)
    result = runner.invoke(
        app,
        ["calibrate", "-c", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "-o", str(out)],
    )
    assert result.exit_code == 2 and not out.exists()
    (line,) = result.output.strip().splitlines()  # one line: the estimate, what is available, what to change
    assert line.startswith("error: calibration needs about") and "available: calibrate with a smaller" in line


def test_on_cuda_the_gpu_and_the_host_are_checked_each_against_its_own_memory(tiny_config, monkeypatch):
    cfg = load_config(tiny_config)
    host, gpu = memory.calibration_estimate(cfg, 4, modulate=True, device="cuda:1", checkpoint_bytes=10**6)
    assert (host.device, gpu.device) == ("cpu", "cuda:1")
    assert "checkpoint read" in host.parts and "previous-step layer inputs" in gpu.parts
    assert "forward activations" not in host.parts and "runtime" not in gpu.parts
    free = {"cpu": 10**12, "cuda:1": gpu.total - 1}
    monkeypatch.setattr(memory, "available_bytes", lambda device: free[str(device)])
    with pytest.raises(
        memory.NotEnoughMemoryError, match=r"needs about [\d.]+ GB on cuda:1 \(.*\), [\d.]+ GB available: ADVICE$"
    ):
        memory.check_fits([host, gpu], "ADVICE")
    free["cuda:1"] = gpu.total
    memory.check_fits([host, gpu], "ADVICE")  # exactly what is free fits


# -- time estimate -----------------------------------------------------------------------------
def test_time_estimate_is_logged_once_after_an_early_call(tiny_model, caplog):
    x, t = torch.randn(2, 3, 16, 16), torch.zeros(2)
    for calls, logged_after in ((6400, 2), (2, 1)):  # the second call when there is one to spare
        caplog.clear()
        timer = CallTimer(tiny_model, calls=calls, unet_batch=2, device="cpu")
        handles = timer.attach(tiny_model)
        lines = []
        with caplog.at_level(logging.INFO, logger="modiff_trt.calibrators.call_time"), torch.no_grad():
            for _ in range(3):
                tiny_model(x, t)
                lines.append([r.getMessage() for r in caplog.records])
        for handle in handles:
            handle.remove()
        assert [len(seen) for seen in lines] == [0] * (logged_after - 1) + [1] * (4 - logged_after), lines
        assert re.fullmatch(
            rf"{calls} UNet calls \(each on 2 samples\) x \d+\.\d\d s per call = about \S+ (s|min|h) on cpu",
            lines[-1][0],
        ), lines
        assert timer.timed == 3 and timer.seconds_per_call > 0 and timer.cpu_seconds_per_call > 0
    assert (duration(18 * 3600), duration(720), duration(40)) == ("18.0 h", "12 min", "40 s")


def test_calibration_says_how_long_it_will_take_and_records_the_call_time(
    tmp_path, tiny_config, tiny_checkpoint, caplog
):
    with caplog.at_level(logging.INFO):
        cal = _calibrate(tiny_config, tiny_checkpoint, tmp_path / "c.safetensors")
    # 8 trajectories in batches of 4, 10 DDIM steps: 2 x 10 UNet calls on 4 samples each
    assert any(re.match(r"20 UNet calls \(each on 4 samples\) x .* on cpu$", r.getMessage()) for r in caplog.records)
    assert cal.meta["report"]["seconds_per_unet_call"] > 0 and cal.meta["report"]["cpu_seconds_per_unet_call"] > 0


# -- streaming statistics ----------------------------------------------------------------------
def _collect(model, cfg, cali_n: int):
    """Run one residual collector over `cali_n` trajectories; weak references to every layer input."""
    sampler = make_sampler(cfg, steps=6)
    collector = TrajectoryCollector(model, range(1, 6), True, -(-cali_n // 4), {}, reservoir=512, seed=0)
    seen: list[weakref.ref] = []
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
        for n in quantizable_layers(model)
    ]
    with torch.no_grad():
        run_collectors([collector], sampler, cfg.sample_shape, cali_n, 4, 0, progress=False)
    for hook in hooks:
        hook.remove()
    gc.collect()
    return collector, seen


def test_collectors_keep_no_activation_past_the_statistic_it_feeds(tiny_config):
    cfg = load_config(tiny_config)
    model = load_unet(cfg, None)
    collector, seen = _collect(model, cfg, cali_n=8)
    assert seen and not [r for r in seen if r() is not None], "a layer input outlived its call"
    assert collector.previous == {}  # the residuals' previous inputs go with the trajectory
    sizes = {}
    for n, layer in collector.stats.items():
        streams = [s for group in layer.act_by_group for s in group] + list(layer.warmup)
        for s in streams:
            for chunk in s.chunks:  # a subsample of its own, never a view that pins an activation
                assert chunk.untyped_storage().nbytes() == chunk.numel() * chunk.element_size(), n
        sizes[n] = sum(s.values().numel() for s in streams)
    more, _ = _collect(model, cfg, cali_n=16)
    for n, layer in more.stats.items():  # twice the trajectories, the same bounded subsample
        streams = [s for group in layer.act_by_group for s in group] + list(layer.warmup)
        assert sum(s.values().numel() for s in streams) <= sizes[n] * 1.1, n


# -- attention in slices -----------------------------------------------------------------------
def test_sliced_attention_gives_the_same_numbers_and_traces_whole(monkeypatch):
    from modiff_trt.models import openaimodel

    torch.manual_seed(0)
    own = openaimodel.CrossAttention(64, heads=4, dim_head=16).eval()
    cross = openaimodel.CrossAttention(64, heads=4, dim_head=16, context_dim=32).eval()
    block = openaimodel.AttentionBlock(64, num_heads=4).eval()
    x, context, image = torch.randn(2, 256, 64), torch.randn(2, 7, 32), torch.randn(2, 64, 16, 16)
    peaks = []
    with torch.no_grad():
        with memory.LiveBytes() as live:
            whole = (own(x), cross(x, context), block(image))
        peaks.append(live.peak)
        monkeypatch.setattr(openaimodel, "ATTENTION_SLICE_ELEMENTS", 256 * 7)  # one batch*head at a time
        with memory.LiveBytes() as live:
            sliced = (own(x), cross(x, context), block(image))
        peaks.append(live.peak)
        graph = io.BytesIO()
        torch.onnx.export(own, (x,), graph, dynamo=False, input_names=["x"])  # traced while slicing
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced, strict=True))
    assert peaks[1] < peaks[0] - 8 * 256 * 256 * 4  # the 8 score matrices of a call never whole
    model = onnx.load_from_string(graph.getvalue())
    assert [n.op_type for n in model.graph.node].count("Softmax") == 1  # an export keeps one score matrix op
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    assert np.abs(got - whole[0].numpy()).max() < 1e-5
