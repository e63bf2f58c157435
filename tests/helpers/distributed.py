"""Running code in several processes joined by gloo on 127.0.0.1, for the distributed tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from modiff_trt.sampling.distributed import World, process_group, run_batches, together

JOIN_TIMEOUT_S = 120
CLI_TIMEOUT_S = 600  # generous: the test machine's 2 cores are shared


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun would set for local rank `rank` of a one-node job on the loopback interface."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _worker(rank: int, world_size: int, port: int, fn: Callable[[World], object], results) -> None:
    os.environ.update(loopback_env(rank, world_size, port))
    torch.set_num_threads(1)
    try:
        with process_group(timeout_s=60) as world:
            results[rank] = ("ok", fn(world))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which asserts on it
        results[rank] = (type(exc).__name__, str(exc))


def run_in_processes(fn: Callable[[World], object], world_size: int = 2) -> dict[int, tuple[str, object]]:
    """`fn(world)` on every rank; {rank: ("ok", result) or (exception class, message)}."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        processes = [
            ctx.Process(target=_worker, args=(rank, world_size, port, fn, results)) for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
        return dict(results)


def collect_batches(world: World, num_images: int = 11, batch_size: int = 3) -> list[tuple[int, int, list[int]]]:
    """(first index, rank that ran it, indices) of every batch, as rank 0 receives them."""
    delivered: list[tuple[int, int, list[int]]] = []
    run_batches(
        world,
        num_images,
        batch_size,
        lambda indices: (world.rank, indices),
        lambda start, result: delivered.append((start, *result)),
    )
    return delivered


def fail_on_rank_1(world: World) -> None:
    """Rank 1's second batch raises; rank 0 must stop too instead of waiting for it."""

    def run(indices: list[int]) -> list[int]:
        if world.rank == 1 and indices[0] > 3:
            raise ValueError(f"cannot run batch {indices}")
        return indices

    run_batches(world, 11, 2, run)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `modiff_trt` subprocess: this checkout first, one intra-op thread."""
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])), OMP_NUM_THREADS="1", **extra)
    return env


def run_cli(args: list[str], timeout: float = CLI_TIMEOUT_S, **env: str) -> subprocess.CompletedProcess:
    """`python -m modiff_trt ARGS` in one process."""
    return subprocess.run(
        [sys.executable, "-m", "modiff_trt", *args],
        env=cli_env(**env),
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


def torchrun_cli(args: list[str], nproc: int = 2, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node NPROC -m modiff_trt ARGS` on 127.0.0.1 (gloo: no GPU here)."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]
    return subprocess.run(
        [*launcher, "-m", "modiff_trt", *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def launch_ranks(args_per_rank: list[list[str]], timeout: float = CLI_TIMEOUT_S) -> list[subprocess.Popen]:
    """One `python -m modiff_trt` per rank with torchrun's variables set by hand (any launcher does this)."""
    port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "modiff_trt", *args],
            env=cli_env(**loopback_env(rank, len(args_per_rank), port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, args in enumerate(args_per_rank)
    ]
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
    return processes


def fail_in_setup_on_rank_1(world: World) -> None:
    """Rank 1 fails before its batches while rank 0 is already in them (a setup step of `sample`)."""
    with together(world):
        if world.rank == 1:
            raise ValueError("no export on rank 1")
        run_batches(world, 4, 2, lambda indices: indices)
