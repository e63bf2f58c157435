"""`export_model`: checkpoint + calibration -> an export directory (graphs + manifest).

MoDiff exports two graphs: `warmup.onnx` (first step of a batch: creates every layer's
`a_hat`/`o_hat`) and `step.onnx` (every later step: consumes and returns them). A plain
Q-Diffusion export has one stateless `unet.onnx`; a copy of the calibration
(`calibration.safetensors`) makes the directory self-contained. Everything is written to a temp directory,
linted (`inspect --lint`'s rules) and only then renamed into place, so an interrupted export
leaves nothing half-written and a graph that breaks TensorRT's rules is never written at all.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from modiff_trt import __version__
from modiff_trt.atomic import atomic_directory, check_destination
from modiff_trt.errors import ArtifactError, ConfigError
from modiff_trt.export.fp16 import convert_to_fp16
from modiff_trt.export.lint import lint_export
from modiff_trt.export.manifest import (
    CALIBRATION_COPY,
    MANIFEST_NAME,
    CalibrationSection,
    ExportSection,
    GraphSpec,
    LayerSpec,
    Manifest,
    ModelSection,
    StepGroupsSection,
    sha256_file,
    sha256_graph,
    tensor_specs,
)
from modiff_trt.export.onnx_float import export_float_onnx
from modiff_trt.export.ort_cpu import integer_kernel
from modiff_trt.export.qdq import (
    floored_scales,
    insert_quantization,
    qdq_kernel,
    scale_floor,
    step_ratio_table,
)
from modiff_trt.export.replace import check_replaceable_export
from modiff_trt.export.shared_state import a_hat_owners
from modiff_trt.export.sites import find_sites
from modiff_trt.export.weight_store import WeightStore
from modiff_trt.models.config import ModelConfig
from modiff_trt.models.registry import load_config
from modiff_trt.quant import QuantConfig, QuantUNet
from modiff_trt.sampling.sampler import Sampler, make_sampler

log = logging.getLogger(__name__)
DEFAULT_OPSET = {"float32": 17, "float16": 19}
FLOAT_FORMAT_OPSET = 19  # QuantizeLinear/DequantizeLinear to FLOAT8E4M3FN (FP8, NVFP4 block scales)
KERNELS = {"trt": qdq_kernel, "ort-cpu": integer_kernel}  # how each target emits a quantized Op
MAX_IR_VERSION = 10  # TensorRT 10 and onnxruntime read IR <= 10
STREAM_BYTES = 256 * 2**20  # models whose weights pass this stream them to `<graph>.data` (protobuf stops at 2 GB)


def _state_shapes(
    float_model: torch.nn.Module,
    layers: list[str],
    sample_shape: tuple[int, ...],
    context_shape: tuple[int, ...] | None = None,
) -> dict[str, tuple[list[int], list[int]]]:
    """Per-sample input/output shape of every layer (= a_hat / o_hat), from one float call at
    batch 1 (with a context for cross-attention UNets: the attn2 key/value layers read it).

    The float model, not the quantized one: its forward keeps no MoDiff state, which for SD v1
    would be 1.7 GB held just to read shapes."""
    shapes: dict[str, tuple[list[int], list[int]]] = {}
    hooks = [
        float_model.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: shapes.__setitem__(name, (list(args[0].shape[1:]), list(out.shape[1:])))
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            context = None if context_shape is None else torch.zeros(1, *context_shape)
            t = torch.full((1,), 500.0)
            x = torch.zeros(1, *sample_shape)
            float_model(x, t) if context is None else float_model(x, t, context=context)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def streams_weights(qmodel: QuantUNet, float_dtype: str) -> bool:
    """Whether the export writes weights to `<graph>.data` as it goes (`WeightStore`) rather than
    into the graph: when a graph's float weights would pass STREAM_BYTES."""
    itemsize = np.dtype(float_dtype).itemsize
    return sum(layer.module.weight.numel() for layer in qmodel.layers.values()) * itemsize > STREAM_BYTES


def _save_graph(graph: onnx.ModelProto, path: Path, store: WeightStore) -> None:
    """Save, then check with full type inference. A streamed graph's weights are already in
    `<file>.data` beside it (the store's file), so the graph is checked from disk."""
    graph.ir_version = min(graph.ir_version, MAX_IR_VERSION)
    if store.path is not None:
        store.close()
        onnx.save(graph, str(path))
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.checker.check_model(graph, full_check=True)
        onnx.save(graph, str(path))


