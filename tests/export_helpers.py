"""Helpers for export tests: residual-absmax scales measured on float trajectories."""

from __future__ import annotations

import torch

from modiff_trt.models.config import ModelConfig
from modiff_trt.quant import LayerScales, QuantConfig, ScaleSet, quantize_unet
from modiff_trt.sampling import ddim_sample, ddim_timesteps, linear_betas


def absmax_scales(model, config: QuantConfig, sample_shape, n=4, steps=10) -> ScaleSet:
    """Static scales: absmax of the residual (MoDiff) or raw input (plain), first-step raw absmax."""
    probe = quantize_unet(model, QuantConfig(None, None, split=config.split))
    bits = config.act_bits
    stats: dict[str, dict[str, list[torch.Tensor]]] = {}
    prev: dict[str, torch.Tensor] = {}

    def hook(name, layer):
        def record(mod, args):
            x = args[0]
            entry = stats.setdefault(name, {"act": None, "warmup": None})
            value = x if (not config.modulate or name not in prev) else x - prev[name]
            key = "warmup" if name not in prev else "act"
            if not config.modulate:
                key = "act"
            amax = torch.stack([value[:, g].abs().amax() for g in layer.groups])
            entry[key] = amax if entry[key] is None else torch.maximum(entry[key], amax)
            prev[name] = x.clone()
        return record

    for name, layer in probe.layers.items():
        layer.register_forward_pre_hook(hook(name, layer))
    noise = torch.randn(n, *sample_shape, generator=torch.Generator().manual_seed(123))
    ddim_sample(probe, noise, ddim_timesteps(steps, "quad"), linear_betas())
    qmax = 2 ** (bits - 1) - 1
    layers = {
        name: LayerScales(
            act=[float(v) / qmax for v in s["act"]],
            warmup=None if s["warmup"] is None else [float(v) / qmax for v in s["warmup"]],
        )
        for name, s in stats.items()
    }
    return ScaleSet(modulate=config.modulate, layers=layers, source="test-absmax")


def tiny_model_config(model) -> ModelConfig:
    return ModelConfig("ddim", model.config, "linear", 1e-4, 0.02, 1000, "tiny-test", "0" * 64)
