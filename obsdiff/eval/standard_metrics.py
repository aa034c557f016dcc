"""Standard image metrics through torchmetrics (the `metrics` extra): CLIPScore and FID on torch-fidelity's
Inception-v3, the implementations papers report. Imported only with `--standard-metrics`."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from obsdiff.errors import MissingDependencyError, ModelLoadError, first_line

# torch-fidelity's Inception-v3 (a port of the TensorFlow FID network): where torch.hub caches it, and its source
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def inception_weights(path: str | None) -> Path:
    """The FID Inception weights file: `path`, or torch-fidelity's file in the torch hub cache."""
    if path is None:
        found = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not found.is_file():
            raise ModelLoadError(f"FID needs Inception weights and {found} does not exist; download {INCEPTION_URL} "
                                 "there once, or pass --inception-weights FILE")
        return found
    if not Path(path).is_file():
        raise ModelLoadError(f"--inception-weights {path!r} is not a file; pass torch-fidelity's {INCEPTION_FILE}")
    return Path(path)


def _require(module: str, purpose: str) -> None:
    """Import `module` or raise one line saying what to install. A torchvision built for another torch (PyPI's
    CUDA build next to the CPU wheel) makes torchmetrics and torch-fidelity fail at import with a RuntimeError."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{purpose} needs {module}, which is not installed; "
                                     "pip install 'obsdiff[metrics]'") from None
    except RuntimeError as exc:
        raise MissingDependencyError(f"{purpose}: {module} does not import with this torch ({torch.__version__}): "
                                     f"{first_line(exc)}; install the torchvision built for this torch") from None


def require_torchmetrics() -> None:
    _require("torchmetrics", "--standard-metrics")


class TensorFeatures(torch.nn.Module):
    """A CLIPModel whose feature methods return tensors: transformers 5 returns model outputs (the features in
    `pooler_output`) where torchmetrics (1.9) expects the tensor itself."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads the text length limit from it

    def get_image_features(self, pixel_values):
        out = self.model.get_image_features(pixel_values=pixel_values)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, input_ids, attention_mask=None):
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, "pooler_output", out)


class StandardMetrics:
    """torchmetrics' CLIPScore and FID, built before any image is generated so that a missing package or
    weights file fails at once. `fid_features` replaces the Inception network (tests)."""

    def __init__(self, clip, fid_weights: Path | None, fid_features: torch.nn.Module | None = None):
        from torchmetrics.multimodal.clip_score import CLIPScore

        model, processor = clip
        self.clip_score = CLIPScore(model_name_or_path=lambda: (TensorFeatures(model), processor))
        self.fid = None
        if fid_weights is not None or fid_features is not None:
            self.fid = _fid_metric(fid_weights, fid_features)

    def clip(self, images: np.ndarray, prompts: list[str]) -> float:
        self.clip_score.reset()
        self.clip_score.update(list(_uint8_chw(images)), prompts)
        return float(self.clip_score.compute())

    def fid_vs(self, images: np.ndarray, reference: np.ndarray) -> float:
        self.fid.reset()
        self.fid.update(_uint8_chw(reference), real=True)
        self.fid.update(_uint8_chw(images), real=False)
        return float(self.fid.compute())


def require_fidelity() -> None:
    _require("torch_fidelity", "FID")


def _fid_metric(weights: Path | None, features: torch.nn.Module | None):
    from torchmetrics.image.fid import FrechetInceptionDistance

    if features is not None:
        return FrechetInceptionDistance(feature=features)
    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))


def _uint8_chw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) floats in [0, 1] -> (N, 3, H, W) uint8, as torchmetrics' image metrics take them."""
    pixels = torch.from_numpy((np.clip(images, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


def standard_metrics(clip, with_reference: bool, weights: str | None = None,
                     fid_features: torch.nn.Module | None = None) -> StandardMetrics:
    """`StandardMetrics` on `clip` (what `evaluate.load_clip` returns); FID only with a reference to compare
    against, on the Inception weights `weights` (None: the torch hub cache) unless `fid_features` is given."""
    require_torchmetrics()
    fid_weights = None
    if with_reference and fid_features is None:
        require_fidelity()
        fid_weights = inception_weights(weights)
    return StandardMetrics(clip, fid_weights, fid_features if with_reference else None)
