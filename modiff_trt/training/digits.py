"""The built-in `digits` model: data and reproducible training on scikit-learn's 8x8 digits.

Pretrained diffusion checkpoints cannot be downloaded everywhere, yet quantization quality must
be measured on a *trained* model (random weights say nothing about it). scikit-learn ships
1,797 real 8x8 handwritten digits, so we train a small UNet of the DDIM architecture on them.

Why 8x8 and not resized to 16x16 or 32x32: upsampling only invents pixels the data never had
(the model would spend capacity on interpolation artefacts) and costs about 4x compute per
doubling, while 8x8 already gives recognisable digits (docs/metrics.md scores them). The
packaged record `assets/digits.json` holds the measured training time and the command.

Everything else follows ddim's CIFAR-10 recipe scaled down: epsilon objective with uniform t,
MSE, Adam 1e-3, batch 128, EMA 0.999, linear betas 1e-4..0.02 over 1000 steps (so
`ddim_timesteps`, `ddim_sample` and the quantizers apply unchanged). Random horizontal flips are
OFF: a mirrored 2 or 7 is not a digit.

scikit-learn is only needed here (training), never to load or sample the shipped weights:
install it with `pip install 'modiff-trt[digits]'`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modiff_trt.atomic import atomic_write
from modiff_trt.errors import ModiffError
from modiff_trt.models.registry import load_config

log = logging.getLogger(__name__)

CONFIG_NAME = "digits"
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
EMA_RATE = 0.999
TRAIN_THREADS = 1  # see train_digits: robust to a shared machine
LOSS_WINDOW = 100  # the reported final loss averages this many last iterations (one batch is noisy)


def load_digits_images() -> torch.Tensor:
    """All 1,797 scikit-learn digits as float32 [N, 1, 8, 8] in [-1, 1] (raw values are 0..16).

    Imported lazily so that loading the shipped model never needs scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ModiffError(
            "the digits data set comes from scikit-learn, which is not installed: pip install 'modiff-trt[digits]'"
        ) from exc
    images = torch.from_numpy(load_digits().images).float()
    return (images / 8.0 - 1.0).unsqueeze(1)


def load_digits_labels() -> torch.Tensor:
    """The class label (0..9) of each image of `load_digits_images`, same order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ModiffError("digit labels need scikit-learn: pip install 'modiff-trt[digits]'") from exc
    return torch.from_numpy(load_digits().target).long()


def _batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: one seeded permutation per epoch, batches run across epoch ends.

    Every image is seen once per epoch and the order depends only on the generator's seed.
    """
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch]
        pending = pending[batch:]


