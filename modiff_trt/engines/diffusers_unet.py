"""A deployed MoDiff export where a diffusers pipeline calls its UNet, state and all.

    pipe = StableDiffusionPipeline.from_pretrained("sd-pipeline-folder")
    pipe.unet = deploy_unet(pipe.unet, "exports/sd", backend="ort")   # or openvino, trt
    image = pipe("a photo of a church").images[0]

The pipeline keeps its own scheduler, guidance and VAE; only the UNet calls change. A MoDiff
runner must start a new trajectory (its warm-up graph) at the first UNet call of every pipeline
call and never inside one. Every scheduler this project supports visits timesteps in
non-increasing order within one call, so a timestep above the previous call's marks a new
trajectory, and so does another batch size; `reset_state()` starts one by hand. The
guidance batch ([uncond; cond], 2N samples) is what the runner's state is sized for, as with the
project's own samplers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modiff_trt.engines.factory import open_runner
from modiff_trt.errors import ConfigError

#: UNet keywords a pipeline may pass; any of them other than None asks for conditioning the export lacks.
UNSUPPORTED_KWARGS = ("timestep_cond", "added_cond_kwargs", "class_labels", "down_block_additional_residuals")


@dataclass
class UNetOutput:
    """What `UNet2DConditionModel(..., return_dict=True)` returns: the noise prediction as `.sample`."""

    sample: torch.Tensor


class DeployedUNet(torch.nn.Module):
    """`unet(sample, timestep, encoder_hidden_states, ...)` answered by an export's runner."""

    def __init__(self, runner: Any, config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.runner, self.config, self._dtype = runner, config, dtype
        self._last: tuple[float, int] | None = None  # (timestep, batch) of the previous call

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return getattr(self.runner, "device", torch.device("cpu"))

    def reset_state(self) -> None:
        """The next call starts a new trajectory (the pipeline's next call does so by itself)."""
        self._last = None
        self.runner.reset_state()

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> UNetOutput | tuple[torch.Tensor]:
        given = sorted(k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None)
        if given:
            raise ConfigError(f"the deployed UNet takes no {', '.join(given)}: export a UNet without that conditioning")
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch).contiguous()
        now = (float(t[0]), batch)
        if self._last is None or now[0] > self._last[0] or batch != self._last[1]:
            self.runner.reset_state()
        self._last = now
        eps = self.runner(sample.float(), t, None if encoder_hidden_states is None else encoder_hidden_states.float())
        eps = eps.to(device=sample.device, dtype=sample.dtype)
        return UNetOutput(eps) if return_dict else (eps,)


def deploy_unet(
    unet: torch.nn.Module, export_dir: str | Path, backend: str = "ort", **runner_options: Any
) -> DeployedUNet:
    """A `DeployedUNet` over `export_dir` that stands in for `unet` (whose config the pipeline reads).

    The export must have been made from this UNet's folder: its sample shape and context are
    checked against `unet.config`. `runner_options` go to the backend (e.g. `ort_provider`).
    """
    runner, manifest = open_runner(export_dir, backend, **runner_options)
    config = unet.config
    want = (config.in_channels, *_size(config.sample_size))
    if tuple(manifest.model.sample_shape) != want:
        raise ConfigError(
            f"{export_dir} was exported for samples {list(manifest.model.sample_shape)}, but this pipeline's UNet "
            f"takes {list(want)}: export the pipeline's own unet/ folder"
        )
    context = manifest.model.context_shape
    cross = getattr(config, "cross_attention_dim", None)
    if (context is None) != (cross is None) or (context is not None and context[-1] != cross):
        raise ConfigError(
            f"{export_dir} takes context {context}, but this pipeline's UNet has cross_attention_dim {cross}: "
            "export the pipeline's own unet/ folder"
        )
    return DeployedUNet(runner, config, dtype=getattr(unet, "dtype", torch.float32))


def _size(sample_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
