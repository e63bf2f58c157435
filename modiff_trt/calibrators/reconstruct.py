"""Weight reconstruction: Q-Diffusion's BRECQ blocks with AdaRound rounding, on a float UNet.

For every reconstruction unit (`blocks.py`) in call order:

1. its inputs are collected from the *partly quantized* model (the units before it already carry
   their learned integer weights, the rest is float), and its targets from the float model, on
   the calibration inputs (`recon_data.py`: x_t and t across the float trajectories);
2. each of its layers gets an `AdaRoundWeight` on the MSE-searched per-channel grid (Q-Diffusion
   initialises its weight grid the same way), and Adam learns the rounding variables on
   `||block(x; W_soft) - block_fp(x_fp)||^2` (summed over channels, averaged over the rest, as
   BRECQ) plus `reg_weight` times AdaRound's rounding regulariser, annealed by `BetaSchedule`;
3. the hard rounding is installed in the working model, so the next unit sees it.

Activations stay in float during reconstruction, as in Q-Diffusion's weight stage: with float
activations a MoDiff layer computes exactly the plain layer (o_hat = f(x, Wq) + b by linearity),
so one set of weights serves both modes. Only one unit's inputs and targets exist at a time,
spilled to disk above `memory_mb`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from modiff_trt.calibrators.adaround import AdaRoundWeight, BetaSchedule
from modiff_trt.calibrators.blocks import Block, find_blocks
from modiff_trt.calibrators.collect import input_channels
from modiff_trt.calibrators.recon_data import CalibrationInputs, SampleStore
from modiff_trt.calibrators.search import mse_weight
from modiff_trt.errors import OptionError
from modiff_trt.quant.layer import channel_groups
from modiff_trt.quant.model import quantizable_layers
from modiff_trt.sampling.run import model_device, progress_bar

log = logging.getLogger(__name__)
COLLECT_BATCH = 64  # samples per forward pass while collecting a unit's inputs and targets
REPORT_EVERY = 50  # iterations between loss updates of the progress bar


@dataclass(frozen=True)
class ReconstructionOptions:
    """How AdaRound weights are learned (`calibrate --weight-method adaround`).

    `iterations` Adam steps per unit on batches of `batch_size` of `samples` calibration inputs
    (drawn evenly over the calibration steps of the float trajectories), learning rate
    `learning_rate`; the rounding regulariser weighs `reg_weight` and its exponent falls from
    `beta_start` to `beta_end` after the first `warmup` fraction of the iterations. A unit's
    inputs and targets above `memory_mb` go to disk. 3000 iterations: on the digits model they
    gave 2.2 to 4.5 dB more PSNR than 1000 over two reconstruction seeds, in about 9 minutes on two
    shared CPU cores (BENCHMARKS.md, "the levers, measured"); Q-Diffusion ran 20,000 on GPUs.
    """

    iterations: int = 3000
    learning_rate: float = 1e-3
    batch_size: int = 32
    samples: int = 1024
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    reg_weight: float = 0.01
    memory_mb: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        for option, value in (
            ("--recon-iters", self.iterations),
            ("--recon-batch-size", self.batch_size),
            ("--recon-samples", self.samples),
            ("--recon-memory-mb", self.memory_mb),
        ):
            if value < 1:
                raise OptionError(f"{option} must be >= 1, got {value}")
        if not self.learning_rate > 0:
            raise OptionError(f"--recon-lr must be > 0, got {self.learning_rate}")
        if not self.beta_start >= self.beta_end > 0:
            raise OptionError(
                f"--recon-beta {self.beta_start},{self.beta_end}: give START,END with START >= END > 0 (AdaRound: 20,2)"
            )
        if not 0 <= self.warmup < 1:
            raise OptionError(f"--recon-warmup must lie in [0, 1), got {self.warmup}")
        if self.reg_weight < 0:
            raise OptionError(f"--recon-reg must be >= 0, got {self.reg_weight}")

    @property
    def schedule(self) -> BetaSchedule:
        return BetaSchedule(self.beta_start, self.beta_end, self.warmup)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UnitReport:
    """What reconstruction did to one unit: block loss with nearest rounding and with AdaRound."""

    name: str
    layers: int
    weights: int
    nearest_loss: float
    loss: float
    flipped: float  # fraction of weights rounded the other way than nearest
    seconds: float
    collect_seconds: float  # of `seconds`: collecting the unit's inputs and targets


@dataclass
class Reconstruction:
    """Integer weights (codes, scale [O, groups]) per layer and the per-unit reports."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    samples: int
    units: list[UnitReport] = field(default_factory=list)
    seconds: float = 0.0

    def meta(self, options: ReconstructionOptions) -> dict[str, Any]:
        """The file's `reconstruction` metadata: options, samples used, time and per-unit losses."""
        return {
            "options": options.to_dict(),
            "samples": self.samples,
            "seconds": round(self.seconds, 2),
            "units": [
                {**asdict(u), "nearest_loss": float(f"{u.nearest_loss:.6g}"), "loss": float(f"{u.loss:.6g}")}
                for u in self.units
            ],
        }


