"""The calibration file: safetensors tensors + JSON metadata in the safetensors header.

Why safetensors: it loads without pickle (no code execution), memory-maps, and its header has a
string metadata map, so one file carries scales, integer weights and their provenance.

Layout (format `modiff-trt/calibration`, version 4):

- tensors, per quantized layer `P` (module path in the float UNet):
  `P.act` float32 [groups] (residual scales for MoDiff, raw-input scales for plain),
  `P.act_zero_point` float32 [groups] (only imported asymmetric Q-Diffusion scales),
  `P.warmup` / `P.warmup_zero_point` (first-step raw-input scales, MoDiff only),
  `P.weight_codes` int8 shaped like the weight (W_int - zero_point) and `P.weight_scale`
  float32 [O, groups] (only when the file carries its own rounded weights: MSE, AdaRound or imported),
  `P.act_groups` float32 [step groups, groups] (only with step groups; `P.act` is its row 0),
  `P.act_absmax`, `P.warmup_absmax`, `P.act_groups_absmax`: the absmax each symmetric scale
  was measured from, shaped like it (absent for imported asymmetric Q-Diffusion scales).
- metadata key `modiff_trt`: JSON with `format`, `version`, `kind` ('residual'|'raw'),
  `modulate`, `first_step`, `split`, `weight_bits`, `act_bits`, `act_format`, `method`,
  `weight_method`, `sampler` (the `Sampler.to_dict()` the trajectories were drawn with; null for
  a plain Q-Diffusion import), `trajectories` {cali_st, cali_n, batch_size, seed,
  calibration_steps}, `checkpoint` {path, sha256}, `config` {source, sha256}, `layers` (names, in
  model order), `groups` {layer: count}, `formats` {layer: int|fp8|nvfp4} (the format each
  layer's activation scales are in; absent in older files, which are all `int`),
  `constant_input` (layers whose residual was exactly 0 at every calibrated step; absent in older
  files), `origin`, `report` (time, memory, import notes), `reconstruction` (AdaRound files:
  options, samples, time, per-unit block losses), `step_groups` (null, or
  `StepGroups.to_dict()`: the step groups' bounds and the timesteps they are pinned to).

Version 1 files held the sampler settings and the trajectory budget together in `schedule`
(without the betas, which came from the config); they still load, and `sampler(model_cfg)`
rebuilds their sampler from the config. Version 3 added step groups; version 1 and 2 files
have none, which is exactly `--step-groups 1`, so they load unchanged. Version 4 added the
measured absmax: every scale must lie between 1e-8 and the scale that maps the absmax onto the top
of the layer's grid (absmax / (2^(b-1) - 1) for integers, / 448 for FP8, / (6 * 448) for NVFP4's
tensor scale), the range every scale search stays in, so an edited or damaged scale is refused.
Older files still load; their scales are only checked for being finite and positive.
Version 5 added `first_last_bits` (the weight bits of the UNet's input and output conv, null: the
same as every layer) and `layer_weight_bits` {layer: bits} for the layers whose weight bits differ
from `weight_bits`; files before it hold every layer at `weight_bits`, so they read as null.

The file is tied to the checkpoint and config it was measured on (sha256 of both): loading it
for anything else raises `ArtifactError` naming both sides and the command that fixes it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modiff_trt.atomic import atomic_file, writable_file
from modiff_trt.calibrators.search import top_scale
from modiff_trt.errors import ArtifactError
from modiff_trt.export.manifest import sha256_file
from modiff_trt.models.config import ModelConfig
from modiff_trt.quant.config import QuantConfig
from modiff_trt.quant.formats import grid_bits
from modiff_trt.quant.model import quantizable_layers
from modiff_trt.quant.quantizers import SCALE_FLOOR
from modiff_trt.quant.scales import LayerScales, ScaleSet, StepGroups
from modiff_trt.sampling.sampler import Sampler, make_sampler, sampler_from_dict
from modiff_trt.validate import SHA256, not_a_directory

log = logging.getLogger(__name__)
FORMAT = "modiff-trt/calibration"
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
META_KEY = "modiff_trt"
SCALE_FIELDS = ("act", "act_zero_point", "warmup", "warmup_zero_point", "act_groups")
MEASURED = {"act": "act_absmax", "warmup": "warmup_absmax", "act_groups": "act_groups_absmax"}  # scale -> its absmax
ZERO_POINTS = {"act": "act_zero_point", "warmup": "warmup_zero_point", "act_groups": "act_zero_point"}
TENSOR_FIELDS = SCALE_FIELDS + tuple(MEASURED.values())
ABSMAX_SLACK = 1e-5  # float32 storage of scale and absmax


@dataclass
class Calibration:
    """Per-layer static scales plus the metadata that says what they are valid for."""

    meta: dict[str, Any]
    layers: dict[str, LayerScales]
    path: Path | None = None
    source: str = field(init=False)

    def __post_init__(self) -> None:
        self.source = str(self.path) if self.path is not None else "calibration"

    @property
    def modulate(self) -> bool:
        return bool(self.meta["modulate"])

    @property
    def kind(self) -> str:
        """'residual' (MoDiff step residual scales) or 'raw' (raw input scales, plain Q-Diffusion)."""
        return str(self.meta["kind"])

    @property
    def step_groups(self) -> StepGroups | None:
        """The groups of sampling steps with their own residual scales (None: one for all steps)."""
        data = self.meta.get("step_groups")
        return None if data is None else StepGroups.from_dict(data)

    def sampler(self, model_cfg: ModelConfig) -> Sampler | None:
        """The sampler the trajectories were drawn with; None for an import that sampled nothing.

        `model_cfg` (the config this file belongs to) supplies the betas of version-1 files.
        """
        if "sampler" in self.meta:
            data = self.meta["sampler"]
            return None if data is None else sampler_from_dict(data, f"{self.source}: sampler")
        old = self.meta.get("schedule")
        if old is None:
            return None
        return make_sampler(
            model_cfg,
            sampler=old.get("sampler"),
            steps=old["steps"],
            eta=old["eta"],
            skip_type=None if old.get("sampler") else old["skip_type"],
            guidance_scale=old.get("guidance_scale"),
        )

    def check_matches(self, config: ModelConfig | str | None, checkpoint: str | Path | None) -> None:
        """Raise ArtifactError unless this calibration belongs to `config` and `checkpoint`.

        `config` is a ModelConfig (also checks the layer names) or a config sha256; `checkpoint`
        a file path, a sha256, or None for a randomly initialised model. None as config skips it.
        """
        want = self.meta["config"]
        if config is not None:
            sha = config.sha256 if isinstance(config, ModelConfig) else str(config)
            if sha != want["sha256"]:
                label = config.source if isinstance(config, ModelConfig) else f"sha256 {sha[:12]}"
                raise ArtifactError(
                    f"{self.source} was calibrated for config {want['source']} (sha256 {want['sha256'][:12]}), "
                    f"not {label} (sha256 {sha[:12]}): run `modiff-trt calibrate` with this --config"
                )
            if isinstance(config, ModelConfig):
                self._check_layers(config)
        have = _checkpoint_sha(checkpoint)
        recorded = self.meta["checkpoint"]
        if have != recorded["sha256"]:

            def show(path: Any, sha: str | None) -> str:
                return "no checkpoint (random weights)" if sha is None else f"{path} (sha256 {sha[:12]})"

            raise ArtifactError(
                f"{self.source} was calibrated on {show(recorded['path'], recorded['sha256'])}, but the model "
                f"uses {show(checkpoint, have)}: scales do not carry over between checkpoints; run "
                "`modiff-trt calibrate` with this --checkpoint"
            )

    def check_settings(self, quant: QuantConfig) -> None:
        """Refuse quantization settings other than those the scales were measured for.

        Scales measured for 4-bit activations used at 8 bits (or residual scales used on raw
        inputs) run without error and silently cost tens of dB, so every mismatch is named.
        """
        recorded = {
            "--act-format": self.meta.get("act_format", "int"),
            "--weight-bits": self.meta.get("weight_bits"),
            "--first-last-bits": self.end_weight_bits,
            "--act-bits": self.meta.get("act_bits"),
            "--modulate": self.meta.get("modulate"),
            "--first-step": self.meta.get("first_step"),
        }
        wanted = {
            "--act-format": quant.act_format,
            "--weight-bits": quant.weight_bits,
            "--first-last-bits": quant.end_weight_bits,
            "--act-bits": quant.act_bits,
            "--modulate": quant.modulate,
            "--first-step": quant.first_step,
        }
        differ = [
            f"{flag} {_show(wanted[flag])} (file: {_show(value)})"
            for flag, value in recorded.items()
            if value is not None and value != wanted[flag]
        ]
        if differ:
            raise ArtifactError(
                f"{self.source} was calibrated for other settings: {'; '.join(differ)}; use the "
                "calibration's settings or run `modiff-trt calibrate` with these"
            )

    @property
    def end_weight_bits(self) -> int | None:
        """Weight bits of the UNet's first and last layer in this file (`QuantConfig.end_weight_bits`;
        files before version 5 hold every layer at `weight_bits`)."""
        quant = QuantConfig(weight_bits=self.meta.get("weight_bits"), first_last_bits=self.meta.get("first_last_bits"))
        return quant.end_weight_bits

    def _check_layers(self, config: ModelConfig) -> None:
        with torch.device("meta"):
            names = quantizable_layers(config.build())
        missing = [n for n in names if n not in self.layers]
        unknown = [n for n in self.layers if n not in set(names)]
        if missing or unknown:
            raise ArtifactError(
                f"{self.source} does not match the layers of {config.source}: "
                f"missing {missing[:5]} ({len(missing)}), unknown {unknown[:5]} ({len(unknown)}); "
                "calibrate this checkpoint and config again"
            )

    def to_scale_set(self, config: ModelConfig | str | None, checkpoint: str | Path | None) -> ScaleSet:
        """The scales for `quantize_unet`, after checking they belong to this config and checkpoint."""
        self.check_matches(config, checkpoint)
        return ScaleSet(
            modulate=self.modulate,
            layers=dict(self.layers),
            source=self.source,
            step_groups=self.step_groups,
            act_format=self.meta.get("act_format", "int"),
            weight_method=self.meta.get("weight_method"),
            weight_bits=self.layer_weight_bits(),
        )

    def layer_weight_bits(self) -> dict[str, int | None]:
        """Every layer's weight bits in this file: `weight_bits`, or its entry in
        `layer_weight_bits` (the first/last layers; files before version 5 have none)."""
        special = self.meta.get("layer_weight_bits") or {}
        return {name: special.get(name, self.meta.get("weight_bits")) for name in self.layers}


def _checkpoint_sha(checkpoint: str | Path | None) -> str | None:
    if checkpoint is None:
        return None
    if Path(checkpoint).is_file():
        return sha256_file(checkpoint)
    if isinstance(checkpoint, str) and SHA256.match(checkpoint):
        return checkpoint
    raise ArtifactError(f"checkpoint {checkpoint} not found: check the path (--checkpoint)")


def _tensors(layers: dict[str, LayerScales]) -> dict[str, torch.Tensor]:
    out = {}
    for name, entry in layers.items():
        for key in TENSOR_FIELDS:
            values = getattr(entry, key)
            if values is not None:
                out[f"{name}.{key}"] = torch.tensor(values, dtype=torch.float32)
        if entry.weight_codes is not None:
            codes = entry.weight_codes
            integral = not codes.dtype.is_floating_point or torch.equal(codes, codes.round())
            if codes.min() < -128 or codes.max() > 127 or not integral:
                raise ValueError(f"layer {name}: weight codes are not int8 integers")
            out[f"{name}.weight_codes"] = codes.to(torch.int8).contiguous()
            out[f"{name}.weight_scale"] = entry.weight_scale.float().contiguous()
    return out


def save_calibration(path: str | Path, layers: dict[str, LayerScales], meta: dict[str, Any]) -> Calibration:
    """Write the file atomically (temp file beside it, then rename) and return what was written."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **meta,
        "layers": list(layers),
        "groups": {n: len(e.act or e.warmup or [0]) for n, e in layers.items()},
        "constant_input": [n for n, e in layers.items() if e.constant_input],
        "formats": {n: e.act_format for n, e in layers.items()},
    }
    check_scales(layers, meta, str(path), measured=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(_tensors(layers), tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    log.info("wrote calibration %s (%d layers, %s scales)", path, len(layers), meta.get("kind"))
    return Calibration(meta=meta, layers=layers, path=path)


#: The quantization options a calibration file fixes: `QuantOptions` field -> metadata key.
SETTINGS = ("weight_bits", "act_bits", "act_format", "modulate", "first_step", "first_last_bits")


def calibration_settings(path: str | Path) -> dict[str, Any]:
    """The quantization options the file at `path` was calibrated for, as `QuantOptions` values
    (0 bits: float), read from its header alone: what export and sample take where the user
    gave none, so `calibrate --act-bits 4` needs no second `--act-bits 4`."""
    meta = _read(path, tensors=False)[0]
    settings = {key: meta[key] for key in SETTINGS if key in meta}
    settings.setdefault("act_format", "int")  # files older than the formats are integer
    settings["first_last_bits"] = _show_first_last(meta.get("first_last_bits"))  # before version 5: 'same'
    for key in ("weight_bits", "act_bits"):
        if key in settings and settings[key] is None:
            settings[key] = 0
    return settings


def _read(path: str | Path, tensors: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked metadata and (with `tensors`) the tensors of the calibration file `path`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    not_a_directory("--calibration", path, "calibration file (.safetensors)")
    if not path.is_file():
        raise ArtifactError(f"calibration file {path} not found: create it with `modiff-trt calibrate --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            loaded = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors calibration file ({exc}); recalibrate") from exc
    try:
        meta = json.loads(header[META_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is a safetensors file without modiff-trt calibration metadata") from exc
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} holds {meta.get('format')!r}, not a {FORMAT} file")
    if meta.get("version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path} is calibration format version {meta.get('version')}; this modiff-trt reads version "
            f"{FORMAT_VERSION}: recalibrate or use the modiff-trt release that wrote it"
        )
    return meta, loaded


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file; ArtifactError when it is missing, corrupt or of another format."""
    path = Path(path)
    meta, tensors = _read(path)
    layers = {}
    constant = set(meta.get("constant_input", []))
    formats = meta.get("formats", {})
    for name in meta["layers"]:
        fields = {key: tensors[f"{name}.{key}"].tolist() for key in TENSOR_FIELDS if f"{name}.{key}" in tensors}
        codes = tensors.get(f"{name}.weight_codes")
        layers[name] = LayerScales(
            **fields,
            weight_codes=codes,
            weight_scale=tensors.get(f"{name}.weight_scale"),
            constant_input=name in constant,
            act_format=formats.get(name, "int"),
        )
    measured = meta["version"] >= 4
    if not measured:
        log.warning(
            "%s is calibration format version %s, which keeps no measured absmax: its scales are only "
            "checked for being finite and positive (recalibrate to have them checked)",
            path,
            meta["version"],
        )
    check_scales(layers, meta, str(path), measured=measured)
    return Calibration(meta=meta, layers=layers, path=path)


def check_scales(layers: dict[str, LayerScales], meta: dict[str, Any], source: str, measured: bool) -> None:
    """Refuse scales no calibration could have produced: not finite, not positive, or (`measured`:
    the file keeps each symmetric scale's absmax) outside [1e-8, `top_scale(absmax)`] of the layer's
    format, the range every scale search (minmax at its top, mse and percentile below) stays in.

    A scale that is too large quantizes every activation to 0 and runs without an error, so the
    only place to catch it is here, before anything is sampled or exported.
    """
    fix = "the file was edited or damaged; recalibrate"
    for name, entry in layers.items():
        bits = grid_bits(entry.act_format, meta.get("act_format", "int"), meta.get("act_bits"))
        for key, absmax_key in MEASURED.items():
            scales = getattr(entry, key)
            if scales is None:
                continue
            values = np.asarray(scales, dtype=np.float64)
            if not np.all(np.isfinite(values)) or np.any(values <= 0):
                raise ArtifactError(
                    f"{source}: layer {name} has a {key} scale that is not a finite positive number; {fix}"
                )
            absmax = getattr(entry, absmax_key)
            if not measured or getattr(entry, ZERO_POINTS[key]) is not None:
                continue  # nothing measured to hold it to (an older file, imported asymmetric scales)
            if absmax is None or np.shape(absmax) != values.shape or not bits:
                raise ArtifactError(f"{source}: layer {name} lacks the measured absmax of its {key} scales; {fix}")
            top = top_scale(torch.tensor(absmax, dtype=torch.float64), bits, entry.act_format).numpy()
            bad = np.flatnonzero((values > top * (1 + ABSMAX_SLACK)) | (values < SCALE_FLOOR * (1 - ABSMAX_SLACK)))
            if bad.size:
                i = np.unravel_index(bad[0], values.shape)
                grid = f"int{bits}" if entry.act_format == "int" else entry.act_format
                raise ArtifactError(
                    f"{source}: layer {name}'s {key} scale {values[i]:.4g} cannot come from its measured absmax "
                    f"{np.asarray(absmax)[i]:.4g} on the {grid} grid (a calibration gives {SCALE_FLOOR:g}.."
                    f"{top[i]:.4g}); {fix}"
                )


def _holds_calibration(path: Path) -> bool:
    """Whether `path` is a modiff-trt calibration file (its header is read, not its tensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get(META_KEY, "{}")).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def check_calibration_out(out: str | Path, inputs: dict[str, str | Path | None]) -> Path:
    """Refuse an --out that would destroy a file calibrate did not write, before any sampling.

    `inputs` maps each input option (--checkpoint, --from-qdiffusion) to its path: --out may not
    be one of them, and an existing --out is replaced only when it is an earlier calibration.
    """
    out = Path(out)
    for option, path in inputs.items():
        if path is not None and out.exists() and Path(path).exists() and out.samefile(path):
            raise ArtifactError(f"--out {out} is the {option} file: calibrating would replace it; choose another --out")
    if out.is_file() and not _holds_calibration(out):
        raise ArtifactError(
            f"--out {out} exists and is not a calibration file: calibrate never replaces other "
            "files; choose another --out"
        )
    writable_file(out, "--out")
    return out


def _show_first_last(bits: int | None) -> str:
    """`--first-last-bits` as the user types it: the bits, or 'same' (every layer at --weight-bits)."""
    return "same" if bits is None else str(bits)


def _show(value: Any) -> str:
    """An option value as the user types it: 0 for float (None), on/off for switches."""
    if value is None:
        return "0"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
