"""The library API of the workflow commands: typed options in, checked before any work, a result out.

`modiff-trt sample | export | calibrate | compare` parse their options into these dataclasses,
call one function here and render what it returns, so a library caller gets the same checks
(the project's own errors, naming the CLI flag to change) and the same artifacts as a CLI user.
An option left None was not given: it takes the documented default or, with an export
directory, what the export fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modiff_trt.choices import Backend
from modiff_trt.devices import AUTO, DEVICE_BACKENDS, runner_device, torch_device
from modiff_trt.errors import ConfigError, OptionError
from modiff_trt.models.builtin import checkpoint_for
from modiff_trt.validate import at_least, finite_eta, not_a_directory, sample_counts

if TYPE_CHECKING:
    import torch

    from modiff_trt.calibrators import Calibration
    from modiff_trt.engines.compare import StepDiff
    from modiff_trt.export.manifest import Manifest
    from modiff_trt.quant import QuantConfig


@dataclass(frozen=True)
class QuantOptions:
    """How to quantize (`--weight-bits`, `--act-bits`, `--act-format`, ...); None: not given.

    Bits of 0 keep weights or activations in float. Not given: W8A8 integer MoDiff (`act_bits`
    follows a float format's width: 4 for nvfp4) with a float warm-up and float32 state.
    """

    weight_bits: int | None = None
    act_bits: int | None = None
    act_format: str | None = None
    modulate: bool | None = None
    first_step: str | None = None
    split: bool | None = None
    state_dtype: str | None = None
    state_layout: str | None = None
    first_last_bits: str | None = None

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "weight_bits": 8,
        "first_last_bits": "8",
        "act_format": "int",
        "modulate": True,
        "first_step": "fp",
        "split": False,
        "state_dtype": "float32",
    }

    def chosen(self, name: str) -> Any:
        """The option's value, or its default when it was not given."""
        value = getattr(self, name)
        return self.DEFAULTS[name] if value is None else value

    def state_layout_or_default(self) -> str:
        """`--state-layout`; by default `scaled` for an fp16 state and `plain` for fp32.

        Measured on the digits model (512 images, 50 steps, ONNX Runtime, BENCHMARKS.md
        `quality-state`): against the fp32 state, fp16 a_hat in units of its scale lost 0.01 dB
        at W8A8 and 0.26 dB at W8A4, a plain fp16 a_hat 0.42 dB at W8A8. In fp32 the layouts are
        the same to float rounding, and plain keeps a_hat readable as is.
        """
        if self.state_layout is not None:
            return self.state_layout
        return "scaled" if self.chosen("state_dtype") == "float16" else "plain"

    def weight_bits_or_float(self) -> int | None:
        """Weight bits; None keeps weights in float (--weight-bits 0)."""
        return _float_if_zero(self.chosen("weight_bits"))

    def first_last_bits_or_same(self) -> int | None:
        """`--first-last-bits`: the weight bits of the UNet's input and output conv below 8-bit
        weights, or None for 'same' (every layer at --weight-bits)."""
        value = str(self.chosen("first_last_bits"))
        if value == "same":
            return None
        if not value.isdigit():
            raise OptionError(f"--first-last-bits {value}: give the bits (2..8) or 'same'")
        return int(value)

    def act_bits_or_float(self) -> int | None:
        """Activation bits, by default the format's width; None keeps activations in float (--act-bits 0)."""
        from modiff_trt.quant.formats import FORMAT_BITS

        if self.act_bits is None:
            return FORMAT_BITS.get(str(self.chosen("act_format")), 8)
        if self.act_bits == 0 and self.act_format is not None:
            raise OptionError(
                f"--act-format {self.act_format} with --act-bits 0: activations stay in float, so no format "
                "applies; drop --act-format, or give the bits (e.g. --act-bits 8)"
            )
        return _float_if_zero(self.act_bits)

    def following(self, calibration: Path | None) -> QuantOptions:
        """These options, with those not given taken from the `calibration` file's settings.

        An export or sample with a calibration then runs what was calibrated (`calibrate
        --act-bits 4`, then `export --calibration` needs no second `--act-bits 4`); a value the
        user did give and the file contradicts is refused by `Calibration.check_settings`,
        naming both.
        """
        if calibration is None:
            return self
        from modiff_trt.calibrators.fileformat import calibration_settings
        from modiff_trt.quant.formats import FORMAT_BITS

        settings = calibration_settings(calibration)
        if self.act_format in FORMAT_BITS:  # a fixed-width format given: its width, not the file's bits
            settings.pop("act_bits", None)
        return dataclasses.replace(self, **{k: v for k, v in settings.items() if getattr(self, k) is None})

    def config(self, act_scales: str) -> QuantConfig:
        """The QuantConfig these options describe (QuantConfig validates the bits and combinations)."""
        from modiff_trt.quant import QuantConfig

        return QuantConfig(
            weight_bits=self.weight_bits_or_float(),
            act_bits=self.act_bits_or_float(),
            modulate=self.chosen("modulate"),
            act_scales=act_scales,
            first_step=str(self.chosen("first_step")),
            split=self.chosen("split"),
            state_dtype=str(self.chosen("state_dtype")),
            state_layout=self.state_layout_or_default(),
            act_format=str(self.chosen("act_format")),
            first_last_bits=self.first_last_bits_or_same(),
        )


def _float_if_zero(bits: int) -> int | None:
    return None if bits == 0 else bits


@dataclass(frozen=True)
class ModelOptions:
    """Which UNet: `--config` (a ddim-layout YAML or a built-in name) and its `--checkpoint`.

    Without a checkpoint a built-in config loads its packaged weights; `random_weights` asks for
    an untrained network instead (speed tests only). `trust_checkpoint` allows pickles.
    """

    config: str | None = None
    checkpoint: Path | None = None
    trust_checkpoint: bool = False
    random_weights: bool = False
    ema: bool = False

    def checkpoint_file(self) -> Path | None:
        """The checkpoint to load (the packaged one of a built-in), refusing what cannot apply."""
        if self.config is None:
            raise OptionError("--config is required: a ddim-layout YAML or a built-in name")
        return checkpoint_for(self.config, self.checkpoint, self.random_weights)


@dataclass(frozen=True)
class SamplerOptions:
    """Overrides of the model's (or export's) paper sampler; None keeps its setting."""

    sampler: str | None = None
    steps: int | None = None
    skip_type: str | None = None
    eta: float | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None

    def check(self) -> None:
        at_least("--steps", self.steps, 1)
        finite_eta(self.eta)

    def make(self, base: Any):
        """`make_sampler(base, ...)` with these overrides; `base` is a model config or a sampler."""
        from modiff_trt.sampling.sampler import make_sampler

        return make_sampler(
            base,
            sampler=self.sampler,
            steps=self.steps,
            skip_type=self.skip_type,
            eta=self.eta,
            guidance_scale=self.guidance_scale,
            scheduler=None if self.scheduler is None else str(self.scheduler),
        )


@dataclass(frozen=True)
class PromptOptions:
    """Text conditioning (Stable Diffusion): prompts through a local CLIP text model, or random context."""

    prompt: str | None = None
    from_file: Path | None = None
    text_encoder: Path | None = None
    random_context: bool = False

    def conditioning(self, context_shape: Any, source: str, seed: int):
        from modiff_trt.sampling.conditioning import make_conditioning

        return make_conditioning(
            context_shape, source, self.prompt, self.from_file, self.text_encoder, self.random_context, seed
        )


@dataclass(frozen=True)
class SampleOptions:
    """`modiff-trt sample`: an export directory on a backend, or a config with the torch reference."""

    out: Path = Path("samples")
    export_dir: Path | None = None
    backend: str = "torch"
    model: ModelOptions = field(default_factory=ModelOptions)
    calibration: Path | None = None
    act_scales: str | None = None  # default: static with a calibration, else dynamic
    quant: QuantOptions = field(default_factory=QuantOptions)
    sampling: SamplerOptions = field(default_factory=SamplerOptions)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    num_images: int = 16
    batch_size: int = 16
    seed: int = 0
    overwrite: bool = False
    pngs: bool = True
    cuda_graph: bool = False
    device: str = AUTO  # torch: where the reference runs; trt: the plans' CUDA device (auto: cuda)
    ort_provider: str = "auto"


@dataclass(frozen=True)
class SampleResult:
    """What a sample run wrote; `written` is False on the ranks of a distributed run that write nothing."""

    out: Path
    num_images: int
    seconds: float
    processes: int
    written: bool


def sample(options: SampleOptions) -> SampleResult:
    """Sample `options.num_images` images into `options.out` (PNGs, grid.png, samples.npz).

    Every option is checked before a model loads. The run is written to a temporary folder beside
    `out` and renamed into place at the end, so a failure (full disk included) leaves nothing new;
    a non-empty `out` is replaced only with `overwrite`. Inside a torch.distributed process group
    each rank samples its batches and rank 0 writes (`sampling.distributed`).
    """
    from modiff_trt.atomic import atomic_directory, check_destination, refuse_non_empty, replace_any
    from modiff_trt.sampling.distributed import current_world
    from modiff_trt.sampling.run import write_samples
    from modiff_trt.sampling.writer import check_disk_room

    o = options
    world = current_world()
    sample_counts(o.num_images, o.batch_size, o.seed)
    o.sampling.check()
    may_replace = replace_any if o.overwrite else refuse_non_empty
    if world.main:
        check_destination(o.out, may_replace)
    if o.export_dir is not None:
        runner, base, model = _export_runner(o, world.local_rank)
        sample_shape, context_shape, family = model.sample_shape, model.context_shape, model.family
        source, config, checkpoint = str(o.export_dir), model.config, model.checkpoint
    else:
        runner, base, checkpoint = _reference_runner(o, world.local_rank)
        sample_shape, context_shape, family = base.sample_shape, base.context_shape, base.family
        source, config = base.source, o.model.config
    if world.main:
        check_disk_room(o.out, o.num_images, sample_shape)
    chosen = o.sampling.make(base)
    conditioning = o.prompts.conditioning(context_shape, source, o.seed)
    decoder = _first_stage(config, family, checkpoint, o.model.trust_checkpoint)
    start = time.perf_counter()
    # rank 0 writes every image: only it swaps a finished temporary folder into place
    with atomic_directory(o.out, may_replace) if world.main else contextlib.nullcontext(o.out) as target:
        write_samples(
            runner,
            chosen,
            sample_shape,
            target,
            o.num_images,
            o.batch_size,
            o.seed,
            conditioning,
            decoder,
            o.pngs,
            world=world,
        )
    return SampleResult(o.out, o.num_images, time.perf_counter() - start, world.size, world.main)


def _export_runner(o: SampleOptions, local_rank: int = 0):
    """The runner of an export directory, refusing every option the export fixed."""
    from modiff_trt.engines.factory import open_runner

    refuse_fixed_by_export(
        config=o.model.config,
        checkpoint=o.model.checkpoint,
        calibration=o.calibration,
        act_scales=o.act_scales,
        random_weights=o.model.random_weights or None,
        ema=o.model.ema or None,
        **dataclasses.asdict(o.quant),
    )
    if o.cuda_graph and o.backend != "trt":
        raise OptionError(f"--cuda-graph applies to --backend trt only, not --backend {o.backend}")
    runner, manifest = open_runner(
        o.export_dir,
        o.backend,
        batch_size=o.batch_size,
        trust=o.model.trust_checkpoint,
        cuda_graph=o.cuda_graph,
        ort_provider=o.ort_provider,
        device=runner_device(o.backend, o.device, local_rank),
    )
    return runner, manifest.sampling, manifest.model


def _reference_runner(o: SampleOptions, local_rank: int = 0):
    """The quantized PyTorch reference of `--config` on `--device`, its model config and checkpoint."""
    from modiff_trt.engines.torch_backend import load_reference
    from modiff_trt.models import load_config

    if o.model.config is None:
        raise OptionError("give an export directory, or --config (and --checkpoint) for the torch reference")
    if o.backend != "torch":
        raise OptionError(f"--backend {o.backend} runs an export directory: run `modiff-trt export` first")
    if o.cuda_graph:
        raise OptionError("--cuda-graph applies to --backend trt with an export directory")
    device = runner_device(o.backend, o.device, local_rank)
    base = load_config(o.model.config)
    checkpoint = o.model.checkpoint_file()
    quant = o.quant.following(o.calibration).config(o.act_scales or ("static" if o.calibration else "dynamic"))
    runner = load_reference(
        base, checkpoint, quant, o.calibration, trust=o.model.trust_checkpoint, ema=o.model.ema
    ).qmodel.to(device)
    return runner, base, checkpoint


def refuse_fixed_by_export(**given: object) -> None:
    """With an export directory, options the export already fixed are refused, not silently ignored.

    Each value is None when the option was not given (switches that default to off pass `x or None`).
    """
    named = [
        ("--no-" if value is False else "--") + name.replace("_", "-")
        for name, value in given.items()
        if value is not None
    ]
    if named:
        fixed = "it" if len(named) == 1 else "them"
        raise OptionError(
            f"{', '.join(named)} cannot apply to an export directory: the export fixed {fixed}; "
            "re-run `modiff-trt export` with the settings you want"
        )


def _first_stage(config: str, family: str, checkpoint: str | Path | None, trust: bool) -> torch.nn.Module | None:
    """The first-stage decoder of a latent-diffusion model; None for ddim models, which sample
    pixels (so a ddim export samples without its config file)."""
    if family == "ddim":
        return None
    if family == "diffusers":  # the pipeline folder's own VAE, when it has one
        from modiff_trt.models import load_config
        from modiff_trt.models.diffusers_unet import first_stage

        return first_stage(load_config(config))
    if checkpoint is None:
        raise ConfigError("latent diffusion needs --checkpoint: its first-stage decoder turns latents into images")
    from modiff_trt.models import load_config
    from modiff_trt.models.ldm_loading import load_first_stage

    return load_first_stage(load_config(config).ldm, checkpoint, trust=trust)


@dataclass(frozen=True)
class ExportOptions:
    """`modiff-trt export`: warm-up/step (or plain) ONNX graphs with explicit Q/DQ, and the manifest."""

    out: Path
    model: ModelOptions
    calibration: Path | None = None  # static scales; required unless activations stay in float
    quant: QuantOptions = field(default_factory=QuantOptions)
    float_format: str = "fp32"  # fp32 (ONNX Runtime) or fp16 (TensorRT)
    opset: int | None = None
    batch_size: int | None = None  # None: dynamic batch
    dynamic_batch: bool = False
    target: str = "trt"
    guidance: bool | None = None  # SD classifier-free guidance in the graphs; None: on for text-conditioned models


EXPORT_ADVICE = (
    "close other jobs or export on a machine with more memory (the peak is the float model traced in fp32; "
    "--float, --target and --weight-bits barely change it)"
)


def export(options: ExportOptions) -> Manifest:
    """Export `options.model` quantized as `options.quant` into `options.out`; returns its manifest.

    `out` is written beside and renamed into place; an existing `out` is replaced only when it
    holds a complete earlier export and nothing else.
    """
    from modiff_trt.atomic import check_destination
    from modiff_trt.engines.torch_backend import load_reference
    from modiff_trt.export.exporter import STREAM_BYTES, export_model
    from modiff_trt.export.replace import check_replaceable_export
    from modiff_trt.memory import check_fits, export_estimate
    from modiff_trt.models import load_config

    o = options
    if o.dynamic_batch and o.batch_size is not None:
        raise OptionError("--batch-size and --dynamic-batch exclude each other")
    at_least("--batch-size", o.batch_size, 1)
    check_destination(o.out, check_replaceable_export)
    dtype = {"fp32": "float32", "fp16": "float16"}[o.float_format]
    quant = o.quant.following(o.calibration).config("static" if o.calibration is not None else "dynamic")
    checkpoint = o.model.checkpoint_file()
    model_cfg = load_config(o.model.config)  # once: the estimate and the loader both take it
    check_fits(
        export_estimate(
            model_cfg,
            quant.weight_bits is not None,
            checkpoint.stat().st_size if checkpoint is not None and checkpoint.is_file() else 0,
            STREAM_BYTES,
        ),
        EXPORT_ADVICE,
    )
    _, float_model, qmodel = load_reference(
        model_cfg, checkpoint, quant, o.calibration, trust=o.model.trust_checkpoint, ema=o.model.ema
    )
    guidance = model_cfg.context_shape is not None if o.guidance is None else o.guidance
    sampler = None  # the calibration's sampler becomes the export's default; without one, the config's
    if o.calibration is not None:
        from modiff_trt.calibrators import load_calibration

        sampler = load_calibration(o.calibration).sampler(model_cfg)
    return export_model(
        float_model,
        qmodel,
        model_cfg,
        o.out,
        checkpoint=checkpoint,
        calibration=o.calibration,
        sampler=sampler,
        float_dtype=dtype,
        opset=o.opset,
        batch_size=o.batch_size,
        target=o.target,
        guidance=guidance,
        ema=o.model.ema,
    )


@dataclass(frozen=True)
class CalibrateOptions:
    """`modiff-trt calibrate`: static activation scales measured on full-precision trajectories."""

    out: Path
    model: ModelOptions
    from_qdiffusion: Path | None = None  # a released Q-Diffusion checkpoint instead of --checkpoint
    quant: QuantOptions = field(default_factory=QuantOptions)
    sampling: SamplerOptions = field(default_factory=SamplerOptions)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    method: str = "minmax"
    cali_st: int = 20
    cali_n: int = 256
    batch_size: int = 32
    seed: int = 0
    step_groups: str = "1"
    weight_method: str | None = None  # minmax | mse | adaround; None follows `method` (mse -> mse, else minmax)
    reconstruction: dict[str, Any] = field(default_factory=dict)  # ReconstructionOptions fields (adaround)
    device: str = AUTO  # devices.torch_device: CUDA when available, else the CPU


def calibrate(options: CalibrateOptions) -> Calibration:
    """Measure (or import) the scales and write the calibration file `options.out`.

    `out` never replaces a checkpoint, the input itself, or any file that is not a calibration.
    """
    from modiff_trt.calibrators import CalibrationOptions, import_qdiffusion
    from modiff_trt.calibrators import calibrate as measure
    from modiff_trt.calibrators.fileformat import check_calibration_out
    from modiff_trt.calibrators.reconstruct import ReconstructionOptions
    from modiff_trt.models import load_config

    o = options
    device = torch_device(o.device)
    for option, value in (("--cali-n", o.cali_n), ("--cali-st", o.cali_st), ("--batch-size", o.batch_size)):
        at_least(option, value, 1)
    at_least("--seed", o.seed, 0)
    o.sampling.check()
    not_a_directory("--from-qdiffusion", o.from_qdiffusion, "Q-Diffusion checkpoint file")
    check_calibration_out(o.out, {"--checkpoint": o.model.checkpoint, "--from-qdiffusion": o.from_qdiffusion})
    if o.model.config is None:
        raise OptionError("--config is required: a ddim-layout YAML or a built-in name")
    model_cfg = load_config(o.model.config)
    chosen = o.sampling.make(model_cfg)
    fmt, modulate = str(o.quant.chosen("act_format")), o.quant.chosen("modulate")
    settings = CalibrationOptions(
        weight_bits=o.quant.weight_bits_or_float(),
        act_bits=o.quant.act_bits_or_float(),
        modulate=modulate,
        first_step=str(o.quant.chosen("first_step")),
        split=o.quant.chosen("split"),
        method=o.method,
        cali_st=o.cali_st,
        cali_n=o.cali_n,
        batch_size=o.batch_size,
        seed=o.seed,
        step_groups=o.step_groups,
        act_format=fmt,
        weight_method=None if o.weight_method is None else str(o.weight_method),
        reconstruction=ReconstructionOptions(**o.reconstruction),
        first_last_bits=o.quant.first_last_bits_or_same(),
    )
    learns_weights = settings.weight_bits is not None and settings.resolved_weight_method != "minmax"
    if settings.act_bits is None and o.from_qdiffusion is None and not learns_weights:
        raise OptionError(
            "--act-bits 0 keeps activations in float, so calibrate has no activation scales to measure and "
            "nearest-rounded weights need none: export with --act-bits 0 and no --calibration, or learn "
            "the weights (--weight-method mse or adaround)"
        )
    if o.from_qdiffusion is not None:
        if o.model.checkpoint is not None:
            raise OptionError(
                "give --checkpoint or --from-qdiffusion, not both: the Q-Diffusion file holds the fp32 weights"
            )
        if fmt != "int":
            raise OptionError("--from-qdiffusion imports integer grids: drop --act-format")
        if settings.reconstructs:
            raise OptionError(
                "--weight-method adaround learns integer weights, --from-qdiffusion brings its own: drop one"
            )
        if o.device not in (AUTO, "cpu"):
            raise OptionError("--from-qdiffusion imports on the CPU: drop --device")
        if o.quant.first_last_bits is not None and settings.quant.end_weight_bits != settings.weight_bits:
            raise OptionError(
                f"--first-last-bits {o.quant.first_last_bits}: a Q-Diffusion checkpoint holds every layer at "
                "--weight-bits (its input and output conv too), and the import keeps them exactly: drop "
                "--first-last-bits"
            )
        return import_qdiffusion(
            model_cfg, o.from_qdiffusion, o.out, settings, chosen if modulate else None, trust=o.model.trust_checkpoint
        )
    conditioning = o.prompts.conditioning(model_cfg.context_shape, model_cfg.source, o.seed)
    return measure(
        model_cfg,
        o.model.checkpoint_file(),
        o.out,
        chosen,
        settings,
        conditioning=conditioning,
        trust=o.model.trust_checkpoint,
        ema=o.model.ema,
        device=device,
    )


@dataclass(frozen=True)
class CompareOptions:
    """`modiff-trt compare`: per-step differences between backends over one trajectory."""

    export_dir: Path
    backends: tuple[str, ...] = ("torch", "ort")  # the first is the reference
    num_images: int = 4
    steps: int = 10
    skip_type: str | None = None
    seed: int = 0
    json_out: Path | None = None  # also write the rows as JSON
    overwrite: bool = False  # replace an existing json_out
    trust_checkpoint: bool = False
    device: str = AUTO  # the torch backend's device, trt's CUDA device (devices.runner_device)


def compare(options: CompareOptions) -> list[StepDiff]:
    """The per-step rows of `backends[1:]` against `backends[0]` (also written to `json_out`)."""
    from modiff_trt.atomic import atomic_write, writable_file
    from modiff_trt.engines.compare import compare_backends

    o = options
    if len(o.backends) < 2:
        raise OptionError("--backends needs at least two backends, e.g. torch,ort")
    unknown = [name for name in o.backends if name not in set(Backend)]
    if unknown:
        raise OptionError(
            f"--backends {','.join(o.backends)}: unknown {', '.join(unknown)}; choose from {', '.join(Backend)}"
        )
    sample_counts(o.num_images, None, o.seed)
    at_least("--steps", o.steps, 1)
    writable_file(o.json_out, "--json", overwrite=o.overwrite)
    if o.json_out is not None and Path(o.json_out).resolve().is_relative_to(Path(o.export_dir).resolve()):
        raise OptionError(
            f"--json {o.json_out} is inside the export directory {o.export_dir}, whose files are the export's: "
            "write it elsewhere"
        )
    for backend in o.backends:
        if backend in DEVICE_BACKENDS:
            runner_device(backend, o.device)  # refused here, before any backend loads
    rows = compare_backends(
        o.export_dir,
        list(o.backends),
        o.num_images,
        o.seed,
        o.trust_checkpoint,
        device=o.device,
        steps=o.steps,
        skip_type=o.skip_type,
    )
    if o.json_out:
        atomic_write(o.json_out, json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    return rows
