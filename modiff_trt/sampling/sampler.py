"""`Sampler`: how one trajectory is drawn, for every model family, as one object.

A sampler owns the noise schedule (betas), the timestep selection, eta and guidance, and runs a
batch of trajectories with `trajectory(model, noise, indices, ...)`. It is the one description of
"how samples are drawn" that every stage shares: `sample`, `calibrate` (which must measure the
trajectories `sample` will run), `compare`, the demo, the export manifest (`sampling`) and the
calibration file (`sampler`) hold exactly `to_dict()`, and `sampler_from_dict` reads it back.

Three samplers exist:

- `DDIMSampler` (`ddim`): ddim's `generalized_steps` over `quad`/`uniform` timesteps, float32 betas;
- `LDMDDIMSampler` (`ldm-ddim`): CompVis' DDIMSampler, timesteps `range(0, T, T // S) + 1`;
- `PLMSSampler` (`plms`): CompVis' PLMSSampler (SD's default), one extra UNet call in its first step.

`make_sampler(model_cfg_or_sampler, ...)` is the one factory: the paper settings of a model config
(or the settings of a sampler read from a manifest) overridden by the options a user gave.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_type_hints

import torch

from modiff_trt.errors import ArtifactError, ConfigError
from modiff_trt.sampling.conditioning import ContextSource
from modiff_trt.sampling.ddim import ddim_sample
from modiff_trt.sampling.ldm import ldm_ddim_timesteps, sample_ddim, sample_plms
from modiff_trt.sampling.noise import step_generators
from modiff_trt.sampling.schedulers import call_timesteps, make_scheduler, scheduler_sample
from modiff_trt.sampling.schedules import BETA_SCHEDULES, alphas_cumprod, ddim_timesteps, make_betas
from modiff_trt.sampling.step import StepCallback
from modiff_trt.validate import at_least_value, field_problem

if TYPE_CHECKING:
    from modiff_trt.models.config import ModelConfig

log = logging.getLogger(__name__)


def _beta(value: float) -> str | None:
    return None if 0 < value < 1 else "within the open interval (0, 1)"


_BETA = {"check": _beta}
_ETA = {"check": at_least_value(0)}


def _skip_type(value: str) -> str | None:
    return None if value in ("quad", "uniform") else 'one of "quad", "uniform"'


# 0 is deterministic DDIM


@dataclass(frozen=True)
class NoiseSchedule:
    """The training betas: `beta_schedule` is `linear` or `scaled_linear` (see `schedules`)."""

    beta_schedule: str
    beta_start: float = field(metadata=_BETA)
    beta_end: float = field(metadata=_BETA)
    num_train_timesteps: int = field(default=1000, metadata={"check": at_least_value(1)})

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"beta_schedule {self.beta_schedule!r}: choose one of {', '.join(BETA_SCHEDULES)}")

    def betas(self) -> torch.Tensor:
        """float64 betas (cast or cumulate them as the sampler's upstream does)."""
        return make_betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)


