"""`manifest.json`: the versioned description of an export directory.

Everything a backend needs to run the graphs without the original checkpoint lives here:
which graphs exist, their I/O, the per-layer quantization and state shapes, and the hashes
that tie the export to its checkpoint, config and calibration. Backends refuse a directory
whose manifest is missing, of another schema version, or whose graph files do not hash to
what the manifest says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modiff_trt.errors import ArtifactError, ConfigError
from modiff_trt.export.naming import state_kinds
from modiff_trt.quant.config import QuantConfig
from modiff_trt.quant.formats import grid_bits
from modiff_trt.sampling.sampler import Sampler, sampler_from_dict
from modiff_trt.validate import dataclass_fields

SCHEMA = "modiff-trt/manifest"
SCHEMA_VERSION = 2  # 2: `sampling` is a `Sampler.to_dict()`
MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so multi-GB checkpoints do not fill memory."""
    return sha256_files([Path(path)], chunk)


def sha256_files(paths: list[Path], chunk: int = 1 << 20) -> str:
    """One hex sha256 over several files read in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def sha256_graph(path: str | Path) -> str:
    """sha256 of an ONNX graph, its external weights (`<file>.data`, graphs over 2 GB) included."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return sha256_files([path, data] if data.is_file() else [path])


@dataclass
class TensorSpec:
    """One graph input or output. `shape[0]` is the batch dim: an int or the string 'batch'."""

    name: str
    dtype: str  # numpy dtype name: float32, float16, int8 ...
    shape: list[int | str]


@dataclass
class GraphSpec:
    """One ONNX file of the export (`warmup`, `step` or `unet`)."""

    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass
class LayerSpec:
    """A quantized Conv/Linear layer, named by its module path in the UNet."""

    name: str
    kind: str  # conv1d | conv2d | linear
    weight_bits: int
    act_bits: int
    act_scale: list[float] | None  # static scale per channel group of the step input (residual for MoDiff)
    warmup_act_scale: list[float] | None  # scales of the quantized warm-up (first_step='quantized')
    a_hat_shape: list[int]  # per sample (no batch dim)
    o_hat_shape: list[int]
    act_zero_point: list[float] | None = None  # imported asymmetric grids (run as clipped symmetric int8)
    constant_input: bool = False  # input constant over the trajectory: steps pass o_hat through, no a_hat
    act_format: str = "int"  # int | fp8 | nvfp4 (act_scale is then the FP8 scale / NVFP4 fp32 tensor scale)
    format_note: str | None = None  # why the layer runs in another format than the config asks

    @property
    def state_kinds(self) -> tuple[str, ...]:
        """The state tensors this layer carries between steps (see `naming.state_kinds`)."""
        return state_kinds(self.constant_input)

    def state_shape(self, kind: str) -> list[int]:
        """Per-sample shape of this layer's `kind` ('a_hat' | 'o_hat')."""
        return self.a_hat_shape if kind == "a_hat" else self.o_hat_shape


@dataclass(frozen=True)
class ModelSection:
    """Where the export came from: the model config and checkpoint, tied by sha256, and the tensor shapes."""

    family: str
    config: str  # built-in name or the YAML's absolute path
    config_sha256: str
    checkpoint: str | None  # absolute path; None for built-ins with packaged weights
    checkpoint_sha256: str | None
    ema: bool
    sample_shape: tuple[int, ...]  # per sample (no batch dim)
    context_shape: tuple[int, ...] | None  # cross-attention context of text-conditioned models


