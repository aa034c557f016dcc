"""Calibration passes: the real diffusers pipeline over prompts x denoising steps, latents only.

Prompts are encoded once (`encode_batches`) and every pass reuses the embeddings; passes return latents
and never run the VAE decoder. Image i of a pass starts from the noise of seed `seed + i`, so every
group-wise pass sees the same initial latents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from obsdiff.config import CalibConfig
from obsdiff.errors import ConfigError
from obsdiff.hooks import StepCounter
from obsdiff.loading import LoadedModel

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
        path = Path(calib.prompts)
        if not path.is_file():
            raise ConfigError(f"--prompts {calib.prompts!r}: no such file; pass a text file or 'builtin'")
        pool = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not pool:
            raise ConfigError(f"--prompts {calib.prompts!r} is empty; put one prompt per line")
    random.Random(calib.seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(calib.num_prompts)]


@dataclass
class CalibBatch:
    embeddings: dict[str, torch.Tensor]
    seeds: list[int]


def encode_batches(model: LoadedModel, prompts: list[str], calib: CalibConfig) -> list[CalibBatch]:
    """Encode all calibration prompts once, in batches of `calib.batch_size`."""
    msl = model.generation_defaults.get("max_sequence_length")
    batches = []
    for start in range(0, len(prompts), calib.batch_size):
        chunk = prompts[start:start + calib.batch_size]
        emb = model.family.encode_prompts(model.pipeline, chunk, calib.guidance, msl)
        batches.append(CalibBatch(emb, [calib.seed + start + i for i in range(len(chunk))]))
    return batches


@torch.no_grad()
def run_pass(model: LoadedModel, batches: list[CalibBatch], calib: CalibConfig, counter: StepCounter,
             desc: str = "calibrate", progress: bool = True) -> None:
    """One calibration pass over all batches; hooks registered by the caller see every denoiser call."""
    pipe = model.pipeline
    device = model.denoiser.device
    size = {k: model.generation_defaults[k] for k in ("height", "width") if k in model.generation_defaults}
    size |= {k: v for k, v in (("height", calib.height), ("width", calib.width)) if v is not None}
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
        counter.reset()
        gens = [torch.Generator(device=device).manual_seed(s) for s in batch.seeds]
        pipe(**batch.embeddings, **size, num_inference_steps=calib.steps, guidance_scale=calib.guidance,
             generator=gens, output_type="latent", callback_on_step_end=counter.on_step_end)
