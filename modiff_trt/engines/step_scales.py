"""The `step_scale_ratio` input of an export with step groups, filled per call by the runners.

Scales calibrated per group of sampling steps reach a graph whose Q/DQ scales are build-time
constants through one small input [2, quantizers] (docs/export.md): the group's s_0/s_g and
s_g/s_0 per quantizer. It is neither state nor per sample, so ONE buffer serves every batch
size and stays at a fixed address (what TensorRT contexts and CUDA graphs bind); a call only
copies its group's row of the manifest's table into it when the group changes.
"""

from __future__ import annotations

import torch

from modiff_trt.engines.state_buffers import aligned_empty
from modiff_trt.export.manifest import Manifest
from modiff_trt.export.naming import STEP_SCALE_RATIO


class StepScaleInput:
    """The ratio table of an export [G, 2, Q] and the buffer the step graph reads."""

    name = STEP_SCALE_RATIO

    def __init__(self, manifest: Manifest, device: torch.device, dtype: torch.dtype, source: str) -> None:
        self.groups = manifest.step_groups.groups()
        self.table = torch.tensor(manifest.step_groups.ratios, dtype=torch.float32).to(device, dtype)
        self.buffer = aligned_empty(tuple(self.table.shape[1:]), dtype, device)  # TensorRT: 256-byte aligned
        self.source = source
        self._group: int | None = None

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, device: torch.device, dtype: torch.dtype, source: str
    ) -> StepScaleInput | None:
        """None for exports without step groups (their step graph has no ratio input)."""
        return None if manifest.step_groups is None else cls(manifest, device, dtype, source)

    def fill(self, call: int) -> torch.Tensor:
        """The buffer holding call `call`'s ratios (call >= 1: the step graph's calls)."""
        self.groups.check_call(call, self.source)
        group = self.groups.group_of(call)
        if group != self._group:
            self.buffer.copy_(self.table[group], non_blocking=True)
            self._group = group
        return self.buffer
