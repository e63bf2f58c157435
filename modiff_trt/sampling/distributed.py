"""Data-parallel sampling over `torch.distributed`: which batches a rank runs, and getting them to rank 0.

`torchrun` (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
starts one process per device. Each process opens its own runner with its own MoDiff state and
runs whole batches of the single-process run: batch k (images k*B .. k*B+B-1) goes to rank
k mod WORLD_SIZE, unchanged. Per-image noise, per-batch dynamic scales and the MoDiff state are
therefore exactly those of a one-process run with the same batch size, and so are the pixels.

Batches are collected in rounds: round r holds batches r*W .. r*W+W-1, one per rank. After each
round every rank first tells every other whether its batch failed (a few bytes, all-gather),
then sends its finished batch to rank 0 (gather), which writes it and drops it. So rank 0 holds
at most one round of images at a time, never the whole run, and a rank that fails stops every
rank at the next round with that rank's message instead of leaving the others waiting. A rank
that dies without raising (killed, segfault) is caught by torchrun, which stops the job, or
else by the process-group timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from modiff_trt.errors import ConfigError, ModiffError

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0  # the longest one batch may take on the slowest rank (a collective waits for it)


class RankFailedError(ModiffError):
    """Another rank of a distributed run failed; this rank stops too."""


@dataclass(frozen=True)
class World:
    """This process's place in the job; `World()` is a single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only rank that writes files or prints results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self) -> torch.device:
        """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def batch_starts(self, num_images: int, batch_size: int) -> range:
        """First image index of each batch this rank runs: batches rank, rank+W, rank+2W, ..."""
        return range(self.rank * batch_size, num_images, self.size * batch_size)

    def rounds(self, num_images: int, batch_size: int) -> int:
        """Rounds of collection: every rank takes part in each, with a batch or with nothing."""
        batches = -(-num_images // batch_size)
        return -(-batches // self.size)

    def check(self, error: BaseException | None) -> None:
        """Tell every rank whether this one failed; raise on every rank if any did.

        The failing rank re-raises its own error, the others a `RankFailedError` naming it, so
        the job ends everywhere with that rank's message. Either is marked as exchanged: an
        enclosing `together` lets it pass without a second exchange, which the ranks that already
        left would never answer.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        message = None if error is None else f"{type(error).__name__}: {error}"
        statuses: list[str | None] = [None] * self.size
        dist.all_gather_object(statuses, message)
        failed = [(rank, msg) for rank, msg in enumerate(statuses) if msg is not None]
        if error is not None:
            raise _exchanged(error)
        if failed:
            rank, msg = failed[0]
            stopped = RankFailedError(f"rank {rank} of {self.size} failed, so rank {self.rank} stopped too: {msg}")
            raise _exchanged(stopped)

    def gather(self, item: Any) -> list[Any] | None:
        """Every rank's `item` on rank 0 (in rank order); None on the other ranks."""
        if not self.distributed:
            return [item]
        import torch.distributed as dist

        received: list[Any] | None = [None] * self.size if self.main else None
        dist.gather_object(item, received, dst=0)
        return received


SINGLE_PROCESS = World()
_EXCHANGED = "_modiff_exchanged"  # set on an error every rank has already heard of


def _exchanged(error: BaseException) -> BaseException:
    setattr(error, _EXCHANGED, True)
    return error


def world_from_env(environ: dict[str, str] | None = None) -> World:
    """The World a launcher describes through RANK/WORLD_SIZE/LOCAL_RANK; World() without them."""
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local_rank}: need 0 <= RANK < WORLD_SIZE")
    if size > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={size} but {', '.join(missing)} is not set: launch with torchrun, "
                "or set MASTER_ADDR and MASTER_PORT to rank 0's address and a free port"
            )
    return World(rank=rank, size=size, local_rank=local_rank)


def current_world() -> World:
    """The World of the process group `process_group` joined, or a single process outside one."""
    import torch.distributed as dist

    return world_from_env() if dist.is_available() and dist.is_initialized() else SINGLE_PROCESS


@contextlib.contextmanager
def process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[World]:
    """Join the job the environment describes (nccl on GPUs, gloo on CPUs) for the `with` block.

    Single-process runs skip torch.distributed entirely. On a GPU machine the rank's device
    becomes cuda:LOCAL_RANK, so every backend's default CUDA device is its own GPU.
    """
    world = world_from_env()
    if not world.distributed:
        yield world
        return
    import torch.distributed as dist

    if torch.cuda.is_available():
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={world.local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(world.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend, rank=world.rank, world_size=world.size, timeout=datetime.timedelta(seconds=timeout_s)
    )
    log.debug("rank %d of %d joined (%s, %s)", world.rank, world.size, backend, world.device())
    try:
        yield world
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def together(world: World) -> Iterator[None]:
    """Run the block on every rank and fail on all of them if it fails on one (setup steps).

    An error from a `check` inside the block (`run_batches`, a nested `together`) was already
    exchanged, on every rank: it passes through, so each rank takes part in the same exchanges.
    """
    try:
        yield
    except Exception as exc:
        if not getattr(exc, _EXCHANGED, False):
            world.check(exc)
        raise
    world.check(None)


def run_batches(
    world: World,
    num_images: int,
    batch_size: int,
    run_batch: Callable[[list[int]], T],
    deliver: Callable[[int, T], None] | None = None,
) -> None:
    """Run this rank's batches; on rank 0, `deliver(first_index, result)` each batch of the whole run.

    Rank 0 gets the batches round by round, in batch order; the other ranks never call
    `deliver`. An error in `run_batch` on any rank raises on every rank after that round.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError("num_images and batch_size must be >= 1")
    starts = world.batch_starts(num_images, batch_size)
    for round_index in range(world.rounds(num_images, batch_size)):
        start = starts[round_index] if round_index < len(starts) else None
        result, error = None, None
        if start is not None:
            try:
                result = run_batch(list(range(start, min(start + batch_size, num_images))))
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or they would wait for this one
                error = exc
        world.check(error)
        for item in world.gather(None if start is None else (start, result)) or []:
            if item is not None and deliver is not None:
                deliver(*item)