@dataclass(frozen=True)
class Sampler(ABC):
    """Settings of one sampler plus the schedule it runs on; immutable, serialisable with `to_dict`."""

    name: ClassVar[str]
    schedule: NoiseSchedule
    steps: int = field(metadata={"check": at_least_value(1)})

    def __post_init__(self) -> None:
        try:
            self.timesteps()
        except ValueError as exc:
            raise ConfigError(f"{self.name} sampler: {exc}") from exc

    @abstractmethod
    def timesteps(self) -> list[int]:
        """The increasing timesteps one trajectory visits (one sampler step each)."""

    @abstractmethod
    def trajectory(
        self,
        model: Callable[..., torch.Tensor],
        noise: torch.Tensor,
        indices: Sequence[int] | None = None,
        *,
        seed: int = 0,
        conditioning: ContextSource | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """The final samples of one batch from `noise` (images `indices`, default 0..n-1).

        Resets the model's MoDiff state once. eta noise comes from one generator per image
        (seed, index), so image i is the same at any batch size. `conditioning` supplies the
        cross-attention context of text-conditioned models; `callback(step, t, x)` runs after
        every sampler step.
        """

    @property
    def eta(self) -> float:
        return 0.0

    @property
    def guidance_scale(self) -> float:
        return 1.0

    @property
    def guided(self) -> bool:
        """Classifier-free guidance: the model sees [uncond; cond], 2N samples per batch of N."""
        return self.guidance_scale != 1.0

    def model_calls(self) -> int:
        """UNet calls per trajectory: what a stateful MoDiff runner counts (calibration steps index them)."""
        return len(self.timesteps())

    def to_dict(self) -> dict[str, Any]:
        """`{"sampler": name, "steps": ..., <sampler fields>, <schedule fields>}`, flat and JSON-ready."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "schedule"}
        return {"sampler": self.name, **fields, **dataclasses.asdict(self.schedule)}


@dataclass(frozen=True)
class DDIMSampler(Sampler):
    """ddim's DDIM (`generalized_steps`): float32 betas, `quad` or `uniform` timesteps."""

    name: ClassVar[str] = "ddim"
    skip_type: str = field(default="quad", metadata={"check": _skip_type})
    eta: float = field(default=0.0, metadata=_ETA)  # type: ignore[assignment]

    def timesteps(self) -> list[int]:
        return ddim_timesteps(self.steps, self.skip_type, self.schedule.num_train_timesteps)

    def trajectory(self, model, noise, indices=None, *, seed=0, conditioning=None, callback=None) -> torch.Tensor:
        if conditioning is not None:
            raise ConfigError("the ddim sampler runs unconditional UNets: it takes no context")
        indices = range(len(noise)) if indices is None else indices
        generator = step_generators(seed, indices) if self.eta > 0 else None
        return ddim_sample(
            model,
            noise,
            self.timesteps(),
            self.schedule.betas().float(),
            eta=self.eta,
            generator=generator,
            callback=callback,
        )


def guidance_inputs(
    sampler: Sampler, conditioning: ContextSource | None, indices: Sequence[int], device: torch.device
) -> dict[str, Any]:
    """The context, unconditional context and guidance scale a guided loop takes (`guided_eps`)."""
    context = uncond = None
    if conditioning is not None:
        context = conditioning.context(indices).to(device)
        if sampler.guided:
            uncond = conditioning.uncond().to(device)
    elif sampler.guided:
        raise ConfigError("classifier-free guidance needs context: give prompts and a text encoder")
    return {"context": context, "uncond": uncond, "guidance_scale": sampler.guidance_scale}


@dataclass(frozen=True)
class _LatentSampler(Sampler):
    """What the LDM samplers share: LDM timesteps, LatentDiffusion's alphas_cumprod, guidance."""

    def __post_init__(self) -> None:
        super().__post_init__()
        requested, got = self.steps, len(self.timesteps())
        stride = self.schedule.num_train_timesteps // requested
        if stride * (got - 1) + 1 >= self.schedule.num_train_timesteps:
            raise ConfigError(
                f"--steps {requested}: the LDM timesteps range(0, T, T // S) + 1 reach T; "
                "choose a step count that divides the training timesteps (e.g. 50, 100, 200, 250)"
            )
        if got != requested:
            log.warning(
                "%d %s steps requested; the LDM discretisation range(0, %d, %d) gives %d steps",
                requested,
                self.name,
                self.schedule.num_train_timesteps,
                stride,
                got,
            )

    def timesteps(self) -> list[int]:
        return ldm_ddim_timesteps(self.steps, self.schedule.num_train_timesteps).tolist()

    def _context(self, conditioning: ContextSource | None, indices: Sequence[int], device: torch.device) -> dict:
        return guidance_inputs(self, conditioning, indices, device)


@dataclass(frozen=True)
class LDMDDIMSampler(_LatentSampler):
    """CompVis' DDIMSampler: LDM timesteps, eta > 0 allowed (LSUN-Bedrooms uses 1)."""

    name: ClassVar[str] = "ldm-ddim"
    eta: float = field(default=0.0, metadata=_ETA)  # type: ignore[assignment]
    guidance_scale: float = 1.0  # type: ignore[assignment]

    def trajectory(self, model, noise, indices=None, *, seed=0, conditioning=None, callback=None) -> torch.Tensor:
        indices = list(range(len(noise)) if indices is None else indices)
        generator = step_generators(seed, indices) if self.eta > 0 else None
        return sample_ddim(
            model,
            noise,
            alphas_cumprod(self.schedule.betas()),
            self.steps,
            eta=self.eta,
            generator=generator,
            callback=callback,
            **self._context(conditioning, indices, noise.device),
        )


@dataclass(frozen=True)
class PLMSSampler(_LatentSampler):
    """CompVis' PLMSSampler (deterministic): its first step calls the UNet twice."""

    name: ClassVar[str] = "plms"
    guidance_scale: float = 1.0  # type: ignore[assignment]

    def model_calls(self) -> int:
        return len(self.timesteps()) + 1

    def trajectory(self, model, noise, indices=None, *, seed=0, conditioning=None, callback=None) -> torch.Tensor:
        indices = list(range(len(noise)) if indices is None else indices)
        return sample_plms(
            model,
            noise,
            alphas_cumprod(self.schedule.betas()),
            self.steps,
            callback=callback,
            **self._context(conditioning, indices, noise.device),
        )


@dataclass(frozen=True)
class SchedulerSampler(Sampler):
    """A diffusers scheduler (`scheduler`: ddim, pndm, dpm-solver++, euler) on the model's betas, any family."""

    name: ClassVar[str] = "diffusers"
    scheduler: Literal["ddim", "pndm", "dpm-solver++", "euler"] = "dpm-solver++"  # SCHEDULER_CLASSES' names
    timestep_spacing: Literal["leading", "linspace", "trailing"] = "leading"
    steps_offset: int = field(default=0, metadata={"check": at_least_value(0)})
    set_alpha_to_one: bool = False
    guidance_scale: float = 1.0  # type: ignore[assignment]

    def make(self) -> Any:
        """A fresh diffusers scheduler object with these settings (schedulers keep per-run state)."""
        return make_scheduler(
            self.scheduler, self.schedule.betas(), self.timestep_spacing, self.steps_offset, self.set_alpha_to_one
        )

    def timesteps(self) -> list[int]:
        return sorted(int(t) for t in call_timesteps(self.make(), self.steps))

    def trajectory(self, model, noise, indices=None, *, seed=0, conditioning=None, callback=None) -> torch.Tensor:
        indices = list(range(len(noise)) if indices is None else indices)
        pinned = getattr(model, "step_groups", None)
        if pinned is not None:
            pinned.check_timesteps(self.timesteps(), getattr(model, "source", "the model"))
        return scheduler_sample(
            model,
            noise,
            self.make(),
            self.steps,
            callback=callback,
            **guidance_inputs(self, conditioning, indices, noise.device),
        )


def _sampler_name(default: str, sampler: str | None, scheduler: str | None) -> str:
    """The sampler class a user's `--sampler`/`--scheduler` ask for, given the model's default one."""
    if scheduler is not None:
        if sampler is not None:
            raise ConfigError("--sampler and --scheduler exclude each other: --scheduler picks a diffusers scheduler")
        return SchedulerSampler.name
    if default == SchedulerSampler.name:
        if sampler is not None:
            raise ConfigError(f"sampler {sampler!r}: a diffusers model samples with --scheduler (ddim, pndm, ...)")
        return default
    latent = default != DDIMSampler.name
    name = default if sampler is None else sampler
    if latent and name == "ddim":
        name = LDMDDIMSampler.name
    valid = (LDMDDIMSampler.name, PLMSSampler.name) if latent else (DDIMSampler.name,)
    if name not in valid:
        raise ConfigError(
            f"sampler {sampler!r}: choose one of {', '.join(('ddim', 'plms') if latent else ('ddim',))}"
            + ("" if latent else " (PLMS runs latent-diffusion models)")
            + ", or a diffusers --scheduler"
        )
    return name


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDIMSampler, LDMDDIMSampler, PLMSSampler, SchedulerSampler)
}
_SCHEDULE_FIELDS = tuple(f.name for f in dataclasses.fields(NoiseSchedule))


