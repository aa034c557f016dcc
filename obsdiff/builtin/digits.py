"""`builtin:digits`: a small SD3 pipeline trained on scikit-learn's handwritten digits, and its judge.

Everything here describes the shipped artefacts (prompt templates, image format, the classifier's
architecture, generation settings); `tools/train_digits.py` produces them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DATA_DIR = Path(__file__).parent / "data" / "digits"
PIPELINE_DIR = DATA_DIR / "pipeline"
CLASSIFIER_FILE = DATA_DIR / "classifier.safetensors"
REAL_TEST_FILE = DATA_DIR / "real_test.npz"
META_FILE = DATA_DIR / "meta.json"

IMAGE_SIZE = 16
TEXT_LEN = 8  # CLIP and T5 lengths; generation must pass the same max_sequence_length as training

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit as a word, {n}: as a numeral. Training sees TRAIN_TEMPLATES only; evaluation uses the
# held-out EVAL_TEMPLATES, so the measured accuracy is on prompts the model never saw.
TRAIN_TEMPLATES = (
    "a handwritten digit {w}",
    "the number {n}",
    "a sloppy {n}",
    "a neat {w}",
    "digit {w}",
    "a drawing of the number {w}",
    "{n}",
    "a scribbled {w}",
)
EVAL_TEMPLATES = (
    "a handwritten {n}",
    "the digit {w}",
    "a neat handwritten {n}",
    "a drawing of a sloppy {w}",
)


@dataclass(frozen=True)
class GenerationDefaults:
    """Settings that the digits pipeline was trained for (passed to the diffusers pipeline call)."""

    height: int = IMAGE_SIZE
    width: int = IMAGE_SIZE
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    max_sequence_length: int = TEXT_LEN


def prompt(template: str, digit: int) -> str:
    return template.format(w=DIGIT_WORDS[digit], n=str(digit))


def vocabulary() -> list[str]:
    """Every word the prompt templates can produce: the tokenizers are built from this list."""
    words = set(DIGIT_WORDS) | {str(d) for d in range(10)}
    for t in TRAIN_TEMPLATES + EVAL_TEMPLATES:
        words |= {w for w in t.split() if not w.startswith("{")}
    return sorted(words)


def eval_prompts(n: int) -> tuple[list[str], list[int]]:
    """`n` held-out prompts cycling over digits (fastest) and templates, with their digit labels."""
    prompts, labels = [], []
    for i in range(n):
        digit = i % 10
        template = EVAL_TEMPLATES[(i // 10) % len(EVAL_TEMPLATES)]
        prompts.append(prompt(template, digit))
        labels.append(digit)
    return prompts, labels


def digit_of_prompt(text: str) -> int | None:
    """The digit a prompt asks for, or None when it names none or several."""
    found = {DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w) for w in text.lower().split()
             if w in DIGIT_WORDS or (w.isdigit() and len(w) == 1)}
    return found.pop() if len(found) == 1 else None


class DigitClassifier(nn.Module):
    """A small CNN on 1x16x16 images in [-1, 1]. `features` (128-d) feed the Frechet distance."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_model_images(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, H, W, 1) floats in [0, 1] or uint8 -> (N, 1, 16, 16) float32 in [-1, 1]."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim == 4:
        x = x.mean(axis=-1)  # any channel count: grayscale
    t = torch.from_numpy(x)[:, None]
    if t.shape[-1] != IMAGE_SIZE or t.shape[-2] != IMAGE_SIZE:
        t = F.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return t * 2 - 1


@lru_cache(maxsize=1)
def load_classifier() -> DigitClassifier:
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(CLASSIFIER_FILE).items()})
    return model.eval()


def load_real_test() -> tuple[np.ndarray, np.ndarray]:
    """The held-out real digits: uint8 images (N, 16, 16) and labels (N,)."""
    with np.load(REAL_TEST_FILE) as f:
        return f["images"], f["labels"]


def load_meta() -> dict:
    return json.loads(META_FILE.read_text()) if META_FILE.exists() else {}
