"""BRECQ's reconstruction units: residual blocks, attention blocks, and single layers for the rest.

Why blocks: reconstructing one layer at a time ignores how the errors of a block's layers
interact (the two convs of a residual block, q/k/v feeding one softmax); reconstructing the whole
UNet at once has too many unknowns for a few thousand calibration samples. BRECQ reconstructs
each residual or attention block's output, which Q-Diffusion applies to diffusion UNets; layers
outside any block (the timestep MLP, conv_in/conv_out, up/down-sampling convs) are their own
unit.

Blocks run in the order the UNet calls them (found by a probe forward), not in definition order:
ddim's up path is defined in reverse, and a block's inputs must come from blocks already
reconstructed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modiff_trt.models.ddim_unet import AttnBlock, ResnetBlock
from modiff_trt.models.openaimodel import AttentionBlock, BasicTransformerBlock, ResBlock
from modiff_trt.quant.model import quantizable_layers

BLOCK_TYPES: tuple[type[nn.Module], ...] = (ResnetBlock, AttnBlock, ResBlock, AttentionBlock, BasicTransformerBlock)


@dataclass(frozen=True)
class Block:
    """One reconstruction unit: its module path and its quantizable layers (full paths)."""

    name: str
    layers: tuple[str, ...]

    def relative(self, layer: str) -> str:
        """The layer's parameter prefix inside the block module ('' for a single-layer unit)."""
        return "" if layer == self.name else layer[len(self.name) + 1 :]


def _block_of(layer: str, blocks: set[str]) -> str:
    """The outermost block holding `layer`, else the layer itself."""
    parts = layer.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in blocks:
            return prefix
    return layer


def find_blocks(model: nn.Module, probe: Callable[[nn.Module], object]) -> list[Block]:
    """The reconstruction units of `model` in call order; `probe(model)` runs one forward pass.

    Units the probe never calls (none in the built-in UNets) are left out: they have no data, and
    the caller rounds their layers to nearest.
    """
    block_names = {name for name, m in model.named_modules() if isinstance(m, BLOCK_TYPES)}
    layers = quantizable_layers(model)
    members: dict[str, list[str]] = {}
    for layer in layers:
        members.setdefault(_block_of(layer, block_names), []).append(layer)
    order: list[str] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: order.append(name))
        for name in members
    ]
    try:
        with torch.no_grad():
            probe(model)
    finally:
        for handle in handles:
            handle.remove()
    return [Block(name, tuple(members[name])) for name in dict.fromkeys(order)]
