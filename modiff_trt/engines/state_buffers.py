"""MoDiff state on the device: every `a_hat`/`o_hat` of a batch carved out of ONE allocation.

Why one allocation: a CIFAR-10 UNet has 226 state tensors per set. Allocating them one by one
costs 452 allocator calls per batch size, scatters them over the caching allocator's blocks and
makes it impossible to zero, snapshot or free the state as a unit. One block with fixed offsets
gives stable addresses (what CUDA graphs need), a single `zero_()`, and a layout that can be
computed and tested on a CPU.

Why two sets: the step graph reads the old state and writes the new one. Writing in place would
need TensorRT to guarantee that no kernel reads `a_hat_in.L` after another kernel wrote
`a_hat_out.L`, which it does not. So step k reads set A and writes set B, step k+1 reads B and
writes A (ping-pong); nothing is copied between steps.

Why 256-byte alignment: TensorRT requires I/O addresses aligned to 256 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modiff_trt.export.manifest import LayerSpec, Manifest
from modiff_trt.export.naming import state_input, state_output

ALIGNMENT = 256
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """Round `nbytes` up to a multiple of `alignment` (a power of two)."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a positive power of two, got {alignment}")
    return (nbytes + alignment - 1) & ~(alignment - 1)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a manifest dtype name ('float32', 'float16', 'bfloat16')."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported state dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def aligned_empty(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device | str, alignment: int = ALIGNMENT
) -> torch.Tensor:
    """An uninitialised contiguous tensor whose first byte sits at a multiple of `alignment`.

    Over-allocates by one alignment and shifts the view: the CUDA caching allocator returns
    512-byte aligned blocks, but CPU allocators may not.
    """
    numel = 1
    for dim in shape:
        numel *= int(dim)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    storage = torch.empty(nbytes + alignment, dtype=torch.uint8, device=device)
    shift = (-storage.data_ptr()) % alignment
    return storage[shift : shift + nbytes].view(dtype).view(tuple(int(d) for d in shape))


@dataclass(frozen=True)
class StateSlot:
    """One state tensor inside a set: its graph names, full shape (batch first) and byte range."""

    input_name: str  # a_hat_in.<layer> (what the step graph reads)
    output_name: str  # a_hat_out.<layer> (what both graphs write)
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the set; a multiple of the layout's alignment
    nbytes: int


@dataclass(frozen=True)
class StateLayout:
    """Where each state tensor lives in one set; both sets share it."""

    slots: tuple[StateSlot, ...]
    dtype: torch.dtype
    batch_size: int
    alignment: int
    set_bytes: int  # bytes of one set, padded so set B starts aligned

    @property
    def total_bytes(self) -> int:
        """Bytes of both sets (without the slack used to align the base pointer)."""
        return 2 * self.set_bytes


def state_layout(
    layers: Sequence[LayerSpec],
    batch_size: int,
    dtype: torch.dtype,
    alignment: int = ALIGNMENT,
) -> StateLayout:
    """Lay out `a_hat` then `o_hat` of every layer (only `o_hat` for constant-input layers), in
    table order, each slot aligned.

    `batch_size` is the batch the engine sees (under classifier-free guidance that is already
    the doubled cond+uncond batch): every state tensor's batch dim follows `x`'s.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    item = torch.empty((), dtype=dtype).element_size()
    slots: list[StateSlot] = []
    offset = 0
    for layer in layers:
        for kind in layer.state_kinds:
            shape = (batch_size, *(int(d) for d in layer.state_shape(kind)))
            numel = 1
            for dim in shape:
                numel *= dim
            nbytes = numel * item
            slots.append(
                StateSlot(state_input(kind, layer.name), state_output(kind, layer.name), shape, offset, nbytes)
            )
            offset = align_up(offset + nbytes, alignment)
    return StateLayout(tuple(slots), dtype, batch_size, alignment, align_up(offset, alignment))


def layout_from_manifest(manifest: Manifest, batch_size: int, alignment: int = ALIGNMENT) -> StateLayout:
    """The state layout of an export directory at `batch_size` (dtype from `export.state_dtype`)."""
    dtype = torch_dtype(manifest.export.state_dtype)
    return state_layout(manifest.layers, batch_size, dtype, alignment)


class StateBuffers:
    """Two state sets (0 = A, 1 = B) as aligned views into one torch allocation.

    Works on any torch device, so the layout logic is tested on a CPU; the TensorRT runner puts
    it on CUDA and hands the views' `data_ptr()`s to `set_tensor_address`.
    """

    def __init__(self, layout: StateLayout, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.device = torch.device(device)
        self._block = aligned_empty((layout.total_bytes,), torch.uint8, self.device, layout.alignment)
        self._sets: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = (
            self._carve(0),
            self._carve(layout.set_bytes),
        )

    def _carve(self, base: int) -> dict[str, torch.Tensor]:
        views: dict[str, torch.Tensor] = {}
        for slot in self.layout.slots:
            raw = self._block[base + slot.offset : base + slot.offset + slot.nbytes]
            views[slot.input_name] = raw.view(self.layout.dtype).view(slot.shape)
        return views

    def inputs(self, index: int) -> dict[str, torch.Tensor]:
        """Set `index` keyed by step-graph input name (`a_hat_in.L`): what a step reads."""
        return self._sets[index]

    def outputs(self, index: int) -> dict[str, torch.Tensor]:
        """Set `index` keyed by output name (`a_hat_out.L`): what a step (or warm-up) writes."""
        return {slot.output_name: self._sets[index][slot.input_name] for slot in self.layout.slots}

    @property
    def base_ptr(self) -> int:
        """Address of set A's first byte (aligned)."""
        return self._block.data_ptr()

    def zero_(self) -> None:
        """Zero both sets with one fill (useful for profiling with zero state)."""
        self._block.zero_()
