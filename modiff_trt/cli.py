"""The `modiff-trt` command line: a thin Typer layer over the library.

Each command parses options, calls one library function (sample, export, calibrate and compare:
the typed `api` functions, which check every option before work) and renders its result with
rich. Library errors (`ModiffError`) become one red line naming the file and the fix, exit code 2.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from modiff_trt import __version__, api
from modiff_trt.atomic import writable_file
from modiff_trt.choices import (
    ActFormat,
    ActScales,
    Backend,
    CpuBackend,
    Engine,
    FirstStep,
    FloatFormat,
    LatentSampler,
    Method,
    OrtProvider,
    Scheduler,
    SkipType,
    StateDtype,
    StateLayout,
    Target,
    WeightMethod,
)
from modiff_trt.devices import AUTO, HELP
from modiff_trt.errors import ModiffError, OptionError
from modiff_trt.validate import at_least, positive_seconds, sample_counts

app = typer.Typer(
    name="modiff-trt",
    help="Deploy MoDiff-quantized diffusion UNets with TensorRT and ONNX Runtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., object])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"modiff-trt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )


def user_errors(func: F) -> F:
    """Every failure becomes one line and an exit code, never a bare traceback.

    A `ModiffError` (the user can fix it: bad option, file or artifact) exits 2 with its message.
    Anything else is a bug or an environment problem (full disk, killed runtime): one line naming
    the command and the error, exit 1; with -v the traceback follows.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ModiffError as exc:
            _error(str(exc))
            raise typer.Exit(code=2) from None
        except (typer.Exit, typer.Abort, typer.BadParameter):  # the framework's own signals pass through
            raise
        except Exception as exc:  # noqa: BLE001 - the catch-all the CLI promises
            command = func.__name__.removesuffix("_command").removesuffix("_cmd").replace("_", "-")
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                console.print_exception()
            _error(f"{command} failed: {type(exc).__name__}: {exc} (run with -v for the traceback)")
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def every_rank(func: F) -> F:
    """Run a command on each process of a torchrun job (its `--dist-timeout` bounds every wait).

    The process joins the job the environment describes (nothing happens in a single-process
    run); an error on any rank ends the command on every rank, each with that rank's message.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from modiff_trt.sampling.distributed import process_group, together

        with process_group(positive_seconds("--dist-timeout", kwargs["dist_timeout"])) as world, together(world):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _error(message: str) -> None:
    console.print(Text("error: ", style="bold red") + Text(" ".join(message.split())), highlight=False, soft_wrap=True)


# --- options shared by several commands ---------------------------------------------------
WEIGHT_BITS = typer.Option(
    None,
    "--weight-bits",
    help="Weight bits (2..8; 0 keeps weights in float) [default: the --calibration file's, else 8].",
)
ACT_BITS = typer.Option(
    None,
    "--act-bits",
    help="Activation bits (2..8; 0 keeps activations in float) [default: the --calibration file's, else 8, 4 for nvfp4].",
)
ACT_FORMAT = typer.Option(
    None,
    "--act-format",
    help="Activation format: int (b-bit integers), fp8 (E4M3) or nvfp4 (E2M1 in 16-channel blocks); layers TensorRT cannot run in it fall back (docs/formats.md) [default: the --calibration file's, else int].",
)
MODULATE = typer.Option(
    None,
    "--modulate/--no-modulate",
    help="MoDiff modulation, or plain Q-Diffusion [default: the --calibration file's, else modulate].",
)
FIRST_STEP = typer.Option(
    None,
    "--first-step",
    help="Warm-up step: float activations or quantized [default: the --calibration file's, else fp].",
)
SPLIT = typer.Option(
    None, "--split/--no-split", help="Quantize skip-concat channel groups separately (Q-Diffusion) [default: no-split]."
)
FIRST_LAST_BITS = typer.Option(
    None,
    "--first-last-bits",
    help="Weight bits of the UNet's input and output conv when --weight-bits is lower (2..8), or 'same': "
    "every layer at --weight-bits [default: the --calibration file's, else 8].",
)
STATE_DTYPE = typer.Option(None, "--state-dtype", help="Precision of a_hat/o_hat between steps [default: float32].")
STATE_LAYOUT = typer.Option(
    None,
    "--state-layout",
    help="a_hat as is (plain) or in units of its residual scale (scaled: exact in fp16 while |A| <= 2048) "
    "[default: scaled with --state-dtype float16, else plain].",
)
SKIP_TYPE = typer.Option(None, "--skip-type", help="DDIM timestep selection [default: quad].")
SEED = typer.Option(0, "--seed", help="Seed (>= 0): image i's noise depends only on (seed, i).")
TRUST = typer.Option(
    False, "--trust-checkpoint", help="Load pickled checkpoints with weights_only=False (only for files you trust)."
)
RANDOM_WEIGHTS = typer.Option(
    False,
    "--random-weights",
    help="Without --checkpoint, for configs without packaged weights: run an untrained network (speed tests only).",
)
EMA = typer.Option(False, "--ema/--no-ema", help="Latent diffusion: use the checkpoint's EMA weights (model_ema.*).")
SAMPLER = typer.Option(
    None,
    "--sampler",
    help="Latent diffusion: ddim or plms (default: the config's, PLMS for SD; an export's: the one it records).",
)
SCHEDULER = typer.Option(
    None,
    "--scheduler",
    help="Drive the UNet with a diffusers scheduler instead of --sampler, on any model (pip install 'modiff-trt[diffusers]'); a diffusers model folder uses its own scheduler by default.",
)
GUIDANCE = typer.Option(
    None, "--guidance-scale", help="SD classifier-free guidance scale (default 7.5; 1 disables it)."
)
PROMPT = typer.Option(None, "--prompt", help="SD: one prompt for every image.")
FROM_FILE = typer.Option(None, "--from-file", help="SD: prompts, one per line (image i gets line i mod n).")
TEXT_ENCODER = typer.Option(
    None,
    "--text-encoder",
    help="SD: local directory of a CLIP ViT-L/14 text model (needs pip install 'modiff-trt[sd]').",
)
RANDOM_CONTEXT = typer.Option(
    False, "--random-context", help="SD: random context tensors instead of prompts (smoke tests only)."
)
OVERWRITE = typer.Option(
    False, "--overwrite", help="Replace a non-empty --out (written beside it, swapped in at the end)."
)


@app.command()
@user_errors
@every_rank
def sample(
    export_dir: Path | None = typer.Argument(
        None,
        help="Export directory (from `modiff-trt export`). Omit to sample a config + checkpoint with the torch reference.",
    ),
    backend: Backend = typer.Option(
        Backend.torch,
        "--backend",
        "-b",
        help="torch (PyTorch reference), ort (ONNX Runtime), openvino (OpenVINO, CPU) or trt (TensorRT engines).",
    ),
    config: str | None = typer.Option(
        None,
        "--config",
        "-c",
        help="Model config: a YAML (official ddim or latent-diffusion layout), a built-in name, or a diffusers UNet/pipeline folder.",
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="UNet checkpoint (flat state_dict, ddim training list, Q-Diffusion, safetensors)."
    ),
    calibration: Path | None = typer.Option(None, "--calibration", help="Calibration file for --act-scales static."),
    weight_bits: int | None = WEIGHT_BITS,
    first_last_bits: str | None = FIRST_LAST_BITS,
    act_bits: int | None = ACT_BITS,
    act_format: ActFormat | None = ACT_FORMAT,
    modulate: bool | None = MODULATE,
    act_scales: ActScales | None = typer.Option(
        None,
        "--act-scales",
        help="'dynamic' (per call) or 'static' (from --calibration). Default: static with --calibration, else dynamic.",
    ),
    first_step: FirstStep | None = FIRST_STEP,
    split: bool | None = SPLIT,
    state_dtype: StateDtype | None = STATE_DTYPE,
    state_layout: StateLayout | None = STATE_LAYOUT,
    num_images: int = typer.Option(16, "--num-images", "-n", help="How many images to sample."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per batch (MoDiff state is per batch)."),
    steps: int | None = typer.Option(
        None,
        "--steps",
        help="Sampling steps (default: the export's recorded sampler; with --config 100 for ddim, the paper setting for LDM/SD).",
    ),
    skip_type: SkipType | None = SKIP_TYPE,
    eta: float | None = typer.Option(None, "--eta", help="DDIM eta (default: the export's, else 0; LSUN-Bedrooms: 1)."),
    seed: int = SEED,
    out: Path = typer.Option(
        Path("samples"), "--out", "-o", help="Output directory for PNGs, grid.png and samples.npz."
    ),
    overwrite: bool = OVERWRITE,
    pngs: bool = typer.Option(True, "--pngs/--no-pngs", help="Write one PNG per image."),
    cuda_graph: bool = typer.Option(
        False, "--cuda-graph", help="trt backend: capture one CUDA graph per state arrangement."
    ),
    device: str = typer.Option(
        AUTO,
        "--device",
        help=f"Where the model runs: {HELP}. torch backend: the reference's device (under torchrun auto is "
        "cuda:LOCAL_RANK); trt: the CUDA device the plans were built on (auto: cuda); ort picks its device "
        "with --ort-provider and openvino runs on the CPU, so they take only auto.",
    ),
    ort_provider: OrtProvider = typer.Option(
        OrtProvider.auto,
        "--ort-provider",
        help="ort backend: auto (CUDA if onnxruntime-gpu sees a GPU), cpu, cuda or tensorrt (ONNX Runtime's TensorRT provider).",
    ),
    trust_checkpoint: bool = TRUST,
    random_weights: bool = RANDOM_WEIGHTS,
    ema: bool = EMA,
    sampler: LatentSampler | None = SAMPLER,
    scheduler: Scheduler | None = SCHEDULER,
    guidance_scale: float | None = GUIDANCE,
    prompt: str | None = PROMPT,
    from_file: Path | None = FROM_FILE,
    text_encoder: Path | None = TEXT_ENCODER,
    random_context: bool = RANDOM_CONTEXT,
    dist_timeout: float = typer.Option(
        1800.0,
        "--dist-timeout",
        help="torchrun runs: seconds a process waits for the others (longer than one batch takes).",
    ),
) -> None:
    """Sample images: one PNG per image, grid.png and samples.npz (arr_0 uint8 NHWC, x0 float32 NCHW).

    Latent-diffusion models sample latents (LDM DDIM, or PLMS with classifier-free guidance for
    SD) and decode them with the checkpoint's first stage; samples.npz then adds z0 (latents).

    Examples:\n
      modiff-trt sample --config ddim-cifar10 --checkpoint model-790000.ckpt --act-bits 4 -n 64\n
      modiff-trt sample exports/cifar --backend ort -n 64\n
      modiff-trt sample exports/sd --backend ort --text-encoder clip-vit-large-patch14 --prompt "a church" -n 4\n
      torchrun --standalone --nproc-per-node 8 -m modiff_trt sample exports/cifar16 --backend trt -n 50000 --batch-size 64

    Under torchrun (or any launcher setting RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
    each process samples whole batches of the one-process run on cuda:LOCAL_RANK or the CPU and
    rank 0 writes the files: the same pixels at any process count for one --batch-size (a
    different --batch-size changes quantized pixels slightly). See docs/distributed.md.
    """
    result = api.sample(
        api.SampleOptions(
            out=out,
            export_dir=export_dir,
            backend=backend,
            calibration=calibration,
            act_scales=act_scales,
            model=api.ModelOptions(config, checkpoint, trust_checkpoint, random_weights, ema),
            quant=api.QuantOptions(
                weight_bits,
                act_bits,
                act_format,
                modulate,
                first_step,
                split,
                state_dtype,
                state_layout,
                first_last_bits,
            ),
            sampling=api.SamplerOptions(sampler, steps, skip_type, eta, guidance_scale, scheduler),
            prompts=api.PromptOptions(prompt, from_file, text_encoder, random_context),
            num_images=num_images,
            batch_size=batch_size,
            seed=seed,
            overwrite=overwrite,
            pngs=pngs,
            cuda_graph=cuda_graph,
            device=device,
            ort_provider=ort_provider,
        )
    )
    if result.written:
        processes = f" with {result.processes} processes" if result.processes > 1 else ""
        console.print(f"wrote {result.num_images} samples to [bold]{out}[/]{processes} in {result.seconds:.1f} s")


@app.command()
@user_errors
def build(
    export_dir: Path = typer.Argument(
        ..., help="Export directory with manifest.json and the fp16 graphs (`modiff-trt export --float fp16`)."
    ),
    min_batch: int | None = typer.Option(None, "--min-batch", help="Smallest batch the engines accept (default 1)."),
    opt_batch: int | None = typer.Option(
        None,
        "--opt-batch",
        help="Batch TensorRT tunes its kernels for: set it to the batch you sample with (default = max).",
    ),
    max_batch: int | None = typer.Option(
        None, "--max-batch", help="Largest batch (default 16). Under classifier-free guidance count the doubled batch."
    ),
    workspace_gb: float | None = typer.Option(
        None,
        "--workspace-gb",
        help="Scratch memory TensorRT may use while building (default: TensorRT's, the whole GPU).",
    ),
    opt_level: int = typer.Option(
        3,
        "--opt-level",
        help="Builder optimization level 0-5: higher tries more kernels (slower build, maybe faster engine).",
    ),
    timing_cache: Path | None = typer.Option(
        None,
        "--timing-cache",
        help="Kernel timing cache file: read if present, updated after the build; makes rebuilds much faster.",
    ),
    version_compatible: bool = typer.Option(
        False,
        "--version-compatible",
        help="Plans that later TensorRT releases (same major, or the next major) can run (slightly slower).",
    ),
    tf32: bool = typer.Option(
        False,
        "--tf32",
        help="Let fp32 matmuls/convs use TF32 (TensorRT's default; off here: its rounding flips int8 codes of x - a_hat).",
    ),
    detailed_profile: bool = typer.Option(
        False,
        "--detailed-profile",
        help="Build with DETAILED profiling verbosity (layer parameters in `profile --per-layer`; adds enqueue latency).",
    ),
    device: str = typer.Option(
        "cuda", "--device", help="CUDA device to build on, e.g. cuda:1 (the sidecar records it)."
    ),
) -> None:
    """Build TensorRT plans (warmup.plan + step.plan, or unet.plan) next to the ONNX graphs.

    The engines are strongly typed: precision comes from the graph (fp16 + explicit int8 Q/DQ),
    never from builder flags. Each plan gets a sidecar (<name>.plan.json) recording the
    TensorRT version, GPU and ONNX hash; `sample --backend trt` refuses a plan whose sidecar
    does not match this machine. Needs an NVIDIA GPU and `pip install 'modiff-trt[trt]'`.

    Examples:\n
      modiff-trt build exports/cifar --opt-batch 64 --max-batch 64\n
      modiff-trt build exports/cifar --timing-cache ~/.cache/modiff-trt/h100.cache
    """
    from rich.table import Table

    from modiff_trt.engines.sidecar import read_sidecar, sidecar_path
    from modiff_trt.engines.trt_build import build_engines

    for option, value in (("--min-batch", min_batch), ("--opt-batch", opt_batch), ("--max-batch", max_batch)):
        at_least(option, value, 1)
    if workspace_gb is not None and not workspace_gb > 0:
        raise OptionError(f"--workspace-gb {workspace_gb} is invalid: it must be > 0")
    writable_file(timing_cache, "--timing-cache")
    plans = build_engines(
        export_dir,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_gb=workspace_gb,
        opt_level=opt_level,
        timing_cache=timing_cache,
        version_compatible=version_compatible,
        tf32=tf32,
        detailed_profile=detailed_profile,
        device=device,
    )
    table = Table(title=f"TensorRT engines in {export_dir}")
    for column in ("plan", "size MB", "build s", "batch min/opt/max", "TensorRT", "GPU"):
        table.add_column(column)
    for plan in plans:
        side = read_sidecar(sidecar_path(plan))
        x = side.profile.get("x", {})
        batches = "/".join(str(x[k][0]) for k in ("min", "opt", "max")) if x else "-"
        table.add_row(
            plan.name,
            f"{plan.stat().st_size / 1e6:.1f}",
            f"{side.build_seconds:.1f}",
            batches,
            side.tensorrt_version,
            f"{side.gpu_name} (sm {side.compute_capability})",
        )
    console.print(table)


@app.command()
@user_errors
def profile(
    export_dir: Path = typer.Argument(..., help="Export directory whose plans `modiff-trt build` wrote."),
    engine: Engine = typer.Option(
        Engine.step,
        "--engine",
        help="Which plan to time: 'step' (every step but the first: what dominates sampling) or 'warmup'.",
    ),
    batch: int = typer.Option(
        1, "--batch", help="Batch size to time; must lie in the plan's --min-batch..--max-batch."
    ),
    per_layer: bool = typer.Option(
        False, "--per-layer", help="Also profile each layer (separate run) and show the slowest ones."
    ),
    top: int = typer.Option(15, "--top", help="How many layers --per-layer shows."),
    zero_state: bool = typer.Option(
        False,
        "--zero-state",
        help="Feed zeros as MoDiff state instead of the state of a real warm-up step (computed with ONNX Runtime on the CPU).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Write the input files and print the exact trtexec command, without running it."
    ),
    trtexec: str = typer.Option(
        "trtexec",
        "--trtexec",
        help="trtexec executable (it ships with the TensorRT tar/deb packages, not the pip wheels).",
    ),
) -> None:
    """Time one engine with trtexec: throughput, GPU compute median/p90/p99, enqueue time.

    Every input is loaded from a file (--loadInputs), the state inputs from a real warm-up step
    by default. Flags follow the plan's TensorRT version (10.x: --useCudaGraph
    --noDataTransfers; 11.x: neither). Results: a table here, JSON in DIR/profile/.

    Examples:\n
      modiff-trt profile exports/cifar --batch 64\n
      modiff-trt profile exports/cifar --engine warmup --batch 64 --per-layer\n
      modiff-trt profile exports/cifar --dry-run
    """
    import shlex

    from rich.table import Table

    from modiff_trt.engines.trtexec import profile_engine

    at_least("--batch", batch, 1)
    at_least("--top", top, 1)
    result = profile_engine(
        export_dir,
        engine=str(engine),
        batch=batch,
        per_layer=per_layer,
        dry_run=dry_run,
        trtexec=trtexec,
        real_state=not zero_state,
        top=top,
    )
    if dry_run:
        typer.echo(shlex.join(result.command))
        return
    summary = result.summary
    table = Table(title=f"{result.engine}.plan, batch {result.batch} (ms)")
    for column in ("metric", "median", "mean", "p90", "p95", "p99", "min", "max"):
        table.add_column(column)
    for name, stats in summary.metrics.items():
        cells = [
            stats.median,
            stats.mean,
            *(stats.percentiles.get(p) for p in ("90", "95", "99")),
            stats.min,
            stats.max,
        ]
        table.add_row(name, *("-" if v is None else f"{v:.4f}" for v in cells))
    console.print(table)
    if summary.throughput_qps is not None:
        console.print(
            f"throughput: {summary.throughput_qps:.1f} qps = {summary.throughput_qps * result.batch:.1f} samples/s"
        )
    if result.layers is not None:
        layers = Table(
            title=f"slowest {len(result.layers.layers)} layers (of {result.layers.total_average_ms:.3f} ms per run)"
        )
        for column in ("layer", "avg ms", "%"):
            layers.add_column(column)
        for layer in result.layers.layers:
            layers.add_row(layer.name, f"{layer.average_ms:.4f}", f"{layer.percentage:.1f}")
        console.print(layers)
    console.print(f"JSON: {result.json_path}  log: {result.log_path}")


@app.command("export")
@user_errors
def export_cmd(
    config: str = typer.Option(
        ...,
        "--config",
        "-c",
        help="Model config: a YAML (official ddim or latent-diffusion layout), a built-in name, or a diffusers UNet/pipeline folder.",
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="UNet checkpoint (omit only for built-ins with packaged weights)."
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="Calibration file (static scales; required unless --act-bits 0)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Export directory to write (replaced atomically if it is an earlier export)."
    ),
    weight_bits: int | None = WEIGHT_BITS,
    first_last_bits: str | None = FIRST_LAST_BITS,
    act_bits: int | None = ACT_BITS,
    act_format: ActFormat | None = ACT_FORMAT,
    modulate: bool | None = MODULATE,
    first_step: FirstStep | None = FIRST_STEP,
    split: bool | None = SPLIT,
    state_dtype: StateDtype | None = STATE_DTYPE,
    state_layout: StateLayout | None = STATE_LAYOUT,
    float_dtype: FloatFormat = typer.Option(
        FloatFormat.fp32, "--float", help="Float parts of the graph: fp32 (ONNX Runtime) or fp16 (TensorRT)."
    ),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (17..20; default 17 for fp32, 19 for fp16)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Fix the batch size (>= 1; default: dynamic batch)."
    ),
    dynamic_batch: bool = typer.Option(
        False, "--dynamic-batch", help="Dynamic batch dimension (the default when --batch-size is absent)."
    ),
    target: Target = typer.Option(
        Target.trt, "--target", help="trt (TensorRT rules, also runs on ONNX Runtime) or ort-cpu (integer CPU kernels)."
    ),
    trust_checkpoint: bool = TRUST,
    random_weights: bool = RANDOM_WEIGHTS,
    ema: bool = EMA,
    guidance: bool | None = typer.Option(
        None,
        "--cfg/--no-cfg",
        help="SD: engines run classifier-free guidance, so the state holds cond+uncond (2 per image; default on for SD). A fixed --batch-size counts both halves.",
    ),
) -> None:
    """Export warmup.onnx + step.onnx (MoDiff) or unet.onnx (plain) with explicit Q/DQ, and manifest.json.

    Example:\n
      modiff-trt export -c ddim-cifar10 --checkpoint model-790000.ckpt --calibration cifar.cal.safetensors -o exports/cifar
    """
    manifest = api.export(
        api.ExportOptions(
            out=out,
            model=api.ModelOptions(config, checkpoint, trust_checkpoint, random_weights, ema),
            calibration=calibration,
            quant=api.QuantOptions(
                weight_bits,
                act_bits,
                act_format,
                modulate,
                first_step,
                split,
                state_dtype,
                state_layout,
                first_last_bits,
            ),
            float_format=float_dtype,
            opset=opset,
            batch_size=batch_size,
            dynamic_batch=dynamic_batch,
            target=target,
            guidance=guidance,
        )
    )
    console.print(
        f"exported {len(manifest.layers)} quantized layers to [bold]{out}[/] "
        f"({', '.join(g.file for g in manifest.graphs.values())}); state {manifest.state_bytes_per_sample() / 2**20:.1f} MiB/sample"
    )


@app.command()
@user_errors
def inspect(
    export_dir: Path = typer.Argument(..., help="Export directory."),
    lint: bool = typer.Option(
        False, "--lint", help="Check TensorRT's explicit-quantization rules; exit 1 on a violation."
    ),
    batch: int = typer.Option(1, "--batch", help="Batch size for the state-memory line."),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="Print the per-layer table."),
) -> None:
    """Show an export: quantized layers, scales, state shapes, state memory per sample and batch."""
    from rich.table import Table

    from modiff_trt.export.manifest import load_manifest

    at_least("--batch", batch, 1)
    manifest = load_manifest(export_dir)
    out = Console()
    export = manifest.export
    out.print(
        f"[bold]{export_dir}[/]: {manifest.model.config} | {manifest.quant.label} "
        f"| first step {manifest.quant.first_step} | float {export.float_dtype} "
        f"| state {export.state_dtype} {export.state_layout} | opset {export.opset} | batch {manifest.batch_size or 'dynamic'}"
    )
    out.print(_weights_line(manifest))
    if layers:
        table = Table("layer", "kind", "bits", "act format", "act scale", "a_hat", "o_hat", "state KiB/sample")
        item = 2 if export.state_dtype == "float16" else 4
        for layer in manifest.layers:
            kinds = layer.state_kinds if manifest.modulated else ()
            n = sum(int(np.prod(layer.state_shape(kind))) for kind in kinds)
            scale = ", ".join(f"{v:.3g}" for v in layer.act_scale) if layer.act_scale else "-"
            if layer.constant_input:
                scale = "constant input: o_hat passed through"
            table.add_row(
                layer.name,
                layer.kind,
                f"w{layer.weight_bits}a{layer.act_bits}",
                _format_name(layer),
                scale,
                _a_hat_cell(layer, kinds),
                str(layer.o_hat_shape),
                f"{n * item / 1024:.1f}",
            )
        out.print(table)
    _print_formats(out, manifest)
    per_sample = manifest.state_bytes_per_sample() if manifest.modulated else 0
    shared = sum(layer.a_hat_owner is not None for layer in manifest.layers)
    if shared:
        out.print(f"{shared} layer(s) read an earlier layer's a_hat (same input tensor, same quantizer)")
    guided = " (cond+uncond)" if export.state_batch_multiplier > 1 else ""
    out.print(
        f"{len(manifest.layers)} quantized layers; MoDiff state {per_sample / 2**20:.2f} MiB per sample"
        f"{guided}, {per_sample * batch / 2**20:.1f} MiB at batch {batch} "
        f"(x2 for the ping-pong sets: {2 * per_sample * batch / 2**20:.1f} MiB)"
    )
    if lint:
        from modiff_trt.export.lint import lint_export

        issues = lint_export(export_dir)
        for issue in issues:
            out.print(Text(str(issue), style="red"))
        if issues:
            console.print(Text(f"lint: {len(issues)} violation(s)", style="bold red"))
            raise typer.Exit(code=1)
        out.print(Text("lint: all TensorRT explicit-quantization rules hold", style="green"))


WEIGHT_SOURCES = {
    "minmax": "nearest rounding, absmax per-channel scales",
    "mse": "nearest rounding, MSE-searched per-channel scales",
    "adaround": "AdaRound rounding learned by block reconstruction (BRECQ) on MSE-searched scales",
    "qdiffusion": "imported from a Q-Diffusion checkpoint (its AdaRound rounding)",
}


def _weights_line(manifest) -> str:
    """Which method made the exported integer weights (from the calibration the export recorded)."""
    if not manifest.quant.weight_bits:
        return "weights: float"
    cal = manifest.calibration
    method = "minmax" if cal is None else cal.weight_method
    source = "" if cal is None else f" (calibration {Path(cal.path).name})"
    bits = manifest.quant.weight_bits
    ends = [layer.name for layer in manifest.layers if layer.weight_bits != bits]
    kept = f"; {', '.join(ends)} at W{manifest.quant.end_weight_bits} (first/last layer)" if ends else ""
    return f"weights: W{bits} {method}: {WEIGHT_SOURCES.get(method, method)}{kept}{source}"


def _a_hat_cell(layer, kinds: tuple[str, ...]) -> str:
    """inspect's a_hat column: the shape a layer carries, whose a_hat it reads, or -."""
    if layer.a_hat_owner is not None:
        return f"{layer.a_hat_owner}'s"
    return str(layer.a_hat_shape) if "a_hat" in kinds else "-"


