"""Data-parallel sampling: batch assignment, rank-0 collection, failure propagation, the streaming writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modiff_trt.errors import ConfigError
from modiff_trt.sampling.distributed import World, world_from_env
from modiff_trt.sampling.images import to_uint8
from modiff_trt.sampling.writer import sample_writer
from tests.helpers.distributed import (
    collect_batches,
    fail_in_setup_on_rank_1,
    fail_on_rank_1,
    launch_ranks,
    loopback_env,
    run_cli,
    run_in_processes,
    torchrun_cli,
)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("num_images,batch_size", [(11, 3), (4, 4), (7, 2), (1, 8)])
def test_each_batch_of_the_single_process_run_goes_to_exactly_one_rank(size, num_images, batch_size):
    single = World().batch_starts(num_images, batch_size)
    shares = [World(rank, size).batch_starts(num_images, batch_size) for rank in range(size)]
    assert sorted(start for share in shares for start in share) == list(single)
    for rank, share in enumerate(shares):
        assert all((start // batch_size) % size == rank for start in share)
        assert len(share) <= World(rank, size).rounds(num_images, batch_size)


def test_world_comes_from_the_launcher_environment():
    assert world_from_env({}) == World()
    assert world_from_env(loopback_env(1, 4, 29500) | {"LOCAL_RANK": "0"}) == World(1, 4, 0)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        world_from_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="RANK=2, WORLD_SIZE=2"):
        world_from_env(loopback_env(2, 2, 29500))


def test_rank_0_receives_every_batch_in_order_from_the_rank_that_ran_it():
    results = run_in_processes(collect_batches)
    assert results[1] == ("ok", [])
    status, delivered = results[0]
    assert status == "ok"
    assert [start for start, _, _ in delivered] == [0, 3, 6, 9]
    assert [rank for _, rank, _ in delivered] == [0, 1, 0, 1]
    assert delivered[-1][2] == [9, 10]


def test_a_failing_rank_stops_every_rank_with_its_message():
    results = run_in_processes(fail_on_rank_1)
    assert results[1] == ("ValueError", "cannot run batch [6, 7]")
    assert results[0][0] == "RankFailedError"
    assert "rank 1 of 2 failed" in results[0][1] and "ValueError: cannot run batch [6, 7]" in results[0][1]


def test_an_error_is_exchanged_once_even_when_ranks_fail_at_different_depths():
    # rank 0 hears of rank 1's setup error inside run_batches; the enclosing together must not ask again
    results = run_in_processes(fail_in_setup_on_rank_1)
    assert results[1] == ("ValueError", "no export on rank 1")
    assert results[0] == (
        "RankFailedError",
        "rank 1 of 2 failed, so rank 0 stopped too: ValueError: no export on rank 1",
    )


def _batch(start: int, n: int) -> torch.Tensor:
    return torch.linspace(-1.2, 1.2, n * 3 * 4 * 4).reshape(n, 3, 4, 4) * (start + 1) / 7


def test_writer_streams_batches_in_any_order_into_the_npz_np_savez_would_write(tmp_path):
    starts = [(6, 1), (0, 3), (3, 3)]
    with sample_writer(tmp_path, 7, grid_images=4) as writer:
        for start, n in starts:
            writer.add(start, _batch(start, n), z0=_batch(start, n)[:, :1])
        path = writer.finish()
    x0 = torch.cat([_batch(s, n) for s, n in sorted(starts)])
    with np.load(path) as npz:
        assert sorted(npz.files) == ["arr_0", "x0", "z0"]
        assert npz["x0"].tobytes() == x0.numpy().tobytes()
        np.testing.assert_array_equal(npz["arr_0"], to_uint8(x0))
        assert npz["z0"].shape == (7, 1, 4, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:06d}.png" for i in range(7)] + [
        "grid.png",
        "samples.npz",
    ]


def test_writer_interrupted_leaves_only_complete_pngs(tmp_path):
    with pytest.raises(RuntimeError, match="3 of 7 samples"), sample_writer(tmp_path, 7) as writer:
        writer.add(0, _batch(0, 3))
        writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.png", "000001.png", "000002.png"]


def _npz_bytes(path):
    with np.load(path) as npz:
        return {name: npz[name].tobytes() for name in ("arr_0", "x0")}


def _check_same_samples_with_two_processes(tmp_path, args):
    single = run_cli([*args, "-o", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    both = torchrun_cli([*args, "-o", str(tmp_path / "two")])
    assert both.returncode == 0, both.stderr
    assert _npz_bytes(tmp_path / "two" / "samples.npz") == _npz_bytes(tmp_path / "one" / "samples.npz")
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert (
        sorted(p.name for p in (tmp_path / "two").iterdir())
        == files
        == [f"{i:06d}.png" for i in range(5)] + ["grid.png", "samples.npz"]
    )


# 5 images at batch 2: neither the batch size nor the world size divides the image count
COMMON = ["-n", "5", "--batch-size", "2", "--steps", "3"]


@pytest.mark.slow
def test_torchrun_two_processes_write_the_single_process_samples_torch_dynamic(tmp_path, tiny_config, tiny_checkpoint):
    _check_same_samples_with_two_processes(
        tmp_path, ["sample", "-c", str(tiny_config), "--checkpoint", str(tiny_checkpoint), *COMMON]
    )


@pytest.fixture
def static_export(tmp_path, tiny_config, tiny_checkpoint):
    cal, out = tmp_path / "cal.safetensors", tmp_path / "export"
    base = ["-c", str(tiny_config), "--checkpoint", str(tiny_checkpoint)]
    for args in (
        ["calibrate", *base, "--steps", "3", "--cali-n", "4", "--cali-st", "3", "-o", str(cal)],
        ["export", *base, "--calibration", str(cal), "-o", str(out)],
    ):
        result = run_cli(args)
        assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_torchrun_two_processes_write_the_single_process_samples_ort_static(tmp_path, static_export):
    _check_same_samples_with_two_processes(tmp_path, ["sample", str(static_export), "--backend", "ort", *COMMON])


@pytest.mark.slow
def test_a_rank_missing_its_export_ends_the_whole_run_with_its_message(tmp_path, static_export):
    args = ["--backend", "ort", *COMMON, "-o", str(tmp_path / "out")]
    rank0, rank1 = launch_ranks([["sample", str(static_export), *args], ["sample", str(tmp_path / "missing"), *args]])
    assert rank1.returncode != 0 and "missing" in rank1.stderr.read()
    assert rank0.returncode != 0 and "rank 1 of 2 failed" in rank0.stderr.read()
    assert not (tmp_path / "out" / "samples.npz").exists()
