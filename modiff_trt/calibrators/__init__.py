"""Static scales for the quantized UNet: residual calibration and Q-Diffusion checkpoint import.

- `calibrate(model_cfg, checkpoint, out, sampler, CalibrationOptions(...))`: full-precision
  trajectories of the sampler `sample` will run -> per-layer residual (MoDiff) or raw
  (plain) activation scales by minmax / MSE / percentile search, plus optional MSE weights or
  AdaRound weights learned by block reconstruction (`reconstruct.py`, `--weight-method adaround`).
  `calibrate_together(model_cfg, checkpoint, {out: options, ...}, sampler)` writes several
  files (bits, methods, MoDiff and plain) from one set of trajectories.
- `import_qdiffusion(...)`: a released Q-Diffusion checkpoint -> its AdaRound integer weights and
  raw activation scales (or, with modulate=True, those weights plus calibrated residual scales).
- `load_calibration(path)`: the file both write; `.to_scale_set(config, checkpoint)` checks it
  belongs to the model before handing the scales to `quantize_unet`.

File format and method choices: docs/calibration.md.
"""

from modiff_trt.calibrators.calibrate import (
    CalibrationOptions,
    calibrate,
    calibrate_together,
)
from modiff_trt.calibrators.fileformat import (
    Calibration,
    load_calibration,
    save_calibration,
)
from modiff_trt.calibrators.qdiffusion import import_qdiffusion

__all__ = [
    "Calibration",
    "CalibrationOptions",
    "calibrate",
    "calibrate_together",
    "import_qdiffusion",
    "load_calibration",
    "save_calibration",
]
