"""diffusers interop, with diffusers itself as the oracle: tiny UNets built from configs and saved as
the folders users hold, diffusers' schedulers driving the loops, and a pipeline calling a deployed export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.diffusers_models import pipeline_folder, stable_diffusion_pipeline, unet_folder
from helpers.export import check_step_layers

from modiff_trt import api
from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.engines.torch_backend import reference_from_manifest
from modiff_trt.errors import ConfigError, ModiffError
from modiff_trt.models import load_config, load_unet
from modiff_trt.sampling.conditioning import RandomContext
from modiff_trt.sampling.sampler import make_sampler

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    stable_diffusion_pipeline(root / "sd")
    return {"unet": unet_folder(root / "unet"), "pipeline": pipeline_folder(root / "pipe"), "sd": root / "sd"}


def _calibrate_and_export(tmp_path, folder, scheduler: str, steps: int, act_bits: int = 8):
    quant = api.QuantOptions(act_bits=act_bits)
    sampling = api.SamplerOptions(steps=steps, scheduler=scheduler)
    model = api.ModelOptions(config=str(folder))
    prompts = api.PromptOptions(random_context=load_config(folder).context_shape is not None)
    cal = tmp_path / "c.safetensors"
    api.calibrate(
        api.CalibrateOptions(
            cal, model, quant=quant, sampling=sampling, prompts=prompts, cali_n=4, cali_st=steps, batch_size=4
        )
    )
    manifest = api.export(api.ExportOptions(tmp_path / "e", model, calibration=cal, quant=quant))
    return manifest, tmp_path / "e"


@pytest.mark.parametrize("kind", ["unet", "pipeline"])
def test_float_export_of_a_diffusers_unet_matches_diffusers_forward(folders, tmp_path, kind) -> None:
    folder = folders[kind]
    cfg = load_config(folder)
    quant = api.QuantOptions(weight_bits=0, act_bits=0, modulate=False)
    api.export(api.ExportOptions(tmp_path / "e", api.ModelOptions(config=str(folder)), quant=quant))
    peer = getattr(diffusers, cfg.unet_class).from_pretrained(cfg.folder).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, *cfg.sample_shape, generator=generator)
    t = torch.tensor([1.0, 480.0, 999.0])
    context = None if cfg.context_shape is None else torch.randn(3, *cfg.context_shape, generator=generator)
    with torch.no_grad():
        want = peer(x, t, encoder_hidden_states=context).sample if context is not None else peer(x, t).sample
    got = OrtRunner(tmp_path / "e")(x, t, context) if context is not None else OrtRunner(tmp_path / "e")(x, t)
    assert float((got - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize(("kind", "scheduler"), [("unet", "dpm-solver++"), ("pipeline", "pndm"), ("unet", "euler")])
def test_modiff_w8a8_export_of_a_diffusers_unet_is_exact_per_layer_under_a_diffusers_scheduler(
    folders, tmp_path, kind, scheduler
) -> None:
    folder = folders[kind]
    manifest, out = _calibrate_and_export(tmp_path, folder, scheduler, steps=5)
    assert manifest.sampling.name == "diffusers" and manifest.sampling.scheduler == scheduler
    qmodel = reference_from_manifest(manifest, out)
    cfg = load_config(folder)
    noise = torch.randn(2, *cfg.sample_shape, generator=torch.Generator().manual_seed(7))
    conditioning = None if cfg.context_shape is None else RandomContext(cfg.context_shape, seed=3)
    checked = check_step_layers(
        out, qmodel, noise, run=lambda m: manifest.sampling.trajectory(m, noise, conditioning=conditioning)
    )
    assert checked == len(qmodel.layers) * (manifest.sampling.model_calls() - 1)


def test_diffusers_ddim_on_the_project_schedule_agrees_with_the_project_ddim() -> None:
    """The peer's DDIM (alpha 1 after the last step, leading spacing) is ddim's uniform DDIM."""
    cfg = load_config("digits")
    model = load_unet("digits", "modiff_trt/assets/digits.safetensors")
    noise = torch.randn(4, *cfg.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = make_sampler(cfg, skip_type="uniform", steps=20).trajectory(model, noise)
    peer = make_sampler(cfg, scheduler="ddim", steps=20)
    import dataclasses

    peer = dataclasses.replace(peer, set_alpha_to_one=True)
    assert float((peer.trajectory(model, noise) - ours).abs().max()) < 1e-4


def test_pipeline_folder_schedule_and_scheduler_are_read(folders) -> None:
    cfg = load_config(folders["pipeline"])
    sampler = make_sampler(cfg)
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (sampler.scheduler, sampler.steps_offset, sampler.model_calls()) == ("pndm", 1, 51)
    assert cfg.context_shape == (77, 16)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c.update(_class_name="UNet2DConditionModelXL"), "is not a supported diffusers UNet"),
        (lambda c: c.update(addition_embed_type="text_time"), "addition_embed_type"),
        (lambda c: c.update(class_embed_type="timestep"), "class labels"),
    ],
)
def test_unsupported_diffusers_unets_are_refused_naming_the_reason(folders, tmp_path, edit, needle) -> None:
    folder = unet_folder(tmp_path / "u")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=needle):
        load_config(folder)


def test_a_folder_that_is_not_a_diffusers_model_is_refused(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="neither a diffusers UNet folder"):
        load_config(tmp_path)


def test_scheduler_options_are_checked(folders) -> None:
    with pytest.raises(ConfigError, match="--sampler and --scheduler exclude each other"):
        make_sampler(load_config("digits"), sampler="ddim", scheduler="pndm")
    with pytest.raises(ModiffError, match='scheduler is "heun"; it must be one of "ddim", "pndm"'):
        make_sampler(load_config("digits"), scheduler="heun")
    with pytest.raises(ConfigError, match="samples with --scheduler"):
        make_sampler(load_config(folders["unet"]), sampler="plms")


def test_float_reference_matches_between_runs_of_the_same_scheduler(folders) -> None:
    """Schedulers keep per-run state (DPM-Solver++'s history): each trajectory builds a fresh one."""
    cfg = load_config(folders["unet"])
    model = load_unet(cfg, cfg.weights)
    sampler = make_sampler(cfg, scheduler="dpm-solver++", steps=6)
    noise = torch.randn(2, *cfg.sample_shape, generator=torch.Generator().manual_seed(1))
    first, second = sampler.trajectory(model, noise), sampler.trajectory(model, noise)
    assert np.array_equal(first.numpy(), second.numpy())


def test_a_stable_diffusion_pipeline_samples_through_the_deployed_export_with_its_state_reset_per_call(
    tmp_path,
) -> None:
    from modiff_trt.engines.diffusers_unet import DeployedUNet, deploy_unet

    pipe = stable_diffusion_pipeline(tmp_path / "sd")
    pipe.set_progress_bar_config(disable=True)
    steps = 3
    _, out = _calibrate_and_export(tmp_path, tmp_path / "sd", "pndm", steps=steps)
    float_unet = pipe.unet
    runs: dict[str, list[np.ndarray]] = {}
    for backend in ("ort", "torch"):
        deployed = deploy_unet(
            float_unet, out, backend=backend, **({"ort_provider": "cpu"} if backend == "ort" else {})
        )
        calls, resets = [], []  # what reaches the runner: each UNet call's batch, each new trajectory
        pipe.unet = DeployedUNet(_Spy(deployed.runner, calls, resets), deployed.config)
        runs[backend] = [
            pipe(
                "a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np"
            ).images
            for _ in range(2)
        ]
        assert len(calls) == 2 * (steps + 1) and resets == [0, steps + 1]  # PNDM: one extra call per run
        assert all(batch == 2 for batch in calls)  # guidance: [uncond; cond] in one call
    ort_first, ort_second = runs["ort"]
    assert np.array_equal(ort_first, ort_second)  # a second call starts from the warm-up, not stale state
    assert float(np.abs(ort_first - runs["torch"][0]).max()) < 2e-2


class _Spy:
    """A runner that records the batch of each call and each reset, then delegates."""

    def __init__(self, runner, calls: list[int], resets: list[int]) -> None:
        self.runner, self.calls, self.resets = runner, calls, resets
        self.device = getattr(runner, "device", torch.device("cpu"))

    def reset_state(self) -> None:
        self.resets.append(len(self.calls))
        self.runner.reset_state()

    def __call__(self, x, t, context=None):
        self.calls.append(x.shape[0])
        return self.runner(x, t, context)


def test_deploy_unet_refuses_an_export_of_another_unet(folders, tmp_path) -> None:
    from modiff_trt.engines.diffusers_unet import deploy_unet

    quant = api.QuantOptions(weight_bits=0, act_bits=0, modulate=False)
    api.export(api.ExportOptions(tmp_path / "e", api.ModelOptions(config=str(folders["unet"])), quant=quant))
    other = diffusers.UNet2DConditionModel.from_pretrained(folders["pipeline"] / "unet")
    with pytest.raises(ConfigError, match="export the pipeline's own unet/ folder"):
        deploy_unet(other, tmp_path / "e", backend="ort")


def test_cli_samples_and_calibrates_a_diffusers_folder_with_a_scheduler(folders, tmp_path) -> None:
    from typer.testing import CliRunner

    from modiff_trt.cli import app

    cli = CliRunner()
    folder = str(folders["sd"])
    common = ["-c", folder, "--random-context", "--scheduler", "dpm-solver++", "--steps", "3"]
    made = cli.invoke(app, ["sample", *common, "-n", "2", "--act-bits", "0", "-o", str(tmp_path / "s")])
    assert made.exit_code == 0, made.output
    with np.load(tmp_path / "s" / "samples.npz") as npz:  # latents, decoded by the folder's vae/
        assert npz["z0"].shape == (2, 4, 8, 8) and npz["arr_0"].shape == (2, 8, 8, 3)
    made = cli.invoke(app, ["sample", "-c", str(folders["pipeline"]), "--random-context", "-o", str(tmp_path / "s2")])
    assert made.exit_code == 2 and "no vae/ lies beside it" in made.output
    cal = tmp_path / "c.safetensors"
    made = cli.invoke(
        app, ["calibrate", *common, "--cali-n", "2", "--cali-st", "3", "--batch-size", "2", "-o", str(cal)]
    )
    assert made.exit_code == 0, made.output
    made = cli.invoke(app, ["export", "-c", folder, "--calibration", str(cal), "-o", str(tmp_path / "e")])
    assert made.exit_code == 0, made.output
    sampling = json.loads((tmp_path / "e" / "manifest.json").read_text())["sampling"]
    assert (sampling["sampler"], sampling["scheduler"], sampling["steps"]) == ("diffusers", "dpm-solver++", 3)


def test_the_manifest_types_of_scheduler_settings_name_every_scheduler_and_spacing() -> None:
    """The sampler's Literal types (what manifest validation checks) and the scheduler tables agree."""
    from typing import get_args, get_type_hints

    from modiff_trt.sampling.sampler import SchedulerSampler
    from modiff_trt.sampling.schedulers import TIMESTEP_SPACINGS
    from modiff_trt.sampling.schedules import SCHEDULER_CLASSES

    hints = get_type_hints(SchedulerSampler)
    assert set(get_args(hints["scheduler"])) == set(SCHEDULER_CLASSES)
    assert set(get_args(hints["timestep_spacing"])) == set(TIMESTEP_SPACINGS)