def _format_name(layer) -> str:
    """A layer's activation format as inspect shows it: int8, int4, fp8, nvfp4 (- when float)."""
    if not layer.act_bits:
        return "-"
    return f"int{layer.act_bits}" if layer.act_format == "int" else layer.act_format


def _print_formats(out: Console, manifest) -> None:
    """Count of layers per activation format, each fallback and why, and what the float formats need."""
    from collections import Counter

    from modiff_trt.quant.formats import FORMAT_REQUIREMENTS

    counts = Counter(_format_name(layer) for layer in manifest.layers)
    out.print("activation formats: " + ", ".join(f"{n} {name}" for name, n in counts.most_common()))
    for layer in manifest.layers:
        if layer.format_note:
            out.print(f"  {layer.name}: {_format_name(layer)} ({layer.format_note})")
    for fmt, needs in FORMAT_REQUIREMENTS.items():
        if fmt in counts:
            out.print(f"{fmt} on TensorRT needs {needs}")


@app.command()
@user_errors
def compare(
    export_dir: Path = typer.Argument(..., help="Export directory."),
    backends: str = typer.Option(
        "torch,ort", "--backends", help="Comma-separated backends; the first is the reference."
    ),
    num_images: int = typer.Option(4, "--num-images", "-n", help="Images in the compared batch (>= 1)."),
    steps: int = typer.Option(10, "--steps", help="Sampler steps of the compared trajectory (1..T)."),
    skip_type: SkipType | None = SKIP_TYPE,
    seed: int = SEED,
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the table as JSON (outside the export directory; its folders are created)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
    trust_checkpoint: bool = TRUST,
    device: str = typer.Option(
        AUTO,
        "--device",
        help=f"Where the torch backend runs ({HELP}) and trt's CUDA device (auto: cuda); other backends keep theirs.",
    ),
) -> None:
    """Per-step error table between backends over one trajectory from the same noise.

    The trajectory uses the export's sampler (DDIM, LDM DDIM or PLMS with guidance) at --steps;
    text-conditioned exports get random context.
    """
    from rich.table import Table

    names = tuple(b.strip() for b in backends.split(",") if b.strip())
    rows = api.compare(
        api.CompareOptions(
            export_dir, names, num_images, steps, skip_type, seed, json_out, overwrite, trust_checkpoint, device
        )
    )
    table = Table("step", "t", "backend", f"rel. error vs {names[0]}", "max |diff|", "mean |diff|")
    for r in rows:
        table.add_row(str(r.step), str(r.t), r.backend, f"{r.rel_err:.2e}", f"{r.max_abs:.2e}", f"{r.mean_abs:.2e}")
    Console().print(table)


