"""The MoDiff reference: quantizer conventions, state semantics over whole trajectories."""

from __future__ import annotations

import pytest
import torch

from modiff_trt.errors import ConfigError
from modiff_trt.quant import LayerScales, QuantConfig, ScaleSet, quantize_unet
from modiff_trt.quant.quantizers import fake_quantize, per_channel_weight, symmetric_scale
from modiff_trt.sampling import ddim_sample, ddim_timesteps, make_betas
from tests.helpers.models import rel_err

SEQ, BETAS = ddim_timesteps(10, "quad"), make_betas("linear", 1e-4, 0.02).float()


def trajectory(model, noise, record=None):
    xs = []
    ddim_sample(model, noise, SEQ, BETAS, callback=lambda i, t, x: xs.append(x.clone()))
    return torch.stack(xs)


@pytest.fixture
def noise():
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_round_half_to_even_and_clamp():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 300.0, -300.0])
    assert fake_quantize(x, torch.tensor(1.0), 8).tolist() == [0, 2, 2, 0, -2, 127, -128]
    assert fake_quantize(x, torch.tensor(1.0), 4).tolist() == [0, 2, 2, 0, -2, 7, -8]


def test_symmetric_per_channel_weight_scale():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]])
    codes, scale, zp = per_channel_weight(w, 8)
    assert zp is None
    assert torch.allclose(scale.flatten(), torch.tensor([2 / 127, 0.5 / 127, 1e-8]))
    assert codes[0].tolist() == [64, -127] and codes[2].tolist() == [0, 0]


def test_weight_only_modulated_path_equals_float_model(tiny_model, noise):
    """Quantization off: MoDiff's o_hat bookkeeping must reproduce the float trajectory."""
    q = quantize_unet(tiny_model, QuantConfig(weight_bits=None, act_bits=None))
    assert rel_err(trajectory(q, noise), trajectory(tiny_model, noise)) < 1e-5


def test_o_hat_equals_f_of_a_hat_plus_bias_over_trajectory(tiny_model, noise):
    q = quantize_unet(tiny_model, QuantConfig(weight_bits=8, act_bits=4))
    worst = []

    def check(step, t, x):
        for layer in q.layers.values():
            want = layer.apply_weight(layer.a_hat, bias=True)
            worst.append(rel_err(layer.o_hat, want))

    ddim_sample(q, noise, SEQ, BETAS, callback=check)
    assert len(worst) == len(SEQ) * len(q.layers) and max(worst) < 1e-4


def test_modiff_beats_plain_at_4bit_activations(tiny_model, noise):
    fp = trajectory(tiny_model, noise)[-1]
    plain = trajectory(quantize_unet(tiny_model, QuantConfig(8, 4, modulate=False)), noise)[-1]
    modiff = trajectory(quantize_unet(tiny_model, QuantConfig(8, 4, modulate=True)), noise)[-1]
    assert rel_err(modiff, fp) < 0.5 * rel_err(plain, fp)


def test_bias_only_in_warmup_and_state_resets(tiny_model):
    q = quantize_unet(tiny_model, QuantConfig(8, 8))
    layer = q.layers["conv_in"]
    x = torch.randn(2, 3, 16, 16)
    first = layer(x)
    assert torch.equal(layer.a_hat, x)  # fp warm-up: a_hat is the float input
    second = layer(x)  # zero residual: nothing new may be added, in particular not the bias again
    assert torch.equal(first, second)
    q.reset_state()
    assert layer.a_hat is None and layer.o_hat is None


def test_quantized_warmup_uses_q0(tiny_model):
    q = quantize_unet(tiny_model, QuantConfig(8, 4, first_step="quantized"))
    layer = q.layers["conv_in"]
    x = torch.randn(2, 3, 16, 16)
    layer(x)
    scale = symmetric_scale(x.abs().amax(), 4)
    assert torch.equal(layer.a_hat, fake_quantize(x, scale, 4))


def test_dynamic_scale_is_per_tensor_over_whole_batch(tiny_model):
    q = quantize_unet(tiny_model, QuantConfig(None, 4, modulate=False))
    layer = q.layers["conv_in"]
    x = torch.randn(2, 3, 16, 16)
    x[1] *= 100  # one loud sample sets the scale for the whole batch
    scale = symmetric_scale(x.abs().amax(), 4)
    want = torch.nn.functional.conv2d(fake_quantize(x, scale, 4), layer.w_deq, layer.module.bias, padding=1)
    assert torch.allclose(layer(x), want, atol=1e-6)


