"""Sampling latent-diffusion models end to end: latents in batches, decode, write images.

The DDIM path (`run.py`) samples images directly; LDMs sample latents with the LDM samplers
(`ldm.py`: DDIM with `range(0, T, T // S) + 1`, PLMS for SD, classifier-free guidance with the
[uncond; cond] batch), then the first-stage decoder from the same checkpoint turns latents into
images. `samples.npz` then holds `arr_0` (decoded uint8 NHWC, what FID tools read), `x0` (the
decoded float images in [-1, 1], as for DDIM models) and `z0` (the float32 latents, for
re-decoding or latent-space metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modiff_trt.errors import ConfigError
from modiff_trt.models.config import ModelConfig
from modiff_trt.models.latent import LatentModelConfig
from modiff_trt.sampling.conditioning import ContextSource
from modiff_trt.sampling.images import make_grid, save_image, save_npz, save_samples
from modiff_trt.sampling.ldm import sample_ddim, sample_plms
from modiff_trt.sampling.noise import step_generators
from modiff_trt.sampling.run import sample_batches

log = logging.getLogger(__name__)
SAMPLERS = ("ddim", "plms")
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class LDMSampling:
    """Sampler settings; guidance_scale 1 means no classifier-free guidance (batch N, not 2N)."""

    sampler: str
    steps: int
    eta: float = 0.0
    guidance_scale: float = 1.0

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def model_calls(self, num_timesteps: int) -> int:
        """UNet calls per trajectory: PLMS's first step evaluates eps twice (pseudo improved Euler)."""
        return num_timesteps + 1 if self.sampler == "plms" else num_timesteps


SD_DEFAULT = LDMSampling("plms", 50, 0.0, 7.5)