@app.command("train-digits")
@user_errors
def train_digits_command(
    out: Path = typer.Option(
        Path("digits.safetensors"),
        "--out",
        help="Where to write the EMA weights (*.safetensors); a JSON record (seed, sha256, loss, seconds) is written beside it.",
    ),
    iterations: int = typer.Option(
        4000,
        "--iterations",
        help="Training iterations at batch 128; 4000 (the shipped model) take about 6-7 minutes on one CPU core.",
    ),
    seed: int = typer.Option(
        0,
        "--seed",
        help="Seed of weight init, data order, timesteps and noise: the same seed gives bitwise the same file.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (and its JSON record)."),
) -> None:
    """Train the built-in `digits` model: a DDIM UNet on scikit-learn's 8x8 handwritten digits.

    Reproduces modiff_trt/assets/digits.safetensors (seed 0, 4000 iterations; single-threaded, so bitwise stable).

    Needs scikit-learn: pip install 'modiff-trt\\[digits]'. Use the result anywhere a checkpoint is taken, with --config digits.

    Examples:\n
      modiff-trt train-digits --out my-digits.safetensors\n
      modiff-trt train-digits --iterations 200 --seed 1 --out quick.safetensors
    """
    from modiff_trt.training.digits import train_digits

    at_least("--iterations", iterations, 1)
    at_least("--seed", seed, 0)
    writable_file(out, "--out", overwrite=overwrite)
    writable_file(out.with_suffix(".json"), "--out's record", overwrite=overwrite)
    path = train_digits(out, iterations=iterations, seed=seed)
    console.print(f"weights: {path}  record: {path.with_suffix('.json')}")


