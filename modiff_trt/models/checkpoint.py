"""Reading checkpoint files into a flat UNet state_dict, whatever layout they were saved in.

Supported layouts: a flat state_dict (the official converted `model-790000.ckpt`), a ddim
training checkpoint (a list whose last element is the EMA state_dict, keys under `module.`),
a Q-Diffusion-wrapped state_dict (keys under `model.`, quantizer tensors beside the weights)
and safetensors files. Files load with `weights_only=True`; one that needs more trust is
refused with the way forward.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from modiff_trt.errors import CheckpointError

log = logging.getLogger(__name__)
QUANTIZER_MARKERS = ("weight_quantizer", "act_quantizer")


def read_checkpoint(path: str | Path, trust: bool = False) -> Any:
    """Load a checkpoint file's raw object; `trust=True` allows arbitrary pickles (your risk)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory: name the weights file inside it (--checkpoint)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: check the path (--checkpoint)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise CheckpointError(
            f"{path} is not a torch checkpoint (neither a torch.save zip archive nor a legacy pickle); "
            "pass the .ckpt/.pth/.pt/.safetensors file of the UNet"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds Python objects that weights_only loading refuses ({str(exc).splitlines()[0]}). "
            "If you trust its origin, pass --trust-checkpoint (loads it with weights_only=False), "
            "or re-save only its state_dict with torch.save(sd, 'clean.ckpt')"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc}); "
            "the file may be truncated: download or copy it again"
        ) from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the UNet weights in a loaded checkpoint object and give them official key names."""
    if isinstance(obj, (list, tuple)):
        # ddim training checkpoints: [model, optimizer, epoch, step, (ema)]: the EMA copy is last.
        candidates = [o for o in obj if _is_state_dict(o)]
        if not candidates:
            raise CheckpointError(f"{source} is a list without any state_dict: not a ddim training checkpoint")
        log.debug("%s: ddim training checkpoint, using its last (EMA) state_dict", source)
        obj = candidates[-1]
    elif isinstance(obj, dict) and not _is_state_dict(obj):
        if isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        elif isinstance(obj.get("model"), dict):
            obj = obj["model"]
        obj = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not _is_state_dict(obj):
        raise CheckpointError(f"{source} holds no tensors that could be UNet weights")
    state = _strip(dict(obj), "module.")
    if any(marker in k for k in state for marker in QUANTIZER_MARKERS) or all(k.startswith("model.") for k in state):
        state = _strip({k: v for k, v in state.items() if not any(m in k for m in QUANTIZER_MARKERS)}, "model.")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def diff_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], limit: int = 5) -> list[str]:
    """Human-readable differences between a model's parameters and a state_dict (first `limit` each)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    lines = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"{label} ({len(items)}): {', '.join(items[:limit])}{more}")
    return lines
