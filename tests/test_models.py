"""Loading DDIM UNets from every supported checkpoint layout, and the errors for bad input."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from modiff_trt.errors import CheckpointError, ConfigError
from modiff_trt.models import (
    DDIMModelConfig,
    LatentModelConfig,
    builtin_names,
    load_config,
    load_unet,
)
from modiff_trt.models.ddim_unet import timestep_embedding
from tests.helpers.models import ddim_yaml, rel_err, tiny_unet


def _forward(model):
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 871.0])
    with torch.no_grad():
        return model(x, t)


def test_cifar10_builtin_has_official_size():
    model = load_unet("ddim-cifar10", None)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 113
    assert "down.1.attn.0.q.weight" in model.state_dict()
    assert "mid.block_1.temb_proj.weight" in model.state_dict()


def test_timestep_embedding_is_sin_then_cos():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    assert torch.allclose(emb[1, :4], torch.sin(10 * freqs)) and torch.allclose(emb[1, 4:], torch.cos(10 * freqs))


@pytest.mark.parametrize("layout", ["flat", "training_list", "qdiffusion", "safetensors", "lightning_dict"])
def test_checkpoint_layouts_load(tmp_path, tiny_config, tiny_model, layout):
    state = tiny_model.state_dict()
    path = tmp_path / f"ckpt.{layout}"
    if layout == "flat":
        torch.save(state, path)
    elif layout == "training_list":
        # ddim training: [model, optimizer, epoch, step, ema]; DataParallel prefixes `module.`.
        other = {f"module.{k}": torch.zeros_like(v) for k, v in state.items()}
        ema = {f"module.{k}": v for k, v in state.items()}
        torch.save([other, {"state": {}, "param_groups": []}, 10, 1000, ema], path)
    elif layout == "qdiffusion":
        wrapped = {f"model.{k}": v for k, v in state.items()}
        wrapped["model.conv_in.weight_quantizer.delta"] = torch.ones(32, 1, 1, 1)
        wrapped["model.conv_in.act_quantizer.zero_point"] = torch.tensor(0.0)
        torch.save(wrapped, path)
    elif layout == "safetensors":
        path = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = load_unet(tiny_config, path)
    assert rel_err(_forward(loaded), _forward(tiny_model)) == 0.0


def test_training_list_uses_ema_not_first_state(tmp_path, tiny_config, tiny_model):
    state = tiny_model.state_dict()
    torch.save([{k: torch.zeros_like(v) for k, v in state.items()}, {}, 1, 2, state], tmp_path / "c.ckpt")
    assert torch.equal(load_unet(tiny_config, tmp_path / "c.ckpt").conv_in.weight, tiny_model.conv_in.weight)


def test_shape_mismatch_lists_differences(tmp_path, tiny_config):
    other = tiny_unet(ch=64)
    torch.save(other.state_dict(), tmp_path / "wide.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_unet(tiny_config, tmp_path / "wide.ckpt")
    msg = str(err.value)
    assert "wide.ckpt" in msg and "shape mismatch" in msg
    assert "conv_in.weight: checkpoint (64, 3, 3, 3) vs model (32, 3, 3, 3)" in msg


def test_missing_keys_suggest_fitting_builtin(tmp_path, tiny_config):
    torch.save(load_unet("ddim-cifar10", None).state_dict(), tmp_path / "cifar.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_unet(tiny_config, tmp_path / "cifar.ckpt")
    assert "'ddim-cifar10' fits this checkpoint" in str(err.value)
    assert "unexpected" in str(err.value)


def test_bad_files_give_clear_errors(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="not found"):
        load_unet(tiny_config, tmp_path / "nope.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_unet(tiny_config, tmp_path / "text.ckpt")
    good = tmp_path / "good.ckpt"
    torch.save(tiny_unet().state_dict(), good)
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_unet(tiny_config, tmp_path / "cut.ckpt")


class NotATensor:  # pickled by the test to stand for a checkpoint holding arbitrary objects
    pass


def test_untrusted_pickle_is_refused_with_the_way_forward(tmp_path, tiny_config, tiny_model):
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "args": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_unet(tiny_config, path)
    assert isinstance(load_unet(tiny_config, path, trust=True), torch.nn.Module)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="built-in"):
        load_config("no-such-model")
    bad = ddim_yaml()
    del bad["model"]["ch"]
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="'ch'"):
        load_config(tmp_path / "bad.yml")
    (tmp_path / "broken.yml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yml")
    assert builtin_names() == ["ddim-cifar10", "digits", "ldm-bedrooms", "ldm-churches", "sd-v1"]


def test_unknown_config_name_lists_every_builtin():
    with pytest.raises(ConfigError) as err:
        load_config("no-such-model")
    assert str(err.value).endswith("built-ins: ddim-cifar10, digits, ldm-bedrooms, ldm-churches, sd-v1")


def test_each_family_is_its_own_config_type():
    ddim, sd = load_config("digits"), load_config("sd-v1")
    assert isinstance(ddim, DDIMModelConfig) and isinstance(sd, LatentModelConfig)
    assert not isinstance(ddim, LatentModelConfig) and not hasattr(ddim, "ldm")
    assert (ddim.family, sd.family) == ("ddim", "sd")
    assert sd.unet is sd.ldm.unet and sd.sample_shape == sd.ldm.latent_shape


def test_wrong_resolution_is_refused(tiny_model):
    with pytest.raises(ValueError, match="16x16"):
        tiny_model(torch.randn(1, 3, 32, 32), torch.tensor([1.0]))
