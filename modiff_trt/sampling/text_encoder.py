"""The SD v1 text encoder: a local CLIP ViT-L/14 text model through `transformers` (optional).

Like CompVis' FrozenCLIPEmbedder: prompts are padded/truncated to 77 tokens and the UNet's
context is the text model's `last_hidden_state`. Only a local directory is read (the user gives
it; nothing is downloaded), and `transformers` is imported only here, so the rest of the package
works without the `sd` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from modiff_trt.errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)
MAX_TOKENS = 77


class ClipTextEncoder:
    """`encoder(prompts) -> [n, 77, hidden]` float32 on `device`."""

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu") -> None:
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as exc:
            raise BackendUnavailableError(
                "SD text conditioning needs the `transformers` package: pip install 'modiff-trt[sd]'"
            ) from exc
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(
                f"--text-encoder {directory}: not a directory; give a local copy of a CLIP ViT-L/14 text "
                "model (tokenizer files + config.json + weights, e.g. openai/clip-vit-large-patch14)"
            )
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
            self.model = CLIPTextModel.from_pretrained(str(directory), local_files_only=True).eval().to(device)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--text-encoder {directory}: cannot load a CLIP text model ({exc})") from exc
        self.device = torch.device(device)
        log.info("text encoder %s (hidden size %d)", directory, self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts), truncation=True, max_length=MAX_TOKENS, padding="max_length", return_tensors="pt"
        )
        return self.model(input_ids=tokens["input_ids"].to(self.device)).last_hidden_state.float()
