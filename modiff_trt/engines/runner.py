"""`StatefulRunner`: what every runtime backend of an export directory shares.

A backend runs the warm-up graph on the first call after `reset_state()` and the step graph
on every later call, feeding each step the state the previous call wrote. Which graph runs and
which of the two state sets it reads and writes is decided in ONE place, `Arrangements`; the
backends only execute what they are told. The split follows Polygraphy's `BaseRunner`
(`infer` checks, `infer_impl` runs): `StatefulRunner.__call__` validates `x`/`t`/`context`
against the export, pads a short last batch on fixed-batch exports, picks the arrangement,
calls the backend's `_run_impl`, counts the call and returns float32.

Why two state sets (ping-pong): the step graph reads the old state and writes the new one, and
no runtime guarantees that a kernel reading `a_hat_in.L` runs before another writes
`a_hat_out.L` into the same memory. So the warm-up writes set 0, step k reads set (k-1) % 2
and writes set k % 2, and nothing is copied between steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from modiff_trt.engines.state_buffers import torch_dtype
from modiff_trt.engines.step_scales import StepScaleInput
from modiff_trt.errors import ModiffError
from modiff_trt.export.manifest import Manifest, TensorSpec
from modiff_trt.export.naming import CONTEXT, X


@dataclass(frozen=True)
class Arrangement:
    """One call's plan: the graph it runs and the state sets it reads and writes (None: no state)."""

    graph: str  # manifest graph key: "warmup", "step" or "unet"
    read: int | None
    write: int | None

    @property
    def name(self) -> str:
        """`warmup`, `step_0to1`, `step_1to0` or `unet`: one execution context / CUDA graph each."""
        return self.graph if self.graph != "step" else f"step_{self.read}to{self.write}"


WARMUP = Arrangement("warmup", None, 0)
STEP_0TO1 = Arrangement("step", 0, 1)
STEP_1TO0 = Arrangement("step", 1, 0)
PLAIN = Arrangement("unet", None, None)


class Arrangements:
    """The one place that decides warm-up vs step and the ping-pong sets."""

    def __init__(self, modulated: bool) -> None:
        self.modulated = modulated

    @property
    def all(self) -> tuple[Arrangement, ...]:
        """Every arrangement a trajectory can use (a backend may prepare one context for each)."""
        return (WARMUP, STEP_0TO1, STEP_1TO0) if self.modulated else (PLAIN,)

    def for_call(self, call: int) -> Arrangement:
        """The arrangement of call number `call` since the last reset (0 is the warm-up)."""
        if call < 0:
            raise ValueError(f"call index must be >= 0, got {call}")
        if not self.modulated:
            return PLAIN
        if call == 0:
            return WARMUP
        return STEP_0TO1 if call % 2 == 1 else STEP_1TO0


@dataclass(frozen=True)
class InputContract:
    """What the export's graphs accept: per-sample shapes of `x` and `context`, and a fixed batch."""

    sample_shape: tuple[int, ...]
    context_shape: tuple[int, ...] | None
    fixed_batch: int | None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> InputContract:
        """Read from the graphs' own input specs (every graph of an export shares x, t, context)."""
        inputs = {spec.name: spec for spec in next(iter(manifest.graphs.values())).inputs}
        if X not in inputs:
            raise ModiffError("the export's graphs have no `x` input: re-run `modiff-trt export`")
        return cls(
            _per_sample(inputs[X]), _per_sample(inputs[CONTEXT]) if CONTEXT in inputs else None, manifest.batch_size
        )

    def check(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, source: str) -> None:
        """One clear error for the first input that does not fit `source`'s graphs."""
        shape = ", ".join(map(str, self.sample_shape))
        if x.dim() != len(self.sample_shape) + 1 or tuple(x.shape[1:]) != self.sample_shape or x.shape[0] < 1:
            raise ModiffError(f"input x has shape {tuple(x.shape)}, but {source} was exported for [batch, {shape}]")
        batch = x.shape[0]
        if self.fixed_batch is not None and batch > self.fixed_batch:
            raise ModiffError(
                f"batch size {batch} exceeds {source}, exported for batch {self.fixed_batch}: "
                f"use --batch-size {self.fixed_batch} or re-export with --dynamic-batch"
            )
        if tuple(t.shape) != (batch,):
            raise ModiffError(f"t must have shape [{batch}], got {tuple(t.shape)}")
        if self.context_shape is None and context is not None:
            raise ModiffError(f"{source} takes no text context, but a context was given: drop it (or re-export)")
        if self.context_shape is not None:
            want = (batch, *self.context_shape)
            if context is None:
                raise ModiffError(f"{source} was exported with a text context {list(want)}: pass `context`")
            if tuple(context.shape) != want:
                raise ModiffError(f"context has shape {tuple(context.shape)}, but {source} needs {list(want)}")
        if not bool(torch.isfinite(x).all()):
            raise ModiffError("input x contains NaN or Inf: the sampler diverged or the noise is corrupt")


