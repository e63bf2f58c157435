"""Tiny diffusers models saved as the folders users hold (nothing downloaded: built from configs)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
TINY_COND_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 16,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
SD_PNDM = {**SD_SCHEDULE, "skip_prk_steps": True}  # Stable Diffusion's PNDM


def _randomize(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of a trained-looking scale: diffusers zero-initialises the output convs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.2 if p.dim() > 1 else 0.05))
    return unet.eval()


def unet_folder(path: Path, conditional: bool = False, seed: int = 0) -> Path:
    """A diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors) with random weights."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    cls, config = (UNet2DConditionModel, TINY_COND_UNET) if conditional else (UNet2DModel, TINY_UNET)
    torch.manual_seed(seed)
    _randomize(cls(**config), seed).save_pretrained(path, safe_serialization=True)
    return path


def pipeline_folder(path: Path, scheduler: str = "PNDMScheduler", seed: int = 0) -> Path:
    """A pipeline-layout folder: unet/ (conditional) and scheduler/ with Stable Diffusion's schedule."""
    import diffusers

    unet_folder(path / "unet", conditional=True, seed=seed)
    getattr(diffusers, scheduler)(**(SD_PNDM if scheduler == "PNDMScheduler" else SD_SCHEDULE)).save_pretrained(
        path / "scheduler"
    )
    return path


def _tokenizer_files(folder: Path) -> Path:
    """A CLIP BPE vocabulary of single letters (no merges): enough to tokenize any lowercase prompt."""
    import json

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def stable_diffusion_pipeline(path: Path, seed: int = 0):
    """A StableDiffusionPipeline of tiny components (UNet, VAE, CLIP text model, tokenizer), saved to `path`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=54,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    words = _tokenizer_files(path / "vocabulary")
    tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=77)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        sample_size=8,
    ).eval()
    unet = _randomize(UNet2DConditionModel(**TINY_COND_UNET), seed)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD_PNDM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe
