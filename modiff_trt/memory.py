"""Peak-memory estimates, checked against what the machine has before a long job starts.

Why: a full-size Stable Diffusion job that does not fit is killed by the out-of-memory killer
halfway (issue 21); one line before the work ("needs about X GB, Y GB available, do Z") is
what a user can act on. The sizes come from a forward pass on the meta device (no memory, no
weights, about a second for SD): the parameter count, every quantizable layer's input and output
(what MoDiff keeps between steps) and the largest set of intermediate tensors alive at once.

Public API (the calibration check uses it; an exporter can reuse the same pieces):

- `footprint(model_cfg, batch)`: the sizes above at one UNet batch;
- `available_bytes(device)`: MemAvailable from /proc/meminfo, or free CUDA memory;
- `calibration_estimate(...)`: the peak of `calibrate`, part by part;
- `check_fits(estimates, advice)`: raises `NotEnoughMemoryError` with the one line;
- `LiveBytes`: a dispatch mode that measures the peak bytes of tensors alive at once.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from modiff_trt.errors import ModiffError
from modiff_trt.models.config import ModelConfig
from modiff_trt.quant.layer import QUANTIZABLE

log = logging.getLogger(__name__)
GB = 10**9
#: The Python process itself: interpreter, torch's libraries and the CLI's imports (a digits
#: calibration peaks at 0.39 GB RSS on the CPU).
RUNTIME_BYTES = int(0.45 * GB)
#: An export's tracer graph, ONNX protobufs and checks beyond the tensors: three SD v1 exports
#: peaked 0.17 to 0.53 GB above the other parts of `export_estimate` (6.00 to 6.36 GB RSS).
GRAPH_BUILDING_BYTES = int(0.6 * GB)
#: What allocators keep beyond the live tensors: freed blocks not yet returned, fragmentation,
#: rounding. CPU: peak RSS less the process was 1.12x to 1.14x the tensors in four SD v1
#: calibrations (6.74 to 6.88 GB) and 1.15x for CIFAR-10 at batch 32 (1.93 GB); 1.15 keeps the
#: estimate at or above them. CUDA: the caching allocator, not measured here.
OVERHEAD = {"cpu": 1.15, "cuda": 1.2}


class NotEnoughMemoryError(ModiffError):
    """The job's estimated peak is more than the device has available: refused before it starts."""


