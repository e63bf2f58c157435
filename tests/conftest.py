"""Shared fixtures: a tiny DDIM config on disk, its model and checkpoint (helpers: tests/helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from modiff_trt.models import DDIMUNet
from tests.helpers.models import ddim_yaml, tiny_unet


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(ddim_yaml()))
    return path


@pytest.fixture
def tiny_model() -> DDIMUNet:
    return tiny_unet()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_model: DDIMUNet) -> Path:
    path = tmp_path / "tiny.ckpt"
    torch.save(tiny_model.state_dict(), path)
    return path