@app.command("calibrate")
@user_errors
def calibrate_command(
    config: str = typer.Option(
        ...,
        "--config",
        "-c",
        help="Model config: a YAML (official ddim or latent-diffusion layout), a built-in name, or a diffusers UNet/pipeline folder.",
    ),
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        help="Float UNet checkpoint to calibrate. The file is tied to its sha256: sample with the same one.",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Calibration file to write (.safetensors); pass it to sample/export with --calibration.",
    ),
    from_qdiffusion: Path | None = typer.Option(
        None,
        "--from-qdiffusion",
        help="Import a released Q-Diffusion checkpoint (e.g. cifar_w4a8_ckpt.pth) instead of --checkpoint: its AdaRound integer weights, plus its raw activation scales (--no-modulate) or freshly calibrated residual scales (--modulate). Give the bits from the file name.",
    ),
    steps: int | None = typer.Option(
        None, "--steps", help="Sampling steps to calibrate on (default: 100 for ddim, the paper setting for LDM/SD)."
    ),
    skip_type: SkipType | None = SKIP_TYPE,
    eta: float | None = typer.Option(None, "--eta", help="DDIM eta (default: 0; LSUN-Bedrooms: 1)."),
    cali_st: int = typer.Option(
        20, "--cali-st", help="How many evenly spaced sampling steps to measure (Q-Diffusion CIFAR-10: 20 of 100)."
    ),
    cali_n: int = typer.Option(
        256, "--cali-n", help="How many full-precision trajectories to sample. Memory does not grow with it; time does."
    ),
    batch_size: int = typer.Option(
        32, "--batch-size", help="Trajectories per batch: sets peak memory (CIFAR-10: about 15 MB per sample)."
    ),
    weight_bits: int | None = WEIGHT_BITS,
    first_last_bits: str | None = FIRST_LAST_BITS,
    act_bits: int | None = ACT_BITS,
    act_format: ActFormat | None = ACT_FORMAT,
    method: Method = typer.Option(
        Method.minmax,
        "--method",
        help="Scale search: minmax (absmax, safe at 8 bits), mse (Q-Diffusion: 80 shrinking ranges, |x-Q(x)|^2.4; also searches weight scales; best at 4 bits), percentile (99.99th of |x|).",
    ),
    modulate: bool = typer.Option(
        True,
        "--modulate/--no-modulate",
        help="MoDiff: measure step-to-step residuals of each layer input. --no-modulate: raw inputs, for plain Q-Diffusion.",
    ),
    first_step: FirstStep = typer.Option(
        FirstStep.fp,
        "--first-step",
        help="Intended warm-up. MoDiff files always hold warm-up scales, so either works at sampling time.",
    ),
    seed: int = SEED,
    split: bool = typer.Option(
        False, "--split/--no-split", help="Quantize skip-concat channel groups separately (Q-Diffusion)."
    ),
    trust_checkpoint: bool = TRUST,
    random_weights: bool = RANDOM_WEIGHTS,
    ema: bool = EMA,
    sampler: LatentSampler | None = SAMPLER,
    scheduler: Scheduler | None = SCHEDULER,
    guidance_scale: float | None = GUIDANCE,
    prompt: str | None = PROMPT,
    from_file: Path | None = FROM_FILE,
    text_encoder: Path | None = TEXT_ENCODER,
    random_context: bool = RANDOM_CONTEXT,
    step_groups: str = typer.Option(
        "1",
        "--step-groups",
        help="MoDiff residual scales per G contiguous groups of sampling steps (4-bit activations gain most; the schedule is pinned: sample with the same --steps/--skip-type). 'auto' picks G from the measured scale spread.",
    ),
    weight_method: WeightMethod | None = typer.Option(
        None,
        "--weight-method",
        help="Integer weights: minmax or mse (nearest rounding on absmax / MSE-searched per-channel scales), or adaround (rounding learned block by block on the calibration trajectories, Q-Diffusion's BRECQ + AdaRound; takes minutes; meant for 4-bit weights). Default: mse with --method mse, else minmax.",
    ),
    recon_iters: int = typer.Option(
        3000,
        "--recon-iters",
        help="adaround: optimisation steps per block (1000: a third of the time, 2 to 5 dB worse on digits).",
    ),
    recon_lr: float = typer.Option(1e-3, "--recon-lr", help="adaround: Adam learning rate of the rounding variables."),
    recon_samples: int = typer.Option(
        1024,
        "--recon-samples",
        help="adaround: UNet inputs (x_t, t) kept from the calibration trajectories, evenly over the --cali-st steps.",
    ),
    recon_batch_size: int = typer.Option(32, "--recon-batch-size", help="adaround: samples per optimisation step."),
    recon_beta: str = typer.Option(
        "20,2",
        "--recon-beta",
        help="adaround: START,END of the rounding regulariser's exponent, annealed linearly after the warm-up.",
    ),
    recon_warmup: float = typer.Option(
        0.2, "--recon-warmup", help="adaround: fraction of the iterations without the rounding regulariser."
    ),
    device: str = typer.Option(
        AUTO,
        "--device",
        help=f"Where trajectories and reconstruction run: {HELP}. --from-qdiffusion imports on the CPU.",
    ),
) -> None:
    """Measure static activation scales (what TensorRT needs) on full-precision sampler trajectories.

    MoDiff quantizes the residual between steps, so by default the scales are measured on
    residuals, not raw activations. Calibrate with the schedule you will sample with.
    Runs in one process (do not start it with torchrun; only `sample` is data-parallel).
    Details: docs/calibration.md.

    Examples:\n
      modiff-trt calibrate -c ddim-cifar10 --checkpoint model-790000.ckpt -o cifar-a8.safetensors\n
      modiff-trt calibrate -c ddim-cifar10 --checkpoint model-790000.ckpt --act-bits 4 --method mse -o a4.safetensors\n
      modiff-trt calibrate -c ddim-cifar10 --from-qdiffusion cifar_w4a8_ckpt.pth --weight-bits 4 --act-bits 8 --no-modulate -o qd.safetensors\n
      modiff-trt calibrate -c digits --weight-bits 4 --act-bits 8 --weight-method adaround -o w4a8.safetensors
    """
    result = api.calibrate(
        api.CalibrateOptions(
            out=out,
            model=api.ModelOptions(config, checkpoint, trust_checkpoint, random_weights, ema),
            from_qdiffusion=from_qdiffusion,
            quant=api.QuantOptions(
                weight_bits, act_bits, act_format, modulate, first_step, split, first_last_bits=first_last_bits
            ),
            sampling=api.SamplerOptions(sampler, steps, skip_type, eta, guidance_scale, scheduler),
            prompts=api.PromptOptions(prompt, from_file, text_encoder, random_context),
            method=method,
            cali_st=cali_st,
            cali_n=cali_n,
            batch_size=batch_size,
            seed=seed,
            step_groups=step_groups,
            weight_method=weight_method,
            reconstruction={
                "iterations": recon_iters,
                "learning_rate": recon_lr,
                "samples": recon_samples,
                "batch_size": recon_batch_size,
                **_beta_range(recon_beta),
                "warmup": recon_warmup,
                "seed": seed,
            },
            device=device,
        )
    )
    report = result.meta.get("report") or {}
    if result.step_groups is not None:
        g = result.step_groups
        console.print(
            f"{g.count} step groups (steps {', '.join(f'{b}-{e - 1}' for b, e in zip(g.bounds, g.bounds[1:], strict=False))}) "
            f"for the {g.steps}-step {g.skip_type} schedule: sample with exactly that schedule"
        )
    recon = result.meta.get("reconstruction")
    if recon:
        units = recon["units"]
        console.print(
            f"AdaRound weights: {len(units)} units in {recon['seconds']:.0f} s, summed block loss "
            f"{sum(u['nearest_loss'] for u in units):.4g} (nearest) -> {sum(u['loss'] for u in units):.4g}"
        )
    console.print(
        f"wrote {len(result.layers)} layers of {result.kind} scales to [bold]{out}[/]"
        + (f" in {report['seconds']:.1f} s, peak memory {report['peak_rss_mb']:.0f} MB" if report else "")
    )