def _per_sample(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(int(d) for d in spec.shape[1:])


def pad_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` grown to `size` rows along dim 0 by repeating its last row.

    Padding a short last batch changes nothing for the real rows: every op of the graphs is per
    sample (static scales, GroupNorm, attention) and each sample owns its own state rows.
    """
    return torch.cat([tensor, tensor[-1:].expand(size - tensor.shape[0], *tensor.shape[1:])])


class StatefulRunner(ABC):
    """Base of the export-directory backends: `eps = runner(x, t, context)`, state kept inside.

    Subclasses implement `_run_impl` (run one arrangement, return eps at the padded batch) and,
    to let callers read the state, `_state_set`.
    """

    name: str = "runner"

    def __init__(self, export_dir: str | Path, manifest: Manifest, device: torch.device | str) -> None:
        self.export_dir = Path(export_dir)
        self.manifest = manifest
        self.device = torch.device(device)
        self.arrangements = Arrangements(manifest.modulated)
        self.inputs = InputContract.from_manifest(manifest)
        self.calls = 0
        self.batch: int | None = None  # the (padded) batch of the current trajectory
        self.source = str(self.export_dir)
        # Step groups: the `step_scale_ratio` buffer the step graph reads, refilled per call below.
        self.step_scales = StepScaleInput.from_manifest(
            manifest, self.device, torch_dtype(manifest.export.float_dtype), self.source
        )
        self.step_groups = None if self.step_scales is None else self.step_scales.groups  # read by the samplers

    def reset_state(self) -> None:
        """New batch: the next call runs the warm-up graph (the old state is simply overwritten)."""
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise for `x` at timesteps `t` (shape [B]); float32 on `self.device`."""
        self.inputs.check(x, t, context, str(self.export_dir))
        batch, fixed = x.shape[0], self.inputs.fixed_batch
        if fixed is not None and batch < fixed:
            x, t = pad_batch(x, fixed), pad_batch(t, fixed)
            context = None if context is None else pad_batch(context, fixed)
        arrangement = self.arrangements.for_call(self.calls)
        if arrangement.read is not None and x.shape[0] != self.batch:
            raise ModiffError(
                f"batch size changed from {self.batch} to {x.shape[0]} inside a trajectory: the state belongs to "
                "the first batch; call reset_state() before sampling a new batch"
            )
        self.batch = x.shape[0]
        if self.step_scales is not None and arrangement.graph == "step":
            self.step_scales.fill(self.calls)  # on the caller's stream, like the other inputs
        eps = self._run_impl(arrangement, x, t, context)
        self.calls += 1
        return eps[:batch].float()

    def state(self) -> Mapping[str, torch.Tensor]:
        """The state the next step will read, keyed by step-graph input name (`a_hat_in.L`).

        Views into the backend's buffers (at the padded batch): copy what must outlive the next call.
        """
        read = self.arrangements.for_call(self.calls).read
        if read is None:
            raise ModiffError(
                "no MoDiff state to read: run the warm-up call first (plain exports have no state at all)"
            )
        return self._state_set(read)

    @abstractmethod
    def _run_impl(
        self, arrangement: Arrangement, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        """Run `arrangement.graph` on validated, padded inputs: read state set `arrangement.read`,
        write set `arrangement.write`; return eps for the whole (padded) batch, in a tensor the
        caller may keep (never a view of a buffer the next call overwrites)."""

    def _state_set(self, index: int) -> Mapping[str, torch.Tensor]:
        """State set `index` keyed by step-graph input name; backends that expose their state override it."""
        raise ModiffError(f"the {self.name} backend does not expose its MoDiff state")
