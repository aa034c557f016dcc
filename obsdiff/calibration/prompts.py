"""Calibration prompts: the builtin sets, and the one reader of `--prompts` files (calibration and `obsdiff eval`)."""

from __future__ import annotations

import random
from pathlib import Path

from obsdiff.config import CalibConfig
from obsdiff.errors import ConfigError

_SUBJECTS = ("a red fox", "an old lighthouse", "a bowl of ramen", "a vintage car", "a mountain lake",
             "a city street at night", "a portrait of a woman", "a robot", "a sailing ship", "a cup of tea",
             "a golden retriever", "a medieval castle", "a field of sunflowers", "an astronaut",
             "a wooden cabin", "a hummingbird", "a desert canyon", "a bicycle", "a jellyfish", "a cathedral")
_STYLES = ("a photograph of {}", "an oil painting of {}", "{}, watercolor", "a 3d render of {}",
           "{} in the style of a pencil sketch")


def generic_prompts() -> list[str]:
    """100 varied prompts (20 subjects x 5 styles) for models without their own calibration set."""
    return [style.format(subject) for subject in _SUBJECTS for style in _STYLES]


def calibration_prompts(calib: CalibConfig, builtin: str | None) -> list[str]:
    """`calib.num_prompts` prompts, shuffled with the seed, cycled if the source is shorter."""
    if calib.prompts == "builtin":
        if builtin == "digits":
            from obsdiff.builtin.digits import TRAIN_TEMPLATES, prompt

            pool = [prompt(t, d) for t in TRAIN_TEMPLATES for d in range(10)]
        else:
            pool = generic_prompts()
    else:
        pool = read_prompts(calib.prompts, "pass a text file, one prompt per line, or 'builtin'")
    random.Random(calib.seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(calib.num_prompts)]


def read_prompts(path: str | Path, fix: str = "pass a text file, one prompt per line") -> list[str]:
    """The prompts of a `--prompts` file, one per line (stripped, blank lines dropped): the one reader of prompts
    files, for calibration and `obsdiff eval`. A missing, unreadable, non-UTF-8 or empty file is a one-line
    ConfigError naming it (`fix`: what to pass instead)."""
    from obsdiff.runs.artifacts import read_text

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--prompts {str(path)!r}: no such file; {fix}")
    text = read_text(path, "prompts file", "save it as UTF-8 text, one prompt per line", ConfigError)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts {str(path)!r} is empty; put one prompt per line")
    return prompts