@dataclass(frozen=True)
class ExportSection:
    """How the graphs were written: what engines and memory figures must agree with."""

    opset: int
    float_dtype: Literal["float32", "float16"] = field(metadata={"key": "float"})
    state_dtype: Literal["float32", "float16"]
    batch_size: int | None  # fixed batch, or None for a dynamic batch dimension
    target: Literal["trt", "ort-cpu"]
    state_batch_multiplier: int  # 2 under classifier-free guidance: each image owns a cond and an uncond slot
    scale_floor: float | None  # fp16's smallest normal when the graph is fp16
    floored_scales: tuple[str, ...]  # scales raised to `scale_floor`
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {f.metadata.get("key", f.name): getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class Manifest:
    """The parsed `manifest.json` of an export directory."""

    model: ModelSection
    quant: QuantConfig
    sampling: Sampler  # the calibration's sampler, or the config's defaults: what `sample` runs unless told otherwise
    export: ExportSection
    graphs: dict[str, GraphSpec]
    layers: list[LayerSpec]
    calibration: dict[str, Any] | None = None
    tool_version: str = ""
    schema: str = SCHEMA
    version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    #: Residual scales per group of sampling steps: the pinned schedule (`StepGroups.to_dict`) and
    #: `ratios` [G][2][quantizers], the `step_scale_ratio` value of each group. None: one scale.
    step_groups: dict[str, Any] | None = None

    @property
    def modulated(self) -> bool:
        return "step" in self.graphs

    @property
    def batch_size(self) -> int | None:
        """The fixed batch size the graphs were exported for, or None for a dynamic batch."""
        return self.export.batch_size

    def state_bytes_per_sample(self) -> int:
        """Bytes of `a_hat` + `o_hat` for one sample (times 2 under classifier-free guidance)."""
        item = 2 if self.export.state_dtype == "float16" else 4
        total = 0
        for layer in self.layers:
            for kind in layer.state_kinds:
                n = 1
                for dim in layer.state_shape(kind):
                    n *= int(dim)
                total += n
        return total * item * self.export.state_batch_multiplier

    def to_json(self) -> str:
        """The manifest as written: sections by their `to_dict`, graphs and layers field by field."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.dumps(data, indent=2, sort_keys=False, default=_jsonable)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        """Parse and validate a manifest: every section field present with its type, else one ArtifactError."""
        if data.get("schema") != SCHEMA:
            raise ArtifactError(f"{source} is not a modiff-trt manifest (schema {data.get('schema')!r})")
        if data.get("version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{source} has manifest version {data.get('version')}, this modiff-trt reads "
                f"version {SCHEMA_VERSION}: re-run `modiff-trt export` with this version"
            )
        fix = ": re-run `modiff-trt export`"

        def section(section_cls: type, key: str) -> Any:
            return section_cls(**dataclass_fields(section_cls, data.get(key), f"{source}: {key}", ArtifactError, fix))

        model, export = section(ModelSection, "model"), section(ExportSection, "export")
        try:
            quant = section(QuantConfig, "quant")
        except ConfigError as exc:  # a value QuantConfig refuses (bits out of range, FP8 at 4 bits)
            raise ArtifactError(f"{source}: quant: {exc}{fix}") from exc
        try:
            sampling = sampler_from_dict(data.get("sampling"), f"{source}: sampling")
        except ArtifactError as exc:
            raise ArtifactError(f"{exc}{fix}") from exc
        except ConfigError as exc:  # a value the sampler refuses (beta schedule, step count)
            raise ArtifactError(f"{source}: sampling: {exc}{fix}") from exc
        try:
            graphs = {
                key: GraphSpec(
                    file=g["file"],
                    sha256=g["sha256"],
                    inputs=[TensorSpec(**t) for t in g["inputs"]],
                    outputs=[TensorSpec(**t) for t in g["outputs"]],
                )
                for key, g in data["graphs"].items()
            }
            layers = [LayerSpec(**layer) for layer in data["layers"]]
            return cls(
                model=model,
                quant=quant,
                sampling=sampling,
                export=export,
                graphs=graphs,
                layers=layers,
                calibration=data.get("calibration"),
                tool_version=data.get("tool_version", ""),
                extra=data.get("extra", {}),
                step_groups=data.get("step_groups"),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"{source} is malformed ({exc}): re-run `modiff-trt export`") from exc


def _jsonable(value: Any) -> Any:
    """json.dumps' fallback: a section or sampler by its `to_dict`, any other dataclass field by field."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if to_dict is not None else dataclasses.asdict(value)


def tensor_specs(values: list) -> list[TensorSpec]:
    """The TensorSpecs of ONNX ValueInfos (graph inputs or outputs), symbolic dims as 'batch'."""
    import onnx

    specs = []
    for v in values:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        shape: list[int | str] = [d.dim_param or d.dim_value for d in t.shape.dim]
        specs.append(TensorSpec(v.name, dtype, ["batch" if isinstance(s, str) else s for s in shape]))
    return specs


def check_graph_io(manifest: Manifest, export_dir: Path, source: str) -> None:
    """Refuse a manifest that does not describe its graphs: I/O names, dtypes, shapes, layers, bits.

    The graph hashes only prove the graphs are the exported ones; an edited manifest would
    still pass them, then crash a runtime on a missing input or label an 8-bit graph as 4-bit.
    """
    import onnx

    from modiff_trt.export import naming

    fix = "re-run `modiff-trt export` instead of editing the manifest"
    for key, graph in manifest.graphs.items():
        model = onnx.load(str(export_dir / graph.file), load_external_data=False)
        for side, recorded, actual in (
            ("inputs", graph.inputs, model.graph.input),
            ("outputs", graph.outputs, model.graph.output),
        ):
            if recorded != tensor_specs(list(actual)):
                raise ArtifactError(f"{source}: the {key} graph's {side} differ from what the manifest lists; {fix}")
        if manifest.modulated:
            # per kind: a layer with a constant input carries o_hat only
            prefixes = tuple(naming.state_output(kind, "") for kind in naming.STATE_KINDS)
            carried = {o.name for o in model.graph.output if o.name.startswith(prefixes)}
            listed = {naming.state_output(kind, layer.name) for layer in manifest.layers for kind in layer.state_kinds}
            if carried != listed:
                o_hat = naming.state_output("o_hat", "")
                layers = sum(name.startswith(o_hat) for name in carried)
                raise ArtifactError(
                    f"{source}: the {key} graph carries state for {layers} layers, the manifest "
                    f"lists {len(manifest.layers)}; {fix}"
                )
    quant = manifest.quant
    bits = (quant.weight_bits or 0, quant.act_bits or 0)
    odd = [
        layer.name
        for layer in manifest.layers
        if (layer.weight_bits, layer.act_bits) != (bits[0], grid_bits(layer.act_format, quant.act_format, bits[1]))
    ]
    if odd:
        raise ArtifactError(
            f"{source}: layer {odd[0]} has other bits than the manifest's quant section (w{bits[0]}a{bits[1]}); {fix}"
        )


def load_manifest(export_dir: str | Path, verify_files: bool = True) -> Manifest:
    """Read `DIR/manifest.json`; with `verify_files`, check every graph file exists and hashes right."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{path} not found: {export_dir} is not an export directory; create one with `modiff-trt export --out DIR`"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}): re-run `modiff-trt export`") from exc
    manifest = Manifest.from_dict(data, source=str(path))
    if verify_files:
        for key, graph in manifest.graphs.items():
            file = export_dir / graph.file
            if not file.is_file():
                raise ArtifactError(f"{file} ({key} graph) is missing: re-run `modiff-trt export`")
            if sha256_graph(file) != graph.sha256:
                raise ArtifactError(
                    f"{file} does not match {path} (sha256 differs): the directory mixes two "
                    "exports; re-run `modiff-trt export`"
                )
        check_graph_io(manifest, export_dir, str(path))
    return manifest