def test_split_groups_get_their_own_scales(tiny_model):
    q = quantize_unet(tiny_model, QuantConfig(None, 4, modulate=False, split=True))
    name, split = next(iter(tiny_model.split_points().items()))
    layer = q.layers[name]
    assert layer.split == split and len(layer.groups) == 2
    x = torch.randn(1, layer.module.in_channels, 16, 16)
    x[:, :split] *= 1000
    got = layer._quantize_act(x, None, None)
    assert rel_err(got[:, split:], x[:, split:]) < 0.2  # small group not crushed by the loud one


def test_fp16_state_is_stored_in_fp16(tiny_model, noise):
    q = quantize_unet(tiny_model, QuantConfig(8, 8, state_dtype="float16"))
    out = trajectory(q, noise)[-1]
    assert q.layers["conv_in"].a_hat.dtype == torch.float16
    assert rel_err(out, trajectory(quantize_unet(tiny_model, QuantConfig(8, 8)), noise)[-1]) < 0.05


def test_scaled_state_layout_keeps_a_hat_in_units_of_the_residual_scale(tiny_model, noise):
    """state_layout 'scaled': the stored A times the layer's unit is a_hat (fp32: the same trajectory
    as the plain layout to float rounding), and in fp16 it stays as close to the fp32 state as fp16
    state does (on this tiny random model both differ by ~2%, mostly from codes flipping at rounding
    boundaries: the digits PSNR in BENCHMARKS.md `quality-state` is the measure)."""
    from tests.helpers.export import SHAPE, absmax_scales

    scales = absmax_scales(tiny_model, QuantConfig(8, 4), SHAPE)

    def run(**state):
        q = quantize_unet(tiny_model, QuantConfig(8, 4, act_scales="static", **state), scales)
        return q, trajectory(q, noise)[-1]

    plain, want = run()
    scaled, got = run(state_layout="scaled")
    assert rel_err(got, want) < 1e-4
    layer = scaled.layers["conv_in"]
    assert torch.allclose(layer.a_hat * layer.state_unit(), plain.layers["conv_in"].a_hat, rtol=1e-4, atol=1e-6)
    _, fp16 = run(state_dtype="float16")
    _, scaled16 = run(state_dtype="float16", state_layout="scaled")
    assert rel_err(scaled16, want) < max(0.05, 1.5 * rel_err(fp16, want))


def test_static_scales_need_calibration_and_matching_layers(tiny_model):
    with pytest.raises(ConfigError, match="calibrate"):
        quantize_unet(tiny_model, QuantConfig(8, 8, act_scales="static"))
    wrong = ScaleSet(modulate=False, layers={}, source="cal.safetensors")
    with pytest.raises(ConfigError, match="raw activations"):
        quantize_unet(tiny_model, QuantConfig(8, 8, act_scales="static"), wrong)
    partial = ScaleSet(modulate=True, layers={"conv_in": LayerScales(act=[0.1])}, source="cal.safetensors")
    with pytest.raises(ConfigError, match="missing"):
        quantize_unet(tiny_model, QuantConfig(8, 8, act_scales="static"), partial)


def test_static_scales_are_used(tiny_model):
    q0 = quantize_unet(tiny_model, QuantConfig(8, 8, modulate=False))
    names = list(q0.layers)
    scales = ScaleSet(modulate=False, layers={n: LayerScales(act=[0.05] * len(q0.layers[n].groups)) for n in names})
    q = quantize_unet(tiny_model, QuantConfig(8, 8, modulate=False, act_scales="static"), scales)
    layer = q.layers["conv_in"]
    x = torch.randn(1, 3, 16, 16)
    want = torch.nn.functional.conv2d(
        fake_quantize(x, torch.tensor(0.05), 8), layer.w_deq, layer.module.bias, padding=1
    )
    assert torch.allclose(layer(x), want, atol=1e-6)


def test_config_validation():
    with pytest.raises(ConfigError, match="act_bits=9"):
        QuantConfig(act_bits=9)
    with pytest.raises(ConfigError, match="first_step"):
        QuantConfig(first_step="float")
    assert QuantConfig(8, 4).label == "modiff-w8a4" and QuantConfig(None, None).label == "fp32"
