"""`manifest.json`: the versioned description of an export directory.

Everything a backend needs to run the graphs without the original checkpoint lives here:
which graphs exist, their I/O, the per-layer quantization and state shapes, and the hashes
that tie the export to its checkpoint, config and calibration. Backends refuse a directory
whose manifest is missing, of another schema version, has a field missing, mistyped, out of
range or unknown, names a file outside the directory, or whose graph files do not hash to what
the manifest says: the directory is trusted only for what it holds (docs/export.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modiff_trt.errors import ArtifactError, ConfigError
from modiff_trt.export.naming import STEP_SCALE_RATIO, state_kinds
from modiff_trt.quant.config import MAX_BITS, QuantConfig
from modiff_trt.quant.formats import grid_bits
from modiff_trt.quant.scales import StepGroups
from modiff_trt.sampling.sampler import Sampler, sampler_from_dict
from modiff_trt.validate import (
    at_least_value,
    dataclass_value,
    non_empty,
    numpy_dtype,
    plain_file_name,
    positive_values,
    sha256_hex,
    within,
)

SCHEMA = "modiff-trt/manifest"
SCHEMA_VERSION = 3  # 2: `sampling` is a `Sampler.to_dict()`; 3: `layers[i].a_hat_owner` (shared a_hat)
MANIFEST_NAME = "manifest.json"
CALIBRATION_COPY = "calibration.safetensors"  # the export's own copy of the calibration it was made from


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


def _dims(value: Any) -> str | None:
    """Graph tensor dims: sizes (0 for an unknown static one) or 'batch' for the batch dimension."""
    fits = all(d == "batch" if isinstance(d, str) else d >= 0 for d in value)
    return None if fits else 'made of sizes >= 0 and "batch"'


@dataclass
class TensorSpec:
    """One graph input or output. `shape[0]` is the batch dim: an int or the string 'batch'."""

    name: str = field(metadata={"check": non_empty})
    dtype: str = field(metadata={"check": numpy_dtype})  # numpy dtype name: float32, float16, int8 ...
    shape: list[int | str] = field(metadata={"check": _dims})


@dataclass
class GraphSpec:
    """One ONNX file of the export (`warmup`, `step` or `unet`).

    `file` is a plain name inside the export directory (its external weights, if any, are
    `<file>.data` beside it): anything else is refused before a file is opened.
    """

    file: str = field(metadata={"check": plain_file_name})
    sha256: str = field(metadata={"check": sha256_hex})
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


_SCALES = {"check": positive_values}
_SHAPE = {"check": positive_values}


@dataclass
class LayerSpec:
    """A quantized Conv/Linear layer, named by its module path in the UNet."""

    name: str = field(metadata={"check": non_empty})
    kind: Literal["conv1d", "conv2d", "linear"]
    weight_bits: int = field(metadata={"check": within(0, MAX_BITS)})  # 0: float weights
    act_bits: int = field(metadata={"check": within(0, MAX_BITS)})  # 0: float activations
    act_scale: list[float] | None = field(metadata=_SCALES)  # static scale per channel group of the step input
    warmup_act_scale: list[float] | None = field(metadata=_SCALES)  # scales of the quantized warm-up
    a_hat_shape: list[int] = field(metadata=_SHAPE)  # per sample (no batch dim)
    o_hat_shape: list[int] = field(metadata=_SHAPE)
    act_zero_point: list[float] | None = None  # imported asymmetric grids (run as clipped symmetric int8)
    constant_input: bool = False  # input constant over the trajectory: steps pass o_hat through, no a_hat
    a_hat_owner: str | None = None  # the earlier layer whose a_hat this one reads (same input, same quantizer)
    act_format: Literal["int", "fp8", "nvfp4"] = "int"  # act_scale is then the FP8 scale / NVFP4 fp32 tensor scale
    format_note: str | None = None  # why the layer runs in another format than the config asks

    @property
    def state_kinds(self) -> tuple[str, ...]:
        """The state tensors this layer carries between steps (see `naming.state_kinds`)."""
        return state_kinds(not self.constant_input and self.a_hat_owner is None)

    def state_shape(self, kind: str) -> list[int]:
        """Per-sample shape of this layer's `kind` ('a_hat' | 'o_hat')."""
        return self.a_hat_shape if kind == "a_hat" else self.o_hat_shape


@dataclass(frozen=True)
class ModelSection:
    """Where the export came from: the model config and checkpoint, tied by sha256, and the tensor shapes."""

    family: Literal["ddim", "ldm", "sd", "diffusers"]
    config: str = field(metadata={"check": non_empty})  # built-in name or the YAML's absolute path
    config_sha256: str = field(metadata={"check": sha256_hex})
    checkpoint: str | None = field(metadata={"check": non_empty})  # absolute path; None: packaged weights
    checkpoint_sha256: str | None = field(metadata={"check": sha256_hex})
    ema: bool
    sample_shape: tuple[int, ...] = field(metadata=_SHAPE)  # per sample (no batch dim)
    context_shape: tuple[int, ...] | None = field(metadata=_SHAPE)  # cross-attention context (text models)