def sampling_for(
    model_cfg: ModelConfig,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    guidance_scale: float | None = None,
) -> LDMSampling:
    """The paper settings of the config (docs/latent-diffusion.md), overridden where given."""
    if not isinstance(model_cfg, LatentModelConfig):
        raise ConfigError(f"{model_cfg.source} is a {model_cfg.family} config, not a latent-diffusion one")
    ldm = model_cfg.ldm
    default = LDMSampling(ldm.sampler, ldm.steps, ldm.eta, ldm.guidance_scale)
    if model_cfg.family == "sd" and (ldm.sampler, ldm.guidance_scale) == ("ddim", 1.0):
        default = SD_DEFAULT  # an official SD YAML names no sampler: use the paper's PLMS + CFG 7.5
    chosen = LDMSampling(
        sampler=sampler or default.sampler,
        steps=steps or default.steps,
        eta=default.eta if eta is None else eta,
        guidance_scale=default.guidance_scale if guidance_scale is None else guidance_scale,
    )
    if (model_cfg.num_train_timesteps // chosen.steps) * (len(model_cfg.timesteps(chosen.steps)) - 1) + 1 \
            >= model_cfg.num_train_timesteps:
        raise ConfigError(f"{chosen.steps} steps: the LDM timesteps range(0, T, T // S) + 1 reach T; "
                          "choose a step count that divides the training timesteps (e.g. 50, 100, 200, 250)")
    if chosen.sampler not in SAMPLERS:
        raise ConfigError(f"sampler {chosen.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if chosen.sampler == "plms" and chosen.eta != 0:
        raise ConfigError("PLMS is deterministic: eta must be 0 (use --sampler ddim for eta > 0)")
    if chosen.guided and model_cfg.context_shape is None:
        raise ConfigError(f"{model_cfg.source} is unconditional: classifier-free guidance needs a text-conditioned model")
    return chosen


def ldm_trajectory(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    sampling: LDMSampling,
    indices: Sequence[int],
    seed: int = 0,
    conditioning: ContextSource | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """One batch of latents from `noise` (images `indices`); resets the runner's state once.

    eta > 0 noise comes from one generator per image (seed, index): image i is the same at any
    batch size, as with the DDIM sampler.
    """
    context = uncond = None
    if conditioning is not None:
        context = conditioning.context(indices).to(noise.device)
        if sampling.guided:
            uncond = conditioning.uncond().to(noise.device)
    elif sampling.guided:
        raise ConfigError("classifier-free guidance needs context: give prompts and a text encoder")
    common = dict(context=context, uncond=uncond, guidance_scale=sampling.guidance_scale, callback=callback)
    if sampling.sampler == "plms":
        return sample_plms(model, noise, alphas_cumprod, sampling.steps, **common)
    generator = step_generators(seed, indices) if sampling.eta > 0 else None
    return sample_ddim(model, noise, alphas_cumprod, sampling.steps, eta=sampling.eta, generator=generator, **common)


def sample_latents(
    runner: Callable[..., torch.Tensor],
    model_cfg: ModelConfig,
    sampling: LDMSampling,
    num_images: int,
    batch_size: int,
    seed: int = 0,
    conditioning: ContextSource | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Latents [num_images, C, H, W] on the CPU; `batch_size` counts images (the runner sees 2x
    that under guidance)."""
    alphas = model_cfg.alphas_cumprod()

    def trajectory(noise: torch.Tensor, indices: list[int], advance: Callable[..., None]) -> torch.Tensor:
        return ldm_trajectory(runner, noise, alphas, sampling, indices, seed, conditioning, callback=advance)

    return sample_batches(trajectory, model_cfg.sample_shape, num_images, batch_size,
                          len(model_cfg.timesteps(sampling.steps)), seed, getattr(runner, "device", "cpu"),
                          progress=progress, description=f"sampling ({sampling.sampler})")


@torch.no_grad()
def decode_latents(decoder: torch.nn.Module, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Images in [-1, 1] (float32, CPU) from latents, via `decoder.decode` (scale_factor applied)."""
    device = next(decoder.parameters()).device
    dtype = next(decoder.parameters()).dtype
    out = [decoder.decode(z.to(device, dtype)).float().cpu() for z in latents.split(batch_size)]
    return torch.cat(out).clamp(-1, 1)


def write_ldm_samples(
    runner: Callable[..., torch.Tensor],
    model_cfg: ModelConfig,
    decoder: torch.nn.Module,
    out: Path,
    sampling: LDMSampling,
    num_images: int,
    batch_size: int,
    seed: int = 0,
    conditioning: ContextSource | None = None,
    pngs: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample, decode and write `out/NNNNNN.png`, `grid.png`, `samples.npz`; return (images, latents)."""
    out.mkdir(parents=True, exist_ok=True)
    latents = sample_latents(runner, model_cfg, sampling, num_images, batch_size, seed, conditioning, progress)
    images = decode_latents(decoder, latents, batch_size)
    uint8 = save_samples(images, out, pngs=pngs)
    save_image(make_grid(uint8[:64]), out / "grid.png", upscale=max(1, 128 // uint8.shape[1]))
    save_npz(uint8, images, out / "samples.npz", z0=latents.numpy())
    log.info("decoded %d latents %s -> images %s", len(latents), tuple(latents.shape[1:]), tuple(images.shape[1:]))
    return images, latents


def trajectory_fn(
    model_cfg: ModelConfig, sampling: LDMSampling, seed: int = 0, conditioning: ContextSource | None = None
) -> Callable[[torch.nn.Module, torch.Tensor, list[int], Callable[..., None]], torch.Tensor]:
    """The calibrator's per-batch trajectory for an LDM: what `sample` will run, in float."""
    alphas = model_cfg.alphas_cumprod()

    def run(model: torch.nn.Module, noise: torch.Tensor, indices: list[int], advance: Callable[..., None]) -> torch.Tensor:
        return ldm_trajectory(model, noise, alphas, sampling, indices, seed, conditioning, callback=advance)

    return run


def make_conditioning(
    model_cfg: ModelConfig,
    prompt: str | None = None,
    from_file: str | Path | None = None,
    text_encoder: str | Path | None = None,
    random_context: bool = False,
    seed: int = 0,
) -> ContextSource | None:
    """Context for a text-conditioned config from CLI-style options (None for unconditional ones)."""
    from modiff_trt.sampling.conditioning import PromptContext, RandomContext, read_prompts

    if model_cfg.context_shape is None:
        if prompt or from_file or text_encoder or random_context:
            raise ConfigError(f"{model_cfg.source} is unconditional: it takes no prompts or context")
        return None
    if random_context:
        return RandomContext(model_cfg.context_shape, seed)
    if text_encoder is None:
        raise ConfigError(f"{model_cfg.source} is text-conditioned: give --text-encoder DIR (a local CLIP ViT-L/14 "
                          "text model) with --prompt or --from-file, or --random-context for a smoke test")
    try:
        prompts = read_prompts(prompt, None if from_file is None else str(from_file))
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    from modiff_trt.sampling.text_encoder import ClipTextEncoder

    return PromptContext(ClipTextEncoder(text_encoder), prompts)


def sample_ldm_to(
    runner: Callable[..., torch.Tensor],
    model_cfg: ModelConfig,
    checkpoint: str | Path | None,
    out: Path,
    num_images: int,
    batch_size: int,
    seed: int,
    pngs: bool,
    trust: bool,
    sampler_options: dict,
    context_options: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`modiff-trt sample` for LDM/SD: settings, context, the checkpoint's decoder, then write."""
    from modiff_trt.models.ldm_loading import load_first_stage

    if checkpoint is None:
        raise ConfigError("latent diffusion needs --checkpoint: its first-stage decoder turns latents into images")
    sampling = sampling_for(model_cfg, **sampler_options)
    conditioning = make_conditioning(model_cfg, seed=seed, **context_options)
    decoder = load_first_stage(model_cfg.ldm, checkpoint, trust=trust)
    return write_ldm_samples(runner, model_cfg, decoder, out, sampling, num_images, batch_size, seed, conditioning, pngs)
