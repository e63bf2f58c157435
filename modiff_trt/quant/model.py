"""`quantize_unet`: wrap every Conv/Linear of a UNet in a `QuantLayer`, keeping module paths."""

from __future__ import annotations

import copy

import torch
from torch import nn

from modiff_trt.errors import ConfigError
from modiff_trt.quant.config import QuantConfig
from modiff_trt.quant.layer import QUANTIZABLE, QuantLayer
from modiff_trt.quant.scales import ScaleSet, StepGroups, scale_ratios


class QuantUNet(nn.Module):
    """A quantized UNet with MoDiff state: the PyTorch reference backend (`name == 'torch'`)."""

    name = "torch"
    source = "the quantized reference"

    def __init__(self, unet: nn.Module, config: QuantConfig):
        super().__init__()
        self.unet, self.config = unet, config
        self.step_groups: StepGroups | None = None
        self.weight_method: str | None = None  # the calibration's, when its integer weights are installed
        self.calls = 0
        self._group: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def layers(self) -> dict[str, QuantLayer]:
        """Quantized layers by their module path in the float UNet (`down.0.block.0.conv1`)."""
        return {name[len("unet.") :]: m for name, m in self.named_modules() if isinstance(m, QuantLayer)}

    def reset_state(self) -> None:
        """Drop every layer's `a_hat`/`o_hat`: the next call is a warm-up step."""
        for layer in self.layers.values():
            layer.reset_state()
        self.calls = 0

    def _select_step_group(self) -> None:
        """Switch every layer to the scale ratios of this call's step group (pinned schedule)."""
        self.step_groups.check_call(self.calls, self.source)
        group = self.step_groups.group_of(self.calls) if self.calls >= 1 else None
        if group != self._group:
            for layer in self.layers.values():
                layer.step_ratio = None if group is None else layer.ratios[group]
            self._group = group

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.step_groups is not None:
            self._select_step_group()
        self.calls += 1
        if context is None:
            return self.unet(x, t)
        return self.unet(x, t, context=context)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Module paths of every Conv1d/Conv2d/Linear, in definition order."""
    return [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def split_points(model: nn.Module, split: bool = True) -> dict[str, int]:
    """Layer -> channels of its first input group, for layers whose input is a skip concatenation.

    Q-Diffusion's split quantizes the two groups separately; only ddim UNets have such layers
    (`split_points()`), so any other model, or `split=False`, gives {}.
    """
    return model.split_points() if split and hasattr(model, "split_points") else {}


def end_layers(model: nn.Module) -> tuple[str, ...]:
    """The UNet's first and last layer (input conv, output conv) by module path: the layers
    `QuantConfig.first_last_bits` applies to. Every built-in UNet names them (`end_layers()`); a
    model without the method has none."""
    return tuple(model.end_layers()) if hasattr(model, "end_layers") else ()


def layer_weight_bits(model: nn.Module, config: QuantConfig) -> dict[str, int | None]:
    """Weight bits of every quantizable layer: `config.weight_bits`, the end layers'
    `config.end_weight_bits` (8 by default below 8 bits)."""
    ends = set(end_layers(model))
    return {name: config.end_weight_bits if name in ends else config.weight_bits for name in quantizable_layers(model)}


def apply_scales(qmodel: QuantUNet, scales: ScaleSet) -> None:
    """Install static scales (and imported integer weights) on the quantized layers."""
    if scales.modulate != qmodel.config.modulate:
        measured = "residuals (MoDiff)" if scales.modulate else "raw activations (plain Q-Diffusion)"
        raise ConfigError(
            f"{scales.source} holds scales measured on {measured}, but the model is "
            f"{'modulated' if qmodel.config.modulate else 'not modulated'}: calibrate with "
            f"{'--modulate' if qmodel.config.modulate else '--no-modulate'}"
        )
    layers = qmodel.layers
    missing = sorted(set(layers) - set(scales.layers))
    unknown = sorted(set(scales.layers) - set(layers))
    if missing or unknown:
        raise ConfigError(
            f"{scales.source} does not match the model's layers: missing {missing[:5]}, unknown {unknown[:5]}; "
            "calibrate this checkpoint and config again"
        )
    for name, layer in layers.items():
        entry = scales.layers[name]
        for label, values in (("act", entry.act), ("warmup", entry.warmup)):
            if values is not None and len(values) != len(layer.groups):
                raise ConfigError(
                    f"{scales.source}: layer {name} has {len(values)} {label} scale(s) but {len(layer.groups)} "
                    "channel group(s): the calibration and --split setting disagree"
                )
        if scales.step_groups is not None and len(entry.act_groups or []) != scales.step_groups.count:
            raise ConfigError(
                f"{scales.source}: layer {name} lacks scales for {scales.step_groups.count} step groups; "
                "recalibrate with `modiff-trt calibrate --step-groups`"
            )
        if entry.act is not None and layer.act_bits is not None and entry.act_format != layer.format.format:
            raise ConfigError(
                f"{scales.source}: layer {name} holds {entry.act_format} scales, but the model quantizes it as "
                f"{layer.format.format}: run with --act-format {scales.act_format}, or calibrate again with "
                f"--act-format {qmodel.config.act_format}"
            )
        layer.scales = entry
        layer.ratios = None if scales.step_groups is None else scale_ratios(entry.act_groups)
        if entry.weight_codes is not None:
            made_at = layer.weight_bits if scales.weight_bits is None else scales.weight_bits[name]
            if made_at != layer.weight_bits:
                raise ConfigError(
                    f"{scales.source} holds W{made_at} integer weights for layer {name}, but the model quantizes "
                    f"it at W{layer.weight_bits}: give the --weight-bits and --first-last-bits the file was made "
                    "with (left unset, export and sample take them from --calibration), or calibrate again"
                )
            layer.set_weight_codes(entry.weight_codes, entry.weight_scale)
    qmodel.step_groups = scales.step_groups
    qmodel.weight_method = scales.weight_method


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree that shares its parameters and buffers, not copies them.

    The quantized model and the export trace need their own module trees (layers are replaced)
    but never write a float weight, so sharing spares a full copy of the weights (3.4 GB for SD
    v1). Moving either model to another device moves the shared tensors for both.
    """
    return copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})


def quantize_unet(model: nn.Module, config: QuantConfig, calibration: ScaleSet | None = None) -> QuantUNet:
    """A quantized copy of `model` that shares its float weights (the float model is left untouched).

    With `config.split`, layers listed by the model's `split_points()` quantize their two input
    channel groups separately; the model's `end_layers()` take `config.end_weight_bits`. Static activation scales need a `calibration`.
    """
    if config.act_scales == "static" and config.act_bits is not None and calibration is None:
        raise ConfigError("act_scales='static' needs a calibration: run `modiff-trt calibrate` first")
    unet = shared_copy(model).eval()
    splits = split_points(unet, config.split)
    for name, bits in layer_weight_bits(unet, config).items():
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        layer = QuantLayer(getattr(parent, child), name, config, split=splits.get(name, 0), weight_bits=bits)
        setattr(parent, child, layer)
    qmodel = QuantUNet(unet, config)
    if calibration is not None:
        apply_scales(qmodel, calibration)
    return qmodel