def _layer_table(
    qmodel: QuantUNet, shapes: dict[str, tuple[list[int], list[int]]], owners: dict[str, str]
) -> list[LayerSpec]:
    table = []
    for name, layer in qmodel.layers.items():
        s = layer.scales
        table.append(
            LayerSpec(
                name=name,
                kind=layer.kind,
                weight_bits=layer.weight_bits or 0,
                act_bits=layer.act_bits or 0,
                act_scale=None if s.act is None else [float(v) for v in s.act],
                warmup_act_scale=None if s.warmup is None else [float(v) for v in s.warmup],
                a_hat_shape=shapes[name][0],
                o_hat_shape=shapes[name][1],
                act_zero_point=None if s.act_zero_point is None else [float(v) for v in s.act_zero_point],
                constant_input=s.constant_input,
                a_hat_owner=owners.get(name),
                act_format=layer.format.format,
                format_note=layer.format.note,
            )
        )
    return table


def _keep_calibration(calibration: str | Path, export_dir: Path, weight_method: str | None) -> CalibrationSection:
    """Copy the calibration into the export and record where it came from, the copy's sha256 and
    what made the integer weights (`inspect` shows it).

    The export is then self-contained: its torch reference (`compare`, `sample --backend torch`)
    reads the copy, never a path that may since hold another calibration.
    """
    copy = export_dir / CALIBRATION_COPY
    shutil.copyfile(calibration, copy)
    return CalibrationSection(
        path=str(Path(calibration).resolve()), sha256=sha256_file(copy), weight_method=weight_method or "minmax"
    )


def check_exportable(config: QuantConfig) -> None:
    """TensorRT's explicit quantization rules that a QuantConfig must meet before export."""
    if config.format_layers == "all" and config.act_bits is not None and config.act_format != "int":
        raise ConfigError(
            f"format_layers='all' puts {config.act_format} on layers TensorRT cannot run it on (a reference-only "
            "study): export with format_layers='tensorrt', where those layers fall back per docs/formats.md"
        )
    if config.act_bits is not None and config.act_scales != "static":
        raise ConfigError(
            "export needs static activation scales (TensorRT scales are build-time constants): "
            "pass --calibration FILE from `modiff-trt calibrate`, or --act-bits 0 for weight-only"
        )
    if not config.act_symmetric:
        raise ConfigError(
            "TensorRT needs symmetric activation quantization (zero point 0): drop asymmetric activations"
        )