def sampler_from_dict(data: Any, source: str = "sampler settings", stored: bool = False) -> Sampler:
    """The sampler `to_dict()` described; ArtifactError naming `source.<field>` when the dict is not one.

    `stored`: the dict was read from a file that holds a full `to_dict()` (a manifest), so every
    field must be there (none falls back to its default: a removed `skip_type` is not `quad`) and
    within its range (`metadata["check"]`: eta >= 0, betas in (0, 1)).
    """
    if not isinstance(data, dict):
        raise ArtifactError(f"{source} is {json.dumps(data, default=repr)}, not sampler settings")
    if "sampler" not in data:
        raise ArtifactError(f"{source}.sampler is missing")
    cls = SAMPLERS.get(data["sampler"]) if isinstance(data["sampler"], str) else None
    if cls is None:
        raise ArtifactError(
            f"{source}.sampler is {json.dumps(data['sampler'], default=repr)}, an unknown sampler "
            f"(known: {', '.join(SAMPLERS)})"
        )
    fields = {f.name: f for f in (*dataclasses.fields(NoiseSchedule), *dataclasses.fields(cls)) if f.name != "schedule"}
    unknown = sorted(set(data) - set(fields) - {"sampler"})
    if unknown:
        raise ArtifactError(f"{source}.{unknown[0]} is not a {cls.name} sampler setting")
    hints = {**get_type_hints(NoiseSchedule), **get_type_hints(cls)}
    for key, f in fields.items():
        if key not in data:
            if stored or f.default is dataclasses.MISSING:
                raise ArtifactError(f"{source}.{key} is missing")
            continue
        wrong = field_problem(f"{source}.{key}", data[key], hints[key], f.metadata.get("check") if stored else None)
        if wrong:
            raise ArtifactError(wrong)
    schedule = NoiseSchedule(**{k: data[k] for k in _SCHEDULE_FIELDS if k in data})
    return cls(schedule=schedule, **{k: data[k] for k in fields if k in data and k not in _SCHEDULE_FIELDS})


