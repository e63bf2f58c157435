"""Per-sample MoDiff state and the batch sizes that fit on 24/40/80 GB GPUs, for the full-size
LSUN-Churches, LSUN-Bedrooms and SD v1 UNets (docs/latent-diffusion.md).

Shapes come from a forward on the meta device (no memory, no weights), with hooks on every
Conv/Linear: a_hat has the layer's input shape, o_hat its output shape, per sample. Run:
`python benchmarks/ldm_state_memory.py`. A second table (issue 22) gives the share of the state
that is a duplicated a_hat: layers reading the very tensor an earlier layer read (attention
q/k/v, k/v on one context, the CIFAR-10 UNet's temb_proj layers), which the export stores once
when their quantizers are equal (docs/export.md, "One a_hat per input tensor"; always with this
project's calibration, which measures such layers on the same tensor).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modiff_trt.models import load_config, openaimodel
from modiff_trt.quant.layer import QUANTIZABLE

GB = 10**9
GPUS = (24, 40, 80)
RESERVE = 2 * GB  # CUDA context, TensorRT scratch, cuDNN workspaces, fragmentation


def measure(name: str) -> dict[str, int]:
    """Per-sample element counts of one config at batch 1: MoDiff state (a_hat + o_hat of every
    Conv/Linear), an activation estimate, and the parameter count."""
    cfg = load_config(name)
    state, outputs, attention, shared = 0, [], [0], [0]
    inputs: list[torch.Tensor] = []  # kept alive so that no id is reused within the forward
    with torch.device("meta"):
        model = cfg.build().eval()

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal state
        if any(args[0] is seen for seen in inputs):
            shared[0] += math.prod(args[0].shape[1:])
        inputs.append(args[0])
        state += math.prod(args[0].shape[1:]) + math.prod(out.shape[1:])
        outputs.append(math.prod(out.shape[1:]))

    def attention_matrix(module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Elements of the softmax matrix [heads, Lq, Lk] of one sample."""
        x = args[0]
        if isinstance(module, openaimodel.CrossAttention):
            context = kwargs.get("context")
            keys = x.shape[1] if context is None else context.shape[1]
            size = module.heads * x.shape[1] * keys
        else:  # AttentionBlock on [B, C, H, W]
            size = module.num_heads * math.prod(x.shape[2:]) ** 2
        attention[0] = max(attention[0], size)

    for m in model.modules():
        if isinstance(m, QUANTIZABLE):
            m.register_forward_hook(hook)
        if isinstance(m, (openaimodel.CrossAttention, openaimodel.AttentionBlock)):
            m.register_forward_pre_hook(attention_matrix, with_kwargs=True)
    x = torch.zeros(1, *cfg.sample_shape, device="meta")
    context = None if cfg.context_shape is None else torch.zeros(1, *cfg.context_shape, device="meta")
    model(x, torch.zeros(1, device="meta"), context)
    # activations: the 4 largest layer outputs alive at once plus the largest attention matrix
    # (TensorRT's fused MHA avoids the matrix, so this errs on the safe side)
    activations = sum(sorted(outputs)[-4:]) + attention[0]
    return {
        "state": state,
        "shared_a_hat": shared[0],
        "params": sum(p.numel() for p in model.parameters()),
        "activations": activations,
        "multiplier": 2 if cfg.context_shape else 1,
    }


def main() -> None:
    print(
        "| config | state/sample fp32 | fp16 | weights fp16 | activations/sample fp16 | "
        + " | ".join(f"batch @ {g} GB (fp32 / fp16 state)" for g in GPUS)
        + " |"
    )
    print("|---" * (5 + len(GPUS)) + "|")
    for name in ("ldm-churches", "ldm-bedrooms", "sd-v1"):
        m = measure(name)
        mult = m["multiplier"]  # CFG: two state slots and two activations per image
        fixed = 2 * m["params"] + RESERVE
        cells = []
        for g in GPUS:
            fits = []
            for item in (4, 2):
                per_image = mult * (2 * m["state"] * item + 2 * m["activations"])  # 2 ping-pong sets
                fits.append(str(max(0, int((g * GB - fixed) // per_image))))
            cells.append(" / ".join(fits))
        print(
            f"| {name} | {m['state'] * 4 * mult / 2**20:.0f} MiB | {m['state'] * 2 * mult / 2**20:.0f} MiB | "
            f"{2 * m['params'] / 2**30:.2f} GiB | {2 * m['activations'] * mult / 2**20:.0f} MiB | "
            + " | ".join(cells)
            + " |"
        )
    print_sharing()


def print_sharing() -> None:
    """Per config: the duplicated a_hat share, and the state per sample (x2 under guidance) in the
    fp32 layout, fp16 (either layout: scaled changes a_hat's unit, not its size), each with one
    a_hat per layer and with one a_hat per input tensor (what the export carries)."""
    print(
        "\n| config | duplicated a_hat share | fp32, a_hat per layer | fp16, a_hat per layer "
        "| fp32, a_hat per input tensor | fp16, a_hat per input tensor |"
    )
    print("|---|---|---|---|---|---|")
    for name in ("ddim-cifar10", "ldm-churches", "ldm-bedrooms", "sd-v1"):
        m = measure(name)
        state, shared, mult = m["state"], m["shared_a_hat"], m["multiplier"]
        print(
            f"| {name} | {shared / state:.1%} | {state * 4 * mult / 2**20:.1f} MiB | {state * 2 * mult / 2**20:.1f} MiB "
            f"| {(state - shared) * 4 * mult / 2**20:.1f} MiB | {(state - shared) * 2 * mult / 2**20:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