def export_model(
    float_model: torch.nn.Module,
    qmodel: QuantUNet,
    model_cfg: ModelConfig | str,
    out: str | Path,
    checkpoint: str | Path | None = None,
    calibration: str | Path | None = None,
    sampler: Sampler | None = None,
    float_dtype: str = "float32",
    opset: int | None = None,
    batch_size: int | None = None,
    target: str = "trt",
    guidance: bool = False,
    ema: bool = False,
) -> Manifest:
    """Write `out/` for `qmodel`, the quantized reference of `float_model`; return the manifest.

    The float model is traced (its parameter names locate the layers); `qmodel` supplies the
    integer weights, scales and state shapes. `target` 'trt' follows TensorRT's Q/DQ rules;
    'ort-cpu' runs quantized ops on ONNX Runtime's integer CPU kernels (docs/cpu-integer.md).
    `sampler` (the calibration's, default the config's paper settings) is recorded as the
    manifest's `sampling`, the default of every later `sample`. Text-conditioned configs get a
    `context` input. `guidance`: the engines will run
    classifier-free guidance, so each image owns two state slots (cond + uncond); recorded as
    `export.state_batch_multiplier` = 2 so memory figures count both.
    """
    check_destination(out, check_replaceable_export)
    model_cfg = model_cfg if isinstance(model_cfg, ModelConfig) else load_config(model_cfg)
    config = qmodel.config
    check_exportable(config)
    if target not in KERNELS:
        raise ConfigError(f"target {target!r}: choose one of {', '.join(KERNELS)}")
    if float_dtype not in DEFAULT_OPSET:
        raise ConfigError(f"float dtype {float_dtype!r}: choose float32 or float16")
    float_formats = sorted({layer.format.format for layer in qmodel.layers.values() if layer.act_bits} - {"int"})
    opset = opset or max(DEFAULT_OPSET[float_dtype], FLOAT_FORMAT_OPSET if float_formats else 0)
    if not 17 <= opset <= 20:
        raise ConfigError(f"opset {opset} is outside 17..20, the range TensorRT 10 and onnxruntime both parse")
    if float_formats and opset < FLOAT_FORMAT_OPSET:
        raise ConfigError(
            f"{'/'.join(float_formats)} activations need FP8 Q/DQ, opset >= {FLOAT_FORMAT_OPSET} (got --opset {opset})"
        )
    started = time.perf_counter()
    sample_shape = tuple(model_cfg.sample_shape)
    context_shape = model_cfg.context_shape
    if guidance and context_shape is None:
        raise ConfigError(f"{model_cfg.source} takes no text context: classifier-free guidance (--cfg) does not apply")
    sampler = sampler or make_sampler(model_cfg)
    if qmodel.step_groups is not None:  # the manifest's sampler must run the schedule the groups are pinned to
        qmodel.step_groups.check_timesteps(sampler.timesteps(), str(calibration or "the scales"))
    shapes = _state_shapes(float_model.eval(), list(qmodel.layers), sample_shape, context_shape)
    if float_dtype == "float16" and opset < 19:
        raise ConfigError(f"fp16 Q/DQ scales need opset >= 19 (got --opset {opset})")
    float_graph = export_float_onnx(float_model, sample_shape, opset, batch_size, context_shape, list(qmodel.layers))
    sites = find_sites(float_graph.graph, qmodel.layers)
    if float_dtype == "float16":
        float_graph, sites = convert_to_fp16(float_graph, sites)
    owners = a_hat_owners(qmodel.layers, sites) if config.modulate else {}
    if owners:
        log.info("%d layer(s) read an earlier layer's a_hat (same input, same quantizer)", len(owners))
    kinds = ["warmup", "step"] if config.modulate else ["plain"]
    graphs: dict[str, GraphSpec] = {}
    out = Path(out)
    streams = streams_weights(qmodel, float_dtype)
    with atomic_directory(out, check_replaceable_export) as tmp:
        for kind in kinds:
            file = "unet.onnx" if kind == "plain" else f"{kind}.onnx"
            with WeightStore(tmp / f"{file}.data" if streams else None) as store:
                graph = insert_quantization(
                    float_graph,
                    qmodel,
                    sites,
                    kind,
                    shapes,
                    float_dtype,
                    config.state_dtype,
                    KERNELS[target],
                    store,
                    owners,
                )
                _save_graph(graph, tmp / file, store)
            key = "unet" if kind == "plain" else kind
            graphs[key] = GraphSpec(
                file,
                sha256_graph(tmp / file),
                tensor_specs(list(graph.graph.input)),
                tensor_specs(list(graph.graph.output)),
            )
            log.info("wrote %s (%d nodes)", file, len(graph.graph.node))
        config_file = Path(model_cfg.source)
        manifest = Manifest(
            model=ModelSection(
                family=model_cfg.family,
                config=str(config_file.resolve()) if config_file.is_file() else model_cfg.source,
                config_sha256=model_cfg.sha256,
                checkpoint=None if checkpoint is None else str(Path(checkpoint).resolve()),
                checkpoint_sha256=None if checkpoint is None else sha256_file(checkpoint),
                ema=ema,
                sample_shape=sample_shape,
                context_shape=None if context_shape is None else tuple(context_shape),
            ),
            quant=config,
            sampling=sampler,
            export=ExportSection(
                opset=opset,
                float_dtype=float_dtype,
                state_dtype=config.state_dtype,
                state_layout=config.state_layout,
                batch_size=batch_size,
                target=target,
                state_batch_multiplier=2 if guidance else 1,
                scale_floor=scale_floor(float_dtype) or None,
                floored_scales=tuple(floored_scales(qmodel, float_dtype)),
                seconds=round(time.perf_counter() - started, 2),
            ),
            graphs=graphs,
            layers=_layer_table(qmodel, shapes, owners),
            calibration=None if calibration is None else _keep_calibration(calibration, tmp, qmodel.weight_method),
            tool_version=__version__,
            step_groups=None
            if qmodel.step_groups is None
            else StepGroupsSection(**qmodel.step_groups.to_dict(), ratios=step_ratio_table(qmodel)),
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        issues = lint_export(tmp)
        if issues:
            shown = "\n  ".join(str(issue) for issue in issues[:20])
            more = f"\n  ... and {len(issues) - 20} more" if len(issues) > 20 else ""
            raise ArtifactError(
                f"refusing to write {out}: its graphs break {len(issues)} TensorRT explicit-quantization rule(s) "
                f"(nothing was written):\n  {shown}{more}\nRecalibrate, or change the quantization settings named above"
            )
    floored = manifest.export.floored_scales
    if floored:
        log.warning(
            "%d scale(s) raised to fp16's smallest normal %.3g (recorded in the manifest): %s",
            len(floored),
            scale_floor(float_dtype),
            ", ".join(floored[:5]),
        )
    log.info("export written to %s in %.1f s", out, time.perf_counter() - started)
    return manifest