def make_sampler(
    base: ModelConfig | Sampler,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    skip_type: str | None = None,
    eta: float | None = None,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
) -> Sampler:
    """The one sampler factory: `base`'s settings, overridden by the options that are not None.

    `base` is a model config (its paper settings, `ModelConfig.sampler_defaults()`) or a
    sampler (e.g. an export's, `manifest.sampling`). `sampler` is 'ddim' or
    'plms'; for latent-diffusion models 'ddim' means the LDM DDIM sampler ('ldm-ddim').
    A `scheduler` (ddim, pndm, dpm-solver++, euler) picks a diffusers scheduler instead, on any
    model; diffusers model folders sample with one by default.
    """
    if isinstance(base, Sampler):
        defaults, conditional = base.to_dict(), None
    else:
        defaults = {
            **base.sampler_defaults(),
            "beta_schedule": base.beta_schedule,
            "beta_start": base.beta_start,
            "beta_end": base.beta_end,
            "num_train_timesteps": base.num_train_timesteps,
        }
        conditional = base.context_shape is not None
    name = _sampler_name(defaults["sampler"], sampler, scheduler)
    if name == SchedulerSampler.name and defaults["sampler"] != name:
        defaults = {k: v for k, v in defaults.items() if k in _SCHEDULE_FIELDS or k == "steps"}
    given = {"steps": steps, "skip_type": skip_type, "eta": eta, "guidance_scale": guidance_scale}
    given["scheduler"] = scheduler
    fields = {f.name for f in dataclasses.fields(SAMPLERS[name])}
    for key, value in given.items():
        if value is not None and key not in fields and not (key == "eta" and value == 0):
            raise ConfigError(
                f"--{key.replace('_', '-')} does not apply to the {name} sampler"
                + (": PLMS is deterministic (use --sampler ddim for eta > 0)" if key == "eta" else "")
            )
    settings = {
        k: v
        for k, v in {**defaults, **{k: v for k, v in given.items() if v is not None}}.items()
        if k in fields or k in _SCHEDULE_FIELDS
    }
    chosen = sampler_from_dict({"sampler": name, **settings}, "sampler options")
    if chosen.guided and conditional is False:
        raise ConfigError(f"{base.source} is unconditional: classifier-free guidance needs a text-conditioned model")
    return chosen