def save_weights(state: dict[str, torch.Tensor], path: Path) -> str:
    """Atomically write `state` as safetensors; returns its sha256.

    No safetensors metadata: its header order is not stable between runs, which would make the
    sha256 of identical weights differ. Metadata goes to the JSON sidecar instead.
    """
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def train_digits(
    out: Path,
    iterations: int = 4000,
    seed: int = 0,
    progress: bool = True,
    threads: int = TRAIN_THREADS,
) -> Path:
    """Train the `digits` UNet and write its EMA weights to `out` (.safetensors) plus `out`.json.

    Deterministic for a seed and thread count: weights are initialised after
    `torch.manual_seed(seed)`, and data order, timesteps and noise come from one generator
    seeded with `seed`. The thread count is pinned (`threads`, default 1) because float sums
    split differently across threads; it is restored afterwards. One thread, not two: on a
    shared 2-core machine a 2-thread run stalls at every parallel barrier while another process
    holds a core (measured: 0.27-0.48 s per iteration under contention vs 0.095 s single-threaded).

    The sidecar JSON records config, seed, iterations, sha256, training seconds, final loss
    (mean of the last 100 iterations) and the command, so the shipped file can be reproduced
    and verified. Returns `out`.
    """
    if iterations < 1:
        raise ModiffError(f"iterations must be >= 1, got {iterations}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ModiffError(f"{out}: the weights are written as safetensors; name the file *.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    images = load_digits_images()
    cfg = load_config(CONFIG_NAME)
    betas = cfg.betas()
    alphas_bar = (1.0 - betas).cumprod(dim=0)
    num_t = cfg.num_train_timesteps

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = cfg.build().train()
        ema = copy.deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        generator = torch.Generator().manual_seed(seed)
        batches = _batches(images.shape[0], BATCH_SIZE, generator)
        losses: list[float] = []
        every = max(1, iterations // 20)
        start = time.perf_counter()
        for it in range(1, iterations + 1):
            x0 = images[next(batches)]
            t = torch.randint(0, num_t, (x0.shape[0],), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            a = alphas_bar.index_select(0, t).view(-1, 1, 1, 1)
            xt = x0 * a.sqrt() + noise * (1.0 - a).sqrt()
            loss = F.mse_loss(model(xt, t.float()), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(EMA_RATE).add_(pm, alpha=1.0 - EMA_RATE)
            losses.append(loss.item())
            if it % every == 0 or it == iterations:
                recent = losses[-LOSS_WINDOW:]
                log.log(
                    logging.INFO if progress else logging.DEBUG,
                    "iteration %d/%d  loss %.4f (mean of last %d)  %.1f s",
                    it,
                    iterations,
                    sum(recent) / len(recent),
                    len(recent),
                    time.perf_counter() - start,
                )
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)

    recent = losses[-LOSS_WINDOW:]
    final_loss = sum(recent) / len(recent)
    info: dict[str, Any] = {
        "config": CONFIG_NAME,
        "seed": seed,
        "iterations": iterations,
        "threads": threads,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "ema_rate": EMA_RATE,
    }
    sha = save_weights(ema.state_dict(), out)
    info.update(
        sha256=sha,
        training_seconds=round(seconds, 1),
        final_loss=round(final_loss, 5),
        last_batch_loss=round(losses[-1], 5),
        torch_version=torch.__version__,
        command=f"modiff-trt train-digits --out {out} --iterations {iterations} --seed {seed}",
    )
    atomic_write(out.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
    log.info("wrote %s (sha256 %s…) after %.0f s, final loss %.4f", out, sha[:12], seconds, final_loss)
    return out


CLASSIFIER_EPOCHS = 40
CLASSIFIER_BATCH = 64


def train_digits_classifier(
    out: Path, seed: int = 0, epochs: int = CLASSIFIER_EPOCHS, threads: int = TRAIN_THREADS
) -> Path:
    """Train the digits-FID feature extractor on all 1,797 real digits and ship it with stats.

    Adam 1e-3, batch 64, `epochs` seeded epochs, weight decay 1e-4, no augmentation: a few
    seconds on 2 cores, deterministic for (seed, threads). After training, the mean and
    covariance (float64) of the 64-dim features of all real digits are stored in the same
    safetensors file (`stats.mu`, `stats.sigma`) so `modiff_trt.metrics` needs no scikit-learn.
    """
    from modiff_trt.metrics import STATS_MU, STATS_SIGMA, DigitsClassifier, gaussian_stats

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_images(), load_digits_labels()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = DigitsClassifier().train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        for _ in range(epochs):
            for idx in torch.randperm(images.shape[0], generator=generator).split(CLASSIFIER_BATCH):
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(images).argmax(1) == labels).float().mean())
            features = model.features(images).double().numpy()
    finally:
        torch.set_num_threads(previous_threads)
    mu, sigma = gaussian_stats(features)
    state = dict(model.state_dict())
    state[STATS_MU] = torch.from_numpy(mu)
    state[STATS_SIGMA] = torch.from_numpy(sigma)
    sha = save_weights(state, out)
    log.info("wrote %s (sha256 %s…): train accuracy %.4f, %.1f s", out, sha[:12], accuracy, time.perf_counter() - start)
    return out


def _main(argv: list[str]) -> None:
    """`python -m modiff_trt.training.digits [--classifier] OUT [ITERATIONS] [SEED]`, without the CLI."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m modiff_trt.training.digits")
    parser.add_argument("--classifier", action="store_true", help="train the digits-FID classifier instead")
    parser.add_argument("out", type=Path)
    parser.add_argument("iterations", type=int, nargs="?", default=4000)
    parser.add_argument("seed", type=int, nargs="?", default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.classifier:
        train_digits_classifier(args.out, seed=args.seed)
    else:
        train_digits(args.out, iterations=args.iterations, seed=args.seed)


if __name__ == "__main__":
    _main(sys.argv[1:])
