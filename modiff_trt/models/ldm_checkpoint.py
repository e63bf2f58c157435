"""Reading latent-diffusion checkpoints: Lightning dicts, EMA copies, fp16 and Q-Diffusion files.

Kept apart from the architecture so that the UNet and the first-stage decoders share one
careful reader: ``weights_only`` loading by default (a checkpoint is untrusted input), one place
that explains how to proceed when torch refuses a file, and one key/shape comparison that
produces the user-facing error text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from modiff_trt.errors import CheckpointError
from modiff_trt.models.checkpoint import read_checkpoint

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

#: Prefix of the UNet inside a LatentDiffusion Lightning checkpoint.
UNET_PREFIX = "model.diffusion_model."
#: Prefix of the EMA copy; LitEma stores ``diffusion_model.<path>`` with the dots removed.
EMA_PREFIX = "model_ema."
#: Prefix of the first-stage autoencoder.
FIRST_STAGE_PREFIX = "first_stage_model."


def read_checkpoint_mapping(path: str | Path, trust: bool = False) -> Mapping[str, Any]:
    """A Lightning checkpoint's (or state_dict's) top-level mapping, read by the shared reader
    (weights_only, magic-byte and truncation checks, safetensors)."""
    obj = read_checkpoint(path, trust=trust)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict (Lightning checkpoint or state_dict), got {type(obj).__name__}")
    return obj


def tensors_of(obj: Mapping[str, Any], path: str | Path) -> StateDict:
    """The flat name -> tensor mapping: ``obj['state_dict']`` for Lightning files, else ``obj``."""
    inner = obj.get("state_dict", obj)
    if not isinstance(inner, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' entry is not a mapping")
    tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found in the checkpoint")
    return tensors


def to_fp32(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Cast floating tensors to float32 (fp16/bf16 checkpoints), leave integer buffers alone."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Sub-dict of keys starting with ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def is_quantizer_key(key: str) -> bool:
    """Q-Diffusion adds ``*weight_quantizer*`` / ``*act_quantizer*`` entries: not model weights."""
    return any("quantizer" in part for part in key.split("."))


def ema_state(
    state: Mapping[str, torch.Tensor],
    param_names: Iterable[str],
    path: str | Path,
    wrapper: str = "diffusion_model.",
) -> StateDict:
    """Map LitEma buffers back to parameter names.

    LitEma names each buffer after ``wrapper + param_name`` with every dot removed, which is not
    invertible on its own; we invert it through the model's own parameter names and refuse
    ambiguous mappings instead of guessing.
    """
    ema = strip_prefix(state, EMA_PREFIX)
    if not any(k not in ("decay", "num_updates") for k in ema):
        raise CheckpointError(f"{path}: no EMA weights ({EMA_PREFIX}*) in this checkpoint; load without --ema")
    out: StateDict = {}
    seen: dict[str, str] = {}
    for name in param_names:
        squashed = (wrapper + name).replace(".", "")
        if squashed in seen:
            raise CheckpointError(f"{path}: EMA names of {seen[squashed]!r} and {name!r} collide; cannot map them")
        seen[squashed] = name
        if squashed in ema:
            out[name] = ema[squashed]
    return out


def describe_mismatch(expected: Mapping[str, torch.Size], got: Mapping[str, torch.Tensor], limit: int = 5) -> list[str]:
    """Human-readable key/shape differences (empty when the state_dict fits)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k])
    ]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"{len(items)} {title}: " + ", ".join(items[:limit]) + more)
    return lines


def expected_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    """Parameter and persistent-buffer shapes of a module (works on the meta device)."""
    return {k: v.shape for k, v in module.state_dict().items()}
