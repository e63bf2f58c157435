"""How long a calibration will take, said after its first UNet calls, before the long part.

Why: a real Stable Diffusion calibration is thousands of UNet calls (64 prompts x 50 PLMS steps,
each call on the cond + uncond batch): most of a day on 2 CPU cores, minutes on a GPU. One early
call is timed and the whole run extrapolated from it, so the user sees "about 18 h on cpu" and
can stop it right away. The run's measured mean per call is kept for the file's report.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """'18.2 h', '12 min' or '40 s': the unit a person reads at a glance."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


class CallTimer:
    """Forward hooks on the UNet that time its calls (a `collect.Collector`, fed by `run_collectors`).

    `calls` is how many UNet calls the run makes (batches x calls per trajectory), each on
    `unet_batch` samples (trajectories per batch, twice under guidance). It logs the estimate from
    the second call's time when the run has more than two calls, else from the first: the first
    pays one-time costs (fresh allocations' page faults, kernel selection; SD on the CPU: 190 s
    against a 121 s mean). `seconds_per_call` is the mean over the calls timed so far, from the first
    call's start to the last call's end (sampler arithmetic and statistics included: what a
    user waits for); `cpu_seconds_per_call` the same in this process's CPU time, which other jobs
    on a shared machine do not inflate. CUDA is synchronised at the end of the calls up to the
    timed one, so its time is the GPU's.
    """

    def __init__(self, model: nn.Module, calls: int, unet_batch: int, device: torch.device | str) -> None:
        self.model, self.calls, self.unet_batch = model, calls, unet_batch
        self.device = torch.device(device)
        self.estimate_call = 2 if calls > 2 else 1
        self.started: float | None = None
        self.call_started = self.ended = self.cpu_started = self.cpu_ended = 0.0
        self.timed = 0

    def attach(self, model: nn.Module) -> list[Any]:
        return [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._end)]

    def _new_trajectory(self, *_: object) -> None:
        """Calls are counted over the whole run, not per trajectory."""

    def _start(self, *_: object) -> None:
        self.call_started = time.perf_counter()
        if self.started is None:
            self.started, self.cpu_started = self.call_started, time.process_time()

    def _end(self, *_: object) -> None:
        if self.timed < self.estimate_call and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ended, self.cpu_ended = time.perf_counter(), time.process_time()
        self.timed += 1
        if self.timed == self.estimate_call:
            seconds = self.ended - self.call_started
            log.info(
                "%d UNet calls (each on %d samples) x %.2f s per call = about %s on %s",
                self.calls,
                self.unet_batch,
                seconds,
                duration(self.calls * seconds),
                self.device,
            )

    @property
    def seconds_per_call(self) -> float:
        """Mean seconds per UNet call so far (0 before the first call)."""
        if self.started is None or self.timed == 0:
            return 0.0
        return (self.ended - self.started) / self.timed

    @property
    def cpu_seconds_per_call(self) -> float:
        """Mean CPU seconds of this process per UNet call so far (all its threads)."""
        return 0.0 if self.timed == 0 else (self.cpu_ended - self.cpu_started) / self.timed
