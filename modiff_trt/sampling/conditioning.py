"""Where cross-attention context comes from: prompts through a text encoder, or random tensors.

Samplers and the calibrator only need `context(indices)` (the conditional context of images
`indices`) and `uncond()` (the unconditional one, the empty prompt for SD). Random context
exists so that tests and CI can drive SD-shaped models without a 500 MB CLIP download; it is
drawn per image from (seed, index) like the initial noise, so image i is reproducible whatever
the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from modiff_trt.errors import ConfigError
from modiff_trt.sampling.noise import image_generator

CONTEXT_STREAM = 2  # image_generator stream of random context (0: noise, 1: eta noise)


class ContextSource(Protocol):
    """Conditional and unconditional cross-attention context, [n, tokens, dim] float32."""

    def context(self, indices: Sequence[int]) -> torch.Tensor: ...

    def uncond(self) -> torch.Tensor: ...


@dataclass
class RandomContext:
    """Standard-normal context per image index; the unconditional context is one fixed draw."""

    shape: Sequence[int]
    seed: int = 0

    def context(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack(
            [torch.randn(tuple(self.shape), generator=image_generator(self.seed, i, CONTEXT_STREAM)) for i in indices]
        )

    def uncond(self) -> torch.Tensor:
        return torch.randn(tuple(self.shape), generator=image_generator(self.seed, 0, CONTEXT_STREAM + 1))[None]


@dataclass
class PromptContext:
    """Prompts through a text encoder; image i gets prompt i mod len(prompts), uncond is ''."""

    encode: Callable[[Sequence[str]], torch.Tensor]
    prompts: Sequence[str]
    _uncond: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("PromptContext needs at least one prompt")

    def context(self, indices: Sequence[int]) -> torch.Tensor:
        return self.encode([self.prompts[i % len(self.prompts)] for i in indices]).float()

    def uncond(self) -> torch.Tensor:
        if self._uncond is None:
            self._uncond = self.encode([""]).float()
        return self._uncond


def read_prompts(prompt: str | None, from_file: str | None) -> list[str]:
    """`--prompt TEXT` or `--from-file FILE` (one prompt per non-empty line), exactly one of them."""
    if (prompt is None) == (from_file is None):
        raise ValueError("give exactly one of --prompt and --from-file")
    if prompt is not None:
        return [prompt]
    with open(from_file, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip()]
    if not prompts:
        raise ValueError(f"{from_file} holds no prompts (one per line)")
    return prompts


def make_conditioning(
    context_shape: Sequence[int] | None,
    source: str,
    prompt: str | None = None,
    from_file: str | Path | None = None,
    text_encoder: str | Path | None = None,
    random_context: bool = False,
    seed: int = 0,
) -> ContextSource | None:
    """Context for a model taking `context_shape` (None: unconditional) from CLI-style options.

    `source` names the model (config or export) in errors.
    """
    if context_shape is None:
        if prompt or from_file or text_encoder or random_context:
            raise ConfigError(f"{source} is unconditional: it takes no prompts or context")
        return None
    if random_context:
        return RandomContext(tuple(context_shape), seed)
    if text_encoder is None:
        raise ConfigError(
            f"{source} is text-conditioned: give --text-encoder DIR (a local CLIP ViT-L/14 "
            "text model) with --prompt or --from-file, or --random-context for a smoke test"
        )
    try:
        prompts = read_prompts(prompt, None if from_file is None else str(from_file))
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    from modiff_trt.sampling.text_encoder import ClipTextEncoder

    return PromptContext(ClipTextEncoder(text_encoder), prompts)