class _Captured(Exception):
    """Stops a forward pass once the unit's inputs or output are read (the rest is not needed)."""

    def __init__(self, value: Any):
        super().__init__()
        self.value = value


def block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels, averaged over the rest."""
    return (out - target).pow(2).sum(1).mean()


def layer_grid(module: nn.Module, bits: int, split: int) -> tuple[torch.Tensor, list[slice]]:
    """The MSE-searched per-channel scales [O, groups] and the channel groups of one layer."""
    weight = module.weight.detach().float().cpu()
    groups = channel_groups(input_channels(module), split)
    return torch.stack([mse_weight(weight[:, g], bits)[1] for g in groups], dim=1), groups


def _capture(model: nn.Module, unit: str, inputs: CalibrationInputs, index: slice, output: bool) -> Any:
    """The unit's (args, kwargs) or output in `model` for the samples `index`."""
    module = model.get_submodule(unit)

    def read_inputs(_: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        raise _Captured((args, kwargs))

    def read_output(_: nn.Module, __: tuple, out: Any) -> None:
        raise _Captured(out[0] if isinstance(out, tuple) else out)

    handle = (
        module.register_forward_hook(read_output)
        if output
        else module.register_forward_pre_hook(read_inputs, with_kwargs=True)
    )
    args, kwargs = inputs.batch(index, model_device(model))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except _Captured as captured:
        return captured.value
    finally:
        handle.remove()
    raise RuntimeError(f"{unit} was not called by the forward pass")  # find_blocks keeps only called units


class UnitData:
    """One unit's inputs (from the partly quantized model) and float targets, for every sample."""

    def __init__(self, work: nn.Module, fp: nn.Module, unit: str, inputs: CalibrationInputs, budget: int):
        n = len(inputs)
        self.n, self.keys = n, []
        self.ins, self.outs = SampleStore(n, budget), SampleStore(n, budget)
        for start in range(0, n, COLLECT_BATCH):
            index = slice(start, min(start + COLLECT_BATCH, n))
            args, kwargs = _capture(work, unit, inputs, index, output=False)
            self.n_args, self.keys = len(args), sorted(kwargs)
            self.ins.write(start, [*args, *(kwargs[k] for k in self.keys)])
            self.outs.write(start, [_capture(fp, unit, inputs, index, output=True)])

    def batch(self, index: torch.Tensor | slice, device: torch.device) -> tuple[tuple, dict[str, Any], torch.Tensor]:
        values = self.ins.read(index, device)
        kwargs = dict(zip(self.keys, values[self.n_args :], strict=True))
        return tuple(values[: self.n_args]), kwargs, self.outs.read(index, device)[0]

    def close(self) -> None:
        self.ins.close()
        self.outs.close()


def _run(module: nn.Module, block: Block, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
    params = {(f"{block.relative(n)}." if block.relative(n) else "") + "weight": w for n, w in weights.items()}
    out = functional_call(module, params, args, kwargs)
    return out[0] if isinstance(out, tuple) else out


def _mean_loss(module: nn.Module, block: Block, weights: dict[str, torch.Tensor], data: UnitData, device) -> float:
    """The block loss over every calibration sample (no gradient)."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, data.n, COLLECT_BATCH):
            index = slice(start, min(start + COLLECT_BATCH, data.n))
            args, kwargs, target = data.batch(index, device)
            total += float(block_loss(_run(module, block, weights, args, kwargs), target)) * (index.stop - start)
    return total / data.n


def reconstruct_unit(
    work: nn.Module,
    fp: nn.Module,
    block: Block,
    inputs: CalibrationInputs,
    bits: Mapping[str, int],
    splits: dict[str, int],
    options: ReconstructionOptions,
    bar: Any = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], UnitReport]:
    """Learn the rounding of one unit's layers; install the hard rounding in `work`."""
    started = time.perf_counter()
    device = model_device(work)
    module = work.get_submodule(block.name)
    data = UnitData(work, fp, block.name, inputs, options.memory_mb * 2**20)
    collected = time.perf_counter() - started
    rounders, scales = {}, {}
    for name in block.layers:
        layer = work.get_submodule(name)
        scales[name], groups = layer_grid(layer, bits[name], splits.get(name, 0))
        rounders[name] = AdaRoundWeight(layer.weight, scales[name].to(device), groups, bits[name]).to(device)
    nearest = {n: r.dequantize(r.nearest_codes()) for n, r in rounders.items()}
    nearest_loss = _mean_loss(module, block, nearest, data, device)
    optimizer = torch.optim.Adam([r.v for r in rounders.values()], lr=options.learning_rate)
    generator = torch.Generator().manual_seed(options.seed)
    task = None if bar is None else bar.add_task(f"{block.name}", total=options.iterations)
    schedule = options.schedule
    for it in range(options.iterations):
        index = torch.randint(data.n, (min(options.batch_size, data.n),), generator=generator)
        args, kwargs, target = data.batch(index, device)
        with torch.enable_grad():
            soft = {n: r.soft_weight() for n, r in rounders.items()}
            rec = block_loss(_run(module, block, soft, args, kwargs), target)
            beta = schedule.beta(it, options.iterations)
            loss = rec
            if beta is not None and options.reg_weight > 0:
                loss = rec + options.reg_weight * sum(r.regularizer(beta) for r in rounders.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        if task is not None and (it % REPORT_EVERY == 0 or it == options.iterations - 1):
            bar.update(task, completed=it + 1, description=f"{block.name} loss {float(rec.detach()):.4g}")
    hard = {n: r.dequantize(r.codes()) for n, r in rounders.items()}
    loss = _mean_loss(module, block, hard, data, device)
    data.close()
    for name, w in hard.items():
        work.get_submodule(name).weight.data.copy_(w.to(work.get_submodule(name).weight.dtype))
    n_weights = sum(r.v.numel() for r in rounders.values())
    flipped = sum(r.flipped() * r.v.numel() for r in rounders.values()) / n_weights
    report = UnitReport(
        block.name, len(block.layers), n_weights, nearest_loss, loss, flipped, time.perf_counter() - started, collected
    )
    log.info(
        "reconstructed %s (%d layer(s), %d weights): block loss %.4g nearest -> %.4g adaround, %.1f%% flipped, %.1f s",
        block.name,
        report.layers,
        n_weights,
        nearest_loss,
        loss,
        100 * flipped,
        report.seconds,
    )
    return {n: (r.codes().cpu(), scales[n]) for n, r in rounders.items()}, report


def reconstruct_weights(
    model: nn.Module,
    inputs: CalibrationInputs,
    bits: Mapping[str, int],
    splits: dict[str, int],
    options: ReconstructionOptions = ReconstructionOptions(),
    progress: bool = True,
    only: Collection[str] | None = None,
) -> Reconstruction:
    """AdaRound integer weights of every quantizable layer of the float `model` (left unchanged).

    `bits` are every layer's weight bits (`quant.model.layer_weight_bits`: the end layers may
    keep 8 where the rest have 4); `splits` are the skip-concat split points (`--split`): such a layer's two channel groups get
    their own scales, as Q-Diffusion's split quantizers do. `only` (unit names, for measuring a
    few units of a large model) reconstructs just those; every other layer, and any layer the
    forward pass never reaches, is rounded to nearest on its MSE grid.
    """
    started = time.perf_counter()
    model.eval()
    work = copy.deepcopy(model).requires_grad_(False)
    device = model_device(model)
    first_args, first_kwargs = inputs.batch(slice(0, 1), device)
    blocks = find_blocks(work, lambda m: m(*first_args, **first_kwargs))
    if only is not None:
        blocks = [b for b in blocks if b.name in set(only)]
    result = Reconstruction({}, len(inputs))
    with progress_bar(disable=not progress) as bar:
        for block in blocks:
            weights, report = reconstruct_unit(work, model, block, inputs, bits, splits, options, bar)
            result.weights.update(weights)
            result.units.append(report)
    for name in quantizable_layers(model):
        if name not in result.weights:
            layer = model.get_submodule(name)
            scale, groups = layer_grid(layer, bits[name], splits.get(name, 0))
            rounder = AdaRoundWeight(layer.weight.detach().cpu(), scale, groups, bits[name])
            result.weights[name] = (rounder.nearest_codes(), scale)
    result.seconds = time.perf_counter() - started
    total_nearest = sum(u.nearest_loss for u in result.units)
    total = sum(u.loss for u in result.units)
    log.info(
        "weight reconstruction: %d unit(s) in %.1f s; summed block loss %.4g nearest -> %.4g adaround",
        len(result.units),
        result.seconds,
        total_nearest,
        total,
    )
    return result
