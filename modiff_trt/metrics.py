"""Image quality metrics for the built-in `digits` model: digits FID, classifier confidence, PSNR.

Real FID needs Inception weights that cannot be downloaded on every machine, so for the digits
model we use the same recipe with a small CNN trained on the real digits as feature extractor:
the Fréchet distance between Gaussians fitted to its 64-dim penultimate features of generated
images and of all 1,797 real digits. The classifier weights and the real statistics ship in
`assets/digits_classifier.safetensors`, so nothing here needs scikit-learn or scipy at run time
(the matrix square root is a symmetric eigendecomposition in numpy). See docs/metrics.md for
what this number can and cannot tell.

Images everywhere are float [N, 1, 8, 8] in [-1, 1]; they are clamped first, as a saved image
would be.
"""

from __future__ import annotations

import functools
import logging
import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modiff_trt.errors import ModiffError

log = logging.getLogger(__name__)

CLASSIFIER_ASSET = "digits_classifier.safetensors"
FEATURE_DIM = 64
FID_MIN_IMAGES = 512  # fewer images give a digits FID too noisy to rank configurations
STATS_MU = "stats.mu"
STATS_SIGMA = "stats.sigma"

ImageBatch = torch.Tensor | np.ndarray


class DigitsClassifier(nn.Module):
    """Two 3x3 convs (16, 32 channels), 2x2 max-pool, a 64-unit hidden layer, 10 logits.

    Small on purpose (38k parameters, trains in seconds, deterministic); its 64 ReLU hidden
    units are the features of the digits FID, like Inception's pool3 for real FID.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 4 * 4, FEATURE_DIM)
        self.logits = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return torch.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))


def _asset_path(name: str) -> Path:
    return Path(str(resources.files("modiff_trt").joinpath("assets", name)))


@functools.lru_cache(maxsize=1)
def _load() -> tuple[DigitsClassifier, np.ndarray, np.ndarray]:
    """The shipped classifier (eval mode) and the real-digits feature mean and covariance."""
    from safetensors.torch import load_file

    path = _asset_path(CLASSIFIER_ASSET)
    if not path.is_file():
        raise ModiffError(
            f"{path} is missing: reinstall modiff-trt, or rebuild it with "
            "python -m modiff_trt.training.digits --classifier (needs pip install 'modiff-trt[digits]')"
        )
    tensors = load_file(str(path))
    mu = tensors.pop(STATS_MU).double().numpy()
    sigma = tensors.pop(STATS_SIGMA).double().numpy()
    model = DigitsClassifier()
    model.load_state_dict(tensors, strict=True)
    return model.eval(), mu, sigma


def real_statistics() -> tuple[np.ndarray, np.ndarray]:
    """Mean [64] and covariance [64, 64] (float64) of the features of all 1,797 real digits."""
    _, mu, sigma = _load()
    return mu.copy(), sigma.copy()


def _as_images(images: ImageBatch) -> torch.Tensor:
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ModiffError(f"digits metrics take images of shape [N, 1, 8, 8] in [-1, 1], got {tuple(x.shape)}")
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def digits_features(images: ImageBatch) -> np.ndarray:
    """Penultimate (64-dim) classifier features of [N, 1, 8, 8] images in [-1, 1], float64 [N, 64]."""
    model, _, _ = _load()
    return model.features(_as_images(images)).double().numpy()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of row features (what FID fits to each image set)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ModiffError(f"need at least 2 feature rows to fit a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), numpy only.

    tr((S1 S2)^1/2) equals tr((R S2 R)^1/2) with R = S1^1/2; R S2 R is symmetric PSD, so its
    square root's trace is the sum of the square roots of its eigenvalues. This avoids scipy's
    non-symmetric `sqrtm` and its complex round-off.
    """
    root = _sqrt_psd(np.asarray(sigma1, dtype=np.float64))
    inner = root @ np.asarray(sigma2, dtype=np.float64) @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    cross = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross)
    return max(distance, 0.0)  # identical statistics give about -1e-5 from round-off


def digits_fid(images: ImageBatch) -> float:
    """Fréchet distance of `images`' classifier features to the shipped real-digit statistics.

    Lower is better. Biased upwards at small N: only compare numbers computed at the same N; below
    `FID_MIN_IMAGES` the covariance estimate is too noisy to rank configurations, so it warns.
    """
    if len(images) < FID_MIN_IMAGES:
        log.warning(
            "digits FID from %d images is unreliable (it needs >= %d): use it only to compare runs of the same size",
            len(images),
            FID_MIN_IMAGES,
        )
    mu, sigma = gaussian_stats(digits_features(images))
    real_mu, real_sigma = real_statistics()
    return frechet_distance(mu, sigma, real_mu, real_sigma)


@torch.no_grad()
def digits_confidence(images: ImageBatch) -> tuple[float, np.ndarray]:
    """(mean max softmax probability, predicted-class histogram [10]) of the shipped classifier.

    Unconditional samples carry no label, so "accuracy" is measured as confidence: a sample the
    classifier is sure about looks like some digit. The histogram shows mode collapse (all mass
    on a few classes) that confidence alone would miss. Real digits score ~1.0 (training data).
    """
    model, _, _ = _load()
    probs = torch.softmax(model(_as_images(images)), dim=1)
    confidence, predicted = probs.max(dim=1)
    histogram = np.bincount(predicted.numpy(), minlength=10)
    return float(confidence.mean()), histogram


def psnr_db(a: ImageBatch, b: ImageBatch, data_range: float = 2.0) -> float:
    """PSNR in dB of images `a` vs `b` (MSE over all pixels of the batch), both clamped to [-1, 1].

    `data_range` 2.0 is the width of [-1, 1]. Identical images give +inf.
    """
    x = torch.as_tensor(a).detach().double().clamp(-1.0, 1.0)
    y = torch.as_tensor(b).detach().double().clamp(-1.0, 1.0)
    if x.shape != y.shape:
        raise ModiffError(f"psnr_db needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def external_fid(image_dir: str | Path, reference: str | Path) -> float | None:
    """Real (Inception) FID via torch-fidelity or clean-fid when one is installed; else None.

    `image_dir` holds the generated PNGs; `reference` is a folder of real images or a name the
    library knows (torch-fidelity: 'cifar10-train'; clean-fid: 'cifar10'). Both download
    Inception weights on first use, so this needs network access or a warm cache. Returns None
    (and logs how to enable it) when neither library is importable.
    """
    image_dir, ref = str(image_dir), str(reference)
    try:
        import torch_fidelity
    except ImportError:
        torch_fidelity = None
    if torch_fidelity is not None:
        metrics = torch_fidelity.calculate_metrics(
            input1=image_dir, input2=ref, fid=True, cuda=torch.cuda.is_available(), verbose=False
        )
        return float(metrics["frechet_inception_distance"])
    try:
        from cleanfid import fid
    except ImportError:
        log.info(
            "real FID skipped: pip install 'modiff-trt[fid]' (torch-fidelity) or 'modiff-trt[clean-fid]' to compute it"
        )
        return None
    if Path(ref).is_dir():
        return float(fid.compute_fid(image_dir, ref))
    return float(fid.compute_fid(image_dir, dataset_name=ref, dataset_res=32, dataset_split="train"))
