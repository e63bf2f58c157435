"""Graph I/O names shared by the exporter, the manifest and every backend.

Each quantized layer is named by its module path in the UNet (e.g. `down.0.block.0.conv1`);
its state tensors are `a_hat_in.<path>`, `o_hat_in.<path>` (step graph inputs) and
`a_hat_out.<path>`, `o_hat_out.<path>` (outputs of both graphs).
"""

from __future__ import annotations

X, T, CONTEXT, EPS = "x", "t", "context", "eps"
#: Step-graph input [2, quantizers] with step groups: row 0 multiplies each residual before its
#: constant-scale quantizer (s_0/s_g), row 1 the dequantized residual and the layer output (s_g/s_0).
STEP_SCALE_RATIO = "step_scale_ratio"
UNBATCHED = frozenset({STEP_SCALE_RATIO})  # inputs whose dim 0 is not the batch
STATE_KINDS = ("a_hat", "o_hat")


def state_kinds(keeps_a_hat: bool = True) -> tuple[str, ...]:
    """The state a layer carries: `a_hat` and `o_hat`, or only `o_hat` when it keeps no `a_hat`
    of its own: its input is constant over the trajectory (its step passes `o_hat` through), or
    an earlier layer reading the same tensor with the same quantizer keeps that `a_hat` for both
    (`shared_state.a_hat_owners`)."""
    return STATE_KINDS if keeps_a_hat else ("o_hat",)


def state_input(kind: str, layer: str) -> str:
    """Name of the step-graph input that carries `kind` ('a_hat'|'o_hat') of `layer`."""
    return f"{kind}_in.{layer}"


def state_output(kind: str, layer: str) -> str:
    """Name of the graph output that returns the updated `kind` of `layer`."""
    return f"{kind}_out.{layer}"


def output_for_input(name: str) -> str:
    """The output a state input is paired with (`a_hat_in.L` -> `a_hat_out.L`)."""
    kind, sep, layer = name.partition("_in.")
    if not sep or kind not in STATE_KINDS:
        raise ValueError(f"{name!r} is not a state input name")
    return state_output(kind, layer)