def _beta_range(text: str) -> dict[str, float]:
    """--recon-beta START,END -> ReconstructionOptions' beta_start/beta_end."""
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"--recon-beta {text!r}: give START,END, e.g. 20,2") from None
    return {"beta_start": start, "beta_end": end}


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where grid.png, report.json and the exports go."),
    num_images: int = typer.Option(
        512, "--num-images", "-n", help="Samples per configuration (digits FID needs >= 512)."
    ),
    steps: int = typer.Option(50, "--steps", help="DDIM steps (quad)."),
    seed: int = SEED,
    overwrite: bool = OVERWRITE,
    backend: CpuBackend | None = typer.Option(
        None, "--backend", "-b", help="openvino or ort (default: the fastest installed)."
    ),
    nvfp4: bool = typer.Option(
        False,
        "--nvfp4",
        help="Add the MoDiff W8 + NVFP4 row (sampled on ONNX Runtime's "
        "emulation of TensorRT's NVFP4; about doubles the run time).",
    ),
) -> None:
    """Full precision vs plain Q-Diffusion vs MoDiff on the embedded digits model, on the CPU.

    Calibrates, exports and samples each configuration from the same noise with the fastest CPU
    backend installed (OpenVINO, else ONNX Runtime), then writes OUT/grid.png (one row per
    configuration), OUT/report.json and prints the table with the machine and backend.
    """
    from rich.table import Table

    from modiff_trt.demo import DEMO_ROWS, NVFP4_ROWS, run_demo
    from modiff_trt.metrics import FID_MIN_IMAGES

    sample_counts(num_images, None, seed)
    at_least("--steps", steps, 1)
    report = run_demo(
        out,
        num_images=num_images,
        steps=steps,
        seed=seed,
        overwrite=overwrite,
        rows={**DEMO_ROWS, **NVFP4_ROWS} if nvfp4 else DEMO_ROWS,
        backend=None if backend is None else str(backend),
    )
    fid_header = "digits FID" if num_images >= FID_MIN_IMAGES else f"digits FID (unreliable: < {FID_MIN_IMAGES} images)"
    table = Table(
        "config",
        "PSNR vs fp32 (dB)",
        fid_header,
        "confidence",
        "sampling (s)",
        "backend",
        title=f"modiff-trt demo ({report.backend}, CPU)",
    )
    for r in report.rows:
        table.add_row(
            r.name,
            "-" if r.psnr_db is None else f"{r.psnr_db:.2f}",
            f"{r.digits_fid:.2f}",
            f"{r.confidence:.3f}",
            f"{r.seconds:.1f}",
            r.backend,
        )
    Console().print(table)
    console.print(f"{report.seconds:.0f} s in all (calibration, export, sampling, scoring) on {report.machine}")
    console.print(f"wrote [bold]{out / 'grid.png'}[/] and [bold]{out / 'report.json'}[/]")