@dataclass(frozen=True)
class Footprint:
    """Sizes of one UNet forward at `batch` samples, in elements (bytes for `activation_peak`).

    `layer_inputs`/`layer_outputs` sum every quantizable layer's input (MoDiff's a_hat, what the
    calibration collector holds between steps) and output (o_hat); `activation_peak` is the most
    bytes of intermediate fp32 tensors alive at once during the forward (attention matrices
    included), the weights excluded.
    """

    batch: int
    params: int
    layers: int
    layer_inputs: int
    layer_outputs: int
    activation_peak: int


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensors that ops create and are still referenced, and their peak.

    Views and in-place results share storage already counted; a tensor's bytes are released
    when torch frees it (a weakref finalizer), so the peak is that of the real forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {id(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in given and not t._is_view():
                nbytes = t.numel() * t.element_size()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, nbytes)
        return out


def footprint(model_cfg: ModelConfig, batch: int) -> Footprint:
    """The sizes of `model_cfg`'s UNet at `batch` samples per forward, from a meta-device forward."""
    with torch.device("meta"):
        model = model_cfg.build().eval()
    sums = [0, 0]

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        sums[0] += args[0].numel()
        sums[1] += out.numel()

    layers = [m for m in model.modules() if isinstance(m, QUANTIZABLE)]
    for m in layers:
        m.register_forward_hook(hook)
    x = torch.zeros(batch, *model_cfg.sample_shape, device="meta")
    t = torch.zeros(batch, device="meta")
    context = None if model_cfg.context_shape is None else torch.zeros(batch, *model_cfg.context_shape, device="meta")
    live = LiveBytes()
    with torch.no_grad(), live:
        model(x, t) if context is None else model(x, t, context)
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return Footprint(batch, params, len(layers), sums[0], sums[1], live.peak)


@dataclass(frozen=True)
class Estimate:
    """A job's estimated peak memory on one device, part by part (bytes), and what it is of."""

    what: str
    device: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def breakdown(self) -> str:
        """'weights fp32 3.4 GB + ...': the parts, largest first."""
        return " + ".join(
            f"{name} {size / GB:.1f} GB" for name, size in sorted(self.parts.items(), key=lambda p: -p[1])
        )


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Memory a new allocation can get now: MemAvailable (Linux) for the CPU, free memory of a CUDA device.

    Without /proc/meminfo (not Linux) the CPU answer is the total physical memory via sysconf.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibration_estimate(
    model_cfg: ModelConfig,
    unet_batch: int,
    modulate: bool,
    device: str | torch.device = "cpu",
    *,
    stats_per_layer: int = 0,
    checkpoint_bytes: int = 0,
    reconstruct: bool = False,
) -> list[Estimate]:
    """The peak of `calibrate` on each memory it uses: the host, and the GPU when `device` is CUDA.

    The float UNet runs in fp32 at `unet_batch` samples per call (twice the trajectories per batch
    under guidance). MoDiff calibration holds every layer's previous-step input of the batch (for
    the residuals); the statistics keep `stats_per_layer` bytes of subsamples per layer; a checkpoint is read whole
    (`checkpoint_bytes`, its file size) while the model is built, an upper bound for loaders that
    move its tensors into the model; AdaRound reconstruction (`reconstruct`) keeps a quantized
    copy of the weights. On the CPU the larger of loading and sampling is the peak.
    """
    size = footprint(model_cfg, unet_batch)
    weights = 4 * size.params
    run = {"weights fp32": weights, "forward activations": size.activation_peak}
    if modulate:
        run["previous-step layer inputs"] = 4 * size.layer_inputs
    if reconstruct:
        run["quantized weight copy"] = weights
    load = {"weights fp32": weights, "checkpoint read": checkpoint_bytes}
    host = {"runtime": RUNTIME_BYTES, "statistics": stats_per_layer * size.layers}
    device = torch.device(device)
    if device.type == "cuda":
        return [
            Estimate("calibration", "cpu", {**host, **_with_overhead(load, "cpu")}),
            Estimate("calibration", str(device), _with_overhead(run, "cuda")),
        ]
    return [_host_estimate("calibration", host, run, load)]


def export_estimate(
    model_cfg: ModelConfig, integer_weights: bool, checkpoint_bytes: int = 0, stream_bytes: int = 0
) -> list[Estimate]:
    """The peak of `export` on the host.

    The trace computes with the float UNet in fp32 at an example batch of 2 (attention in slices),
    the quantized model keeps its layers' int8 codes beside it (`integer_weights`; counted for
    every parameter, an upper bound), and a checkpoint is read whole while the model is built. The
    graphs' weights are streamed to disk a layer at a time, so `--float`, `--target` and the
    number of graphs do not change the peak. Models whose fp32 weights stay under `stream_bytes`
    keep each graph in memory, with its serialised copy.
    """
    size = footprint(model_cfg, 2)
    weights = 4 * size.params
    run = {"weights fp32": weights, "trace activations": size.activation_peak}
    if integer_weights:
        run["int8 weight codes"] = size.params
    if weights <= stream_bytes:
        run["graph in memory"] = 2 * weights
    load = {"weights fp32": weights, "checkpoint read": checkpoint_bytes}
    return [_host_estimate("export", {"runtime": RUNTIME_BYTES, "graph building": GRAPH_BUILDING_BYTES}, run, load)]


def _host_estimate(what: str, host: dict[str, int], run: dict[str, int], load: dict[str, int]) -> Estimate:
    """A CPU job's peak: `host` plus the larger of loading and running, with allocator overhead."""
    peak = max(run, load, key=lambda parts: sum(parts.values()))
    return Estimate(what, "cpu", {**host, **_with_overhead(peak, "cpu")})


def _with_overhead(parts: dict[str, int], kind: str) -> dict[str, int]:
    """`parts` and what the allocator of `kind` keeps beyond them (`OVERHEAD`), as a part of its own."""
    return {**parts, "allocator overhead": int(sum(parts.values()) * (OVERHEAD[kind] - 1))}


def check_fits(estimates: list[Estimate], advice: str) -> None:
    """Refuse the job (`NotEnoughMemoryError`, one line) when an estimate exceeds its device's available memory.

    `advice` says what to change (a smaller batch, another device). An estimate that fits is
    logged, so the numbers are on record for the run.
    """
    for estimate in estimates:
        available = available_bytes(estimate.device)
        if estimate.total > available:
            raise NotEnoughMemoryError(
                f"{estimate.what} needs about {estimate.total / GB:.1f} GB on {estimate.device} "
                f"({estimate.breakdown()}), {available / GB:.1f} GB available: {advice}"
            )
        log.info(
            "%s on %s: estimated peak %.1f GB (%s); %.1f GB available",
            estimate.what,
            estimate.device,
            estimate.total / GB,
            estimate.breakdown(),
            available / GB,
        )
