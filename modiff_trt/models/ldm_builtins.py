"""The latent-diffusion built-ins (`ldm-churches`, `ldm-bedrooms`, `sd-v1`) as plain data.

Each is written as the `model.params` mapping the official YAML parses to, plus a `_sampling`
entry with the paper's sampler settings, so `ldm_config.parse_ldm_params` is the only parser and
a built-in cannot drift from what the same file on disk would give. Sources: latent-diffusion
configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml, lsun_bedrooms-ldm-vq-4.yaml and
stable-diffusion configs/stable-diffusion/v1-inference.yaml.
"""

from __future__ import annotations

from typing import Any


def _kl_f8() -> dict[str, Any]:
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "ddconfig": {
                "double_z": True,
                "z_channels": 4,
                "resolution": 256,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 128,
                "ch_mult": [1, 2, 4, 4],
                "num_res_blocks": 2,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
        },
    }


#: Built-in name -> `model.params` of its official YAML (+ `_sampling`: the paper's settings).
LDM_BUILTINS: dict[str, dict[str, Any]] = {
    "ldm-churches": {
        "linear_start": 0.0015,
        "linear_end": 0.0155,
        "timesteps": 1000,
        "image_size": 32,
        "channels": 4,
        "concat_mode": False,
        "scale_by_std": True,
        "cond_stage_config": "__is_unconditional__",
        "unet_config": {
            "params": {
                "image_size": 32,
                "in_channels": 4,
                "out_channels": 4,
                "model_channels": 192,
                "attention_resolutions": [1, 2, 4, 8],
                "num_res_blocks": 2,
                "channel_mult": [1, 2, 2, 4, 4],
                "num_heads": 8,
                "use_scale_shift_norm": True,
                "resblock_updown": True,
            }
        },
        "first_stage_config": _kl_f8(),
        "_sampling": {"sampler": "ddim", "steps": 400, "eta": 0.0},
    },
    "ldm-bedrooms": {
        "linear_start": 0.0015,
        "linear_end": 0.0195,
        "timesteps": 1000,
        "image_size": 64,
        "channels": 3,
        "cond_stage_config": "__is_unconditional__",
        "unet_config": {
            "params": {
                "image_size": 64,
                "in_channels": 3,
                "out_channels": 3,
                "model_channels": 224,
                "attention_resolutions": [8, 4, 2],
                "num_res_blocks": 2,
                "channel_mult": [1, 2, 3, 4],
                "num_head_channels": 32,
            }
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.VQModelInterface",
            "params": {
                "embed_dim": 3,
                "n_embed": 8192,
                "ddconfig": {
                    "double_z": False,
                    "z_channels": 3,
                    "resolution": 256,
                    "in_channels": 3,
                    "out_ch": 3,
                    "ch": 128,
                    "ch_mult": [1, 2, 4],
                    "num_res_blocks": 2,
                    "attn_resolutions": [],
                    "dropout": 0.0,
                },
            },
        },
        "_sampling": {"sampler": "ddim", "steps": 200, "eta": 1.0},
    },
    "sd-v1": {
        "linear_start": 0.00085,
        "linear_end": 0.0120,
        "timesteps": 1000,
        "image_size": 64,
        "channels": 4,
        "conditioning_key": "crossattn",
        "scale_factor": 0.18215,
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        "unet_config": {
            "params": {
                "image_size": 32,
                "in_channels": 4,
                "out_channels": 4,
                "model_channels": 320,
                "attention_resolutions": [4, 2, 1],
                "num_res_blocks": 2,
                "channel_mult": [1, 2, 4, 4],
                "num_heads": 8,
                "use_spatial_transformer": True,
                "transformer_depth": 1,
                "context_dim": 768,
                "use_checkpoint": True,
                "legacy": False,
            }
        },
        "first_stage_config": _kl_f8(),
        "_sampling": {"sampler": "plms", "steps": 50, "eta": 0.0, "guidance_scale": 7.5},
    },
}