@dataclass(frozen=True)
class ExportSection:
    """How the graphs were written: what engines and memory figures must agree with."""

    opset: int = field(metadata={"check": within(17, 20)})
    float_dtype: Literal["float32", "float16"] = field(metadata={"key": "float"})
    state_dtype: Literal["float32", "float16"]
    state_layout: Literal["plain", "scaled"]  # a_hat as is, or in units of its residual scale (QuantLayer.state_unit)
    batch_size: int | None = field(metadata={"check": at_least_value(1)})  # fixed batch, or None: dynamic
    target: Literal["trt", "ort-cpu"]
    state_batch_multiplier: Literal[1, 2]  # 2 under classifier-free guidance: a cond and an uncond slot per image
    scale_floor: float | None = field(metadata={"check": positive_values})  # fp16's smallest normal (fp16 graphs)
    floored_scales: tuple[str, ...]  # scales raised to `scale_floor`
    seconds: float = field(metadata={"check": at_least_value(0)})

    def to_dict(self) -> dict[str, Any]:
        return {f.metadata.get("key", f.name): getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class CalibrationSection:
    """The calibration file the export was made from: where it was, and its sha256.

    The export keeps its own copy (`CALIBRATION_COPY`, the file with this hash), so the torch
    reference of the export never depends on the recorded path still holding the same file.
    """

    path: str = field(metadata={"check": non_empty})
    sha256: str = field(metadata={"check": sha256_hex})
    weight_method: Literal["minmax", "mse", "adaround", "qdiffusion"] = "minmax"  # what made the integer weights


@dataclass(frozen=True)
class StepGroupsSection:
    """The `step_groups` of a manifest: `StepGroups.to_dict()` plus `ratios` [G][2][quantizers]."""

    count: int = field(metadata={"check": at_least_value(1)})
    bounds: list[int] = field(metadata=_SHAPE)
    steps: int = field(metadata={"check": at_least_value(2)})
    skip_type: str = field(metadata={"check": non_empty})
    timesteps: list[int] = field(metadata={"check": at_least_value(0)})
    ratios: list[list[list[float]]] = field(metadata=_SCALES)

    def groups(self) -> StepGroups:
        """The step groups the runners select a ratio row by."""
        return StepGroups(tuple(self.bounds), tuple(self.timesteps), self.skip_type)


def _sampling(value: Any, where: str) -> Sampler:
    """The manifest's `sampling`: every field of its sampler present, none defaulted."""
    try:
        return sampler_from_dict(value, where, stored=True)
    except ConfigError as exc:  # a value the sampler refuses (beta schedule, steps beyond the schedule)
        raise ArtifactError(f"{where}: {exc}") from exc


@dataclass
class Manifest:
    """The parsed `manifest.json` of an export directory.

    Every field is required on load (`from_dict`), typed by its annotation and bounded by its
    `metadata["check"]`: a field added here is validated without further code, and a field
    missing from a file is refused instead of falling back to a default.
    """

    model: ModelSection
    quant: QuantConfig
    #: the calibration's sampler, or the config's defaults: what `sample` runs unless told otherwise
    sampling: Sampler = field(metadata={"parse": _sampling})
    export: ExportSection
    graphs: dict[str, GraphSpec]
    layers: list[LayerSpec]
    calibration: CalibrationSection | None = None
    tool_version: str = ""
    schema: str = SCHEMA
    version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes of other tools; modiff-trt reads none
    #: Residual scales per group of sampling steps: the pinned schedule and `ratios` [G][2][quantizers],
    #: the `step_scale_ratio` value of each group. None: one scale for all steps.
    step_groups: StepGroupsSection | None = None

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
        """Parse and validate a manifest: every field of every section present, typed and in range,
        no unknown field, and the sections consistent with each other; else one ArtifactError
        naming `source`, the field (`section.field`, `layers[i].field`), its value and the fix."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            schema = data.get("schema") if isinstance(data, dict) else None
            raise ArtifactError(f"{source} is not a modiff-trt manifest (schema {schema!r}){FIX}")
        if data.get("version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{source} has manifest version {data.get('version')}, this modiff-trt reads "
                f"version {SCHEMA_VERSION}: re-run `modiff-trt export` with this version"
            )
        manifest = dataclass_value(cls, data, f"{source}: ", ArtifactError, FIX)
        check_consistent(manifest, source)
        return manifest


FIX = ": re-run `modiff-trt export`"


def check_consistent(manifest: Manifest, source: str) -> None:
    """Refuse sections that each parse but contradict each other (an edited file): every check
    here needs the manifest only, no graph file."""
    problem = _section_conflict(manifest) or _layer_conflict(manifest) or _step_groups_conflict(manifest)
    if problem:
        raise ArtifactError(f"{source}: {problem}{FIX}")


def _section_conflict(manifest: Manifest) -> str | None:
    export, quant = manifest.export, manifest.quant
    want = {"warmup", "step"} if quant.modulate else {"unet"}
    needs = f"quant.modulate {json.dumps(quant.modulate)} needs graphs {' and '.join(sorted(want))}"
    missing, extra = sorted(want - set(manifest.graphs)), sorted(set(manifest.graphs) - want)
    if missing:
        return f"graphs.{missing[0]} is missing ({needs})"
    if extra:
        return f"graphs.{extra[0]} is not a graph of this export ({needs})"
    if export.state_dtype != quant.state_dtype:
        return f"export.state_dtype is {json.dumps(export.state_dtype)}, but quant.state_dtype is {json.dumps(quant.state_dtype)}"
    if export.state_batch_multiplier == 2 and manifest.model.context_shape is None:
        return (
            "export.state_batch_multiplier is 2 (classifier-free guidance), but model.context_shape is null (no text)"
        )
    if (manifest.model.checkpoint is None) != (manifest.model.checkpoint_sha256 is None):
        return "model.checkpoint and model.checkpoint_sha256 must both be set or both be null"
    return None


def _layer_conflict(manifest: Manifest) -> str | None:
    seen: set[str] = set()
    for i, layer in enumerate(manifest.layers):
        if layer.name in seen:
            return f"layers[{i}].name {json.dumps(layer.name)} is listed twice"
        seen.add(layer.name)
    quant = manifest.quant
    bits = (quant.weight_bits or 0, quant.act_bits or 0)
    end = quant.end_weight_bits or 0
    for layer in manifest.layers:
        if layer.weight_bits not in (bits[0], end) or layer.act_bits != grid_bits(
            layer.act_format, quant.act_format, bits[1]
        ):
            return f"layer {layer.name} has other bits than the manifest's quant section (w{bits[0]}a{bits[1]})"
    problem = _owner_conflict(manifest.layers)
    if problem:
        return problem
    ends = [layer.name for layer in manifest.layers if layer.weight_bits == end != bits[0]]
    if len(ends) > 2:
        return (
            f"{len(ends)} layers ({', '.join(ends[:3])}, ...) have the first/last layers' W{end}: at most the "
            "UNet's input and output conv do"
        )
    return None


def _owner_conflict(layers: list[LayerSpec]) -> str | None:
    """A shared a_hat names an earlier layer that keeps its own, of the same shape and quantizer."""
    earlier: dict[str, LayerSpec] = {}
    for i, layer in enumerate(layers):
        owner_name = layer.a_hat_owner
        owner = earlier.get(owner_name) if owner_name is not None else None
        earlier[layer.name] = layer
        if owner_name is None:
            continue
        at = f"layers[{i}].a_hat_owner {json.dumps(owner_name)}"
        if owner is None:
            return f"{at} is not a layer listed before {layer.name}"
        if layer.constant_input or owner.constant_input or owner.a_hat_owner is not None:
            return f"{at}: a layer with a constant input, or one that reads another's a_hat, owns no a_hat"
        same = ("a_hat_shape", "act_bits", "act_format", "act_scale", "warmup_act_scale", "act_zero_point")
        differs = next((f for f in same if getattr(layer, f) != getattr(owner, f)), None)
        if differs:
            return f"{at}: layer {layer.name} has another {differs} than its a_hat's owner"
    return None


def _step_groups_conflict(manifest: Manifest) -> str | None:
    """Step groups pinned to the schedule the manifest's sampler runs, with one ratio row pair per group."""
    groups = manifest.step_groups
    step = manifest.graphs.get("step")
    ratio = next((t for t in step.inputs if t.name == STEP_SCALE_RATIO), None) if step else None
    if (groups is None) != (ratio is None):
        return (
            f"step_groups is {'null' if groups is None else 'set'}, but the step graph has "
            f"{'a' if ratio else 'no'} {STEP_SCALE_RATIO} input"
        )
    if groups is None:
        return None
    if any(ratio.shape != [2, len(group[0])] for group in groups.ratios if len(group) == 2):
        return (
            f"step_groups.ratios rows do not have the width of the step graph's {STEP_SCALE_RATIO} input {ratio.shape}"
        )
    sampler = manifest.sampling
    timesteps = sorted(sampler.timesteps(), reverse=True)
    bounds = groups.bounds
    if not (groups.count == len(bounds) - 1 == len(groups.ratios) and bounds[0] == 1 and bounds[-1] == groups.steps):
        return (
            f"step_groups.bounds {bounds} do not split steps 1..{groups.steps - 1} into step_groups.count "
            f"{groups.count} groups with one step_groups.ratios entry each"
        )
    if any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
        return f"step_groups.bounds {bounds} are not increasing"
    if groups.steps != len(groups.timesteps) or list(groups.timesteps) != timesteps:
        return (
            f"step_groups.timesteps are pinned to another schedule than sampling's "
            f"{sampler.steps}-step one (step_groups.steps {groups.steps})"
        )
    if getattr(sampler, "skip_type", None) != groups.skip_type:
        return f"step_groups.skip_type is {json.dumps(groups.skip_type)}, sampling runs another"
    if any(len(group) != 2 or len(group[0]) != len(group[1]) for group in groups.ratios):
        return "step_groups.ratios must hold per group 2 rows (s_0/s_g, s_g/s_0) of one value per quantizer"
    if len({len(group[0]) for group in groups.ratios}) > 1:
        return "step_groups.ratios has groups of different lengths"
    return None


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


def read_graph(path: Path, external_data: bool = True):
    """The ONNX graph at `path`, or one ArtifactError naming the file and the fix.

    A truncated or overwritten file otherwise surfaces as protobuf's `DecodeError: Wire format
    was corrupt`, naming neither. Its external weights must be `<file>.data` beside it, the one
    file the manifest's sha256 covers: any other location (a folder, `..`) is refused before
    it is read.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise ArtifactError(
            f"{path} is not a readable ONNX graph ({type(exc).__name__}): the file is truncated or damaged; "
            "re-run `modiff-trt export`"
        ) from exc
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    if locations - {f"{path.name}.data"}:
        raise ArtifactError(
            f"{path} keeps weights in {sorted(locations)[0]!r}, not in {path.name}.data beside it: "
            "re-run `modiff-trt export`"
        )
    if external_data and locations:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(path.parent))
    return model


def check_graph_io(manifest: Manifest, export_dir: Path, source: str) -> None:
    """Refuse a manifest that does not describe its graphs: I/O names, dtypes, shapes, layers.

    The graph hashes only prove the graphs are the exported ones; an edited manifest would
    still pass them, then crash a runtime on a missing input.
    """
    from modiff_trt.export import naming

    fix = "re-run `modiff-trt export` instead of editing the manifest"
    for key, graph in manifest.graphs.items():
        model = read_graph(export_dir / graph.file, external_data=False)
        for side, recorded, actual in (
            ("inputs", graph.inputs, model.graph.input),
            ("outputs", graph.outputs, model.graph.output),
        ):
            if recorded != tensor_specs(list(actual)):
                raise ArtifactError(f"{source}: the {key} graph's {side} differ from what the manifest lists; {fix}")
        if manifest.modulated:
            # per kind: a layer with a constant input or a shared a_hat carries o_hat only
            prefixes = tuple(naming.state_output(kind, "") for kind in naming.STATE_KINDS)
            carried = {o.name for o in model.graph.output if o.name.startswith(prefixes)}
            listed = {naming.state_output(kind, layer.name) for layer in manifest.layers for kind in layer.state_kinds}
            if carried != listed:
                first = sorted(carried ^ listed)[0]
                where = "writes" if first in carried else "does not write"
                raise ArtifactError(
                    f"{source}: the {key} graph {where} the state {first}, against the manifest's layers; {fix}"
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
                    f"{file} does not match {path} (sha256 differs): the file was changed or damaged, or the "
                    "directory mixes two exports; re-run `modiff-trt export`"
                )
        check_graph_io(manifest, export_dir, str(path))
    return manifest


def export_calibration(manifest: Manifest, export_dir: str | Path) -> Path | None:
    """The calibration file the torch reference of `export_dir` must use, its sha256 checked.

    An export keeps its own copy (`CALIBRATION_COPY`); an export written before copies existed
    falls back to the path recorded at export time. Either must hash to the manifest's
    `calibration.sha256`: a file recalibrated since, or a path edited in the manifest, would
    otherwise give the reference other scales than the graphs without a word.
    """
    section = manifest.calibration
    if section is None:
        return None
    copy = Path(export_dir) / CALIBRATION_COPY
    path = copy if copy.is_file() else Path(section.path)
    fix = "re-run `modiff-trt export`" + ("" if copy.is_file() else " (the export then keeps its own copy of it)")
    if not path.is_file():
        raise ArtifactError(
            f"{path}, the calibration {export_dir} was exported from, is gone and the export holds no copy: {fix}"
        )
    if sha256_file(path) != section.sha256:
        raise ArtifactError(
            f"{path} is not the calibration {export_dir} was exported from (its sha256 differs from the "
            f"manifest's calibration.sha256 {section.sha256[:12]}): {fix}"
        )
    return path
