"""Calibration passes: the real diffusers pipeline over prompts x denoising steps, latents only.

Prompts are encoded once (`encode_batches`) and every pass reuses the embeddings; passes return latents
and never run the VAE decoder. Image i of a pass starts from the noise of seed `seed + i`, so every
group-wise pass sees the same initial latents.

Two calibrators fill Hessians for a group of linears (METHOD.md 6):
- `Calibrator` ("rerun", the paper's method): each group re-runs the whole pipeline on the current model,
  so later denoising steps follow the trajectory of the partly pruned model.
- `CachedCalibrator` ("cached", SparseGPT-style): one pipeline run caches the inputs of the first selected
  block for every (prompt batch, step); each group then runs only its own blocks on those inputs, which are
  carried forward through pruned blocks. The trajectory stays the dense model's.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.errors import ConfigError, UnsupportedModelError
from obsdiff.hessian import HessianAccumulator, timestep_weights
from obsdiff.hooks import HessianHooks, InputCapture, StepCounter, tensors_to
from obsdiff.loading import LoadedModel
from obsdiff.models import Block

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


# ------------------------------------------------------------------------------------------ calibrators


class Calibrator:
    """Encodes the calibration prompts once, then runs hooked passes that fill Hessians for given linears."""

    mode = "rerun"

    def __init__(self, model: LoadedModel, prune: PruneConfig, calib: CalibConfig, progress: bool = True):
        t0 = time.perf_counter()
        self.model, self.calib, self.progress = model, calib, progress
        self.batches = encode_batches(model, calibration_prompts(calib, model.builtin), calib)
        self.encode_seconds = time.perf_counter() - t0
        self.weights = timestep_weights(calib.timestep_weighting, calib.steps, calib.alpha_min, calib.alpha_max)
        self.dtype = torch.float64 if prune.compute_dtype == "fp64" else torch.float32
        self.modules = dict(model.denoiser.named_modules())
        self.device = model.denoiser.device

    def stats(self) -> dict:
        """What the report records about calibration beyond the group timings."""
        return {"mode": self.mode}

    def _accumulators(self, linears: list[str]) -> dict[str, HessianAccumulator]:
        return {name: HessianAccumulator(self.modules[name].in_features, self.device, self.dtype, self.calib.max_tokens,
                                         seed=self.calib.seed + i) for i, name in enumerate(linears)}

    def hessians(self, linears: list[str], desc: str) -> tuple[dict[str, HessianAccumulator], float]:
        """One pass over the current model; returns an accumulator per linear (by name) and the seconds."""
        t0 = time.perf_counter()
        counter = StepCounter()
        accs = self._accumulators(linears)
        with HessianHooks(counter, self.weights) as hooks:
            for name, acc in accs.items():
                hooks.watch(self.modules[name], acc)
            run_pass(self.model, self.batches, self.calib, counter, desc=desc, progress=self.progress)
        return accs, time.perf_counter() - t0


class CachedCalibrator(Calibrator):
    """Hessians from cached block inputs: the pipeline runs once, then groups run only their own blocks.

    Holds the inputs of one block, the *frontier*, for every denoiser call of the capture pass, computed
    through the current (pruned) weights of the blocks before it. A group's Hessians come from running its
    blocks on the frontier inputs after moving the frontier up to its first block. Groups must be asked for
    in forward order, as the prune loop does; asking for an earlier block (a second sweep, like the
    sensitivity allocation followed by the prune) captures again.
    """

    mode = "cached"

    def __init__(self, model: LoadedModel, prune: PruneConfig, calib: CalibConfig, blocks: list[Block],
                 progress: bool = True):
        super().__init__(model, prune, calib, progress)
        self.family = model.family
        self.blocks = blocks
        self.block_of = block_positions(blocks, self.modules)
        self.cache_device = torch.device(calib.cache_device) if calib.cache_device else self.device
        self.cache: list[tuple[dict, int]] | None = None
        self.frontier = 0
        self.captures = 0
        self.capture_seconds = 0.0
        self.advance_seconds = 0.0
        self.cache_bytes = 0

    def stats(self) -> dict:
        return {"mode": self.mode, "captures": self.captures, "capture_seconds": self.capture_seconds,
                "advance_seconds": self.advance_seconds, "cache_bytes": self.cache_bytes,
                "cache_calls": len(self.cache or ()), "cache_device": str(self.cache_device)}

    def _capture(self) -> None:
        t0 = time.perf_counter()
        self.cache = None  # free the old cache before filling a new one
        counter = StepCounter()
        calls = len(self.batches) * self.calib.steps  # one denoiser call per step (CFG rows share it)

        def check_fits(kwargs: dict) -> None:
            per_call = tensor_bytes(kwargs)
            need, free = calls * per_call, free_bytes(self.cache_device)
            if free is not None and need > 0.9 * free:
                raise ConfigError(
                    f"cached calibration would keep {need / 2**30:.1f} GiB of block inputs ({calls} calls x "
                    f"{per_call / 2**20:.0f} MiB) but {self.cache_device} has {free / 2**30:.1f} GiB "
                    "free; use --cache-device cpu, fewer --num-prompts or --steps, or --calibration-mode rerun")

        with InputCapture(self.blocks[0].module, counter, self.cache_device, check_fits) as capture:
            run_pass(self.model, self.batches, self.calib, counter, desc="capture block inputs",
                     progress=self.progress)
        self.cache, self.frontier = capture.calls, 0
        self.cache_bytes = max(self.cache_bytes, sum(tensor_bytes(kw) for kw, _ in self.cache))
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def _run_blocks(self, start: int, stop: int, kwargs: dict) -> dict:
        """Blocks [start, stop) on one call's inputs (on the model's device); returns the inputs of block `stop`."""
        for block in self.blocks[start:stop]:
            kwargs = self.family.next_block_inputs(block.module(**kwargs), kwargs)
        return kwargs

    def hessians(self, linears: list[str], desc: str) -> tuple[dict[str, HessianAccumulator], float]:
        """Move the frontier up to the group's first block, then run the group's blocks with hooks.

        Both happen in one sweep over the cached calls, so each call's inputs travel to the model's device
        once (the advance only runs blocks before the hooked ones, which no hook sees).
        """
        t0 = time.perf_counter()
        outside = [n for n in linears if n not in self.block_of]
        if outside:
            raise ConfigError(f"layer {outside[0]} is outside the selected blocks; cached calibration covers "
                              "--blocks only")
        first = min(self.block_of[n] for n in linears)
        last = max(self.block_of[n] for n in linears)
        if self.cache is None or first < self.frontier:
            self._capture()
        start, advancing = self.frontier, self.frontier < first
        counter = StepCounter()
        accs = self._accumulators(linears)
        with HessianHooks(counter, self.weights) as hooks:
            for name, acc in accs.items():
                hooks.watch(self.modules[name], acc)
            for i, (kwargs, step) in enumerate(tqdm(self.cache, desc=desc, unit="call", leave=False,
                                                      disable=not self.progress)):
                kwargs = tensors_to(kwargs, self.device)
                if advancing:
                    t1 = time.perf_counter()
                    kwargs = self._run_blocks(start, first, kwargs)
                    self.cache[i] = (tensors_to(kwargs, self.cache_device), step)
                    self._sync()
                    self.advance_seconds += time.perf_counter() - t1
                counter.step = step
                self._run_blocks(first, last + 1, kwargs)
        self.frontier = first
        return accs, time.perf_counter() - t0

    def _sync(self) -> None:  # so that the advance's share of the time is measured on an accelerator too
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)


def block_positions(blocks: list[Block], names) -> dict[str, int]:
    """{dotted module name: position in `blocks`} for the names that lie inside one of the blocks."""
    return {name: i for i, b in enumerate(blocks) for name in names if name.startswith(b.name + ".")}


def tensor_bytes(obj) -> int:
    """Bytes of all tensors in `obj` (nested tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def free_bytes(device: torch.device) -> int | None:
    """Memory still available on `device` (an accelerator's free memory, or available RAM), None if unknown."""
    if device.type != "cpu":
        get_info = getattr(torch.accelerator, "get_memory_info", None)  # recent torch only
        return get_info(device)[0] if get_info is not None else None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def make_calibrator(model: LoadedModel, prune: PruneConfig, calib: CalibConfig, blocks: list[Block],
                    progress: bool = True) -> Calibrator:
    """The calibrator of `calib.mode` over the selected `blocks` (forward order).

    Cached mode is refused before any prompt is encoded for families whose denoiser is not a chain of blocks.
    """
    if calib.mode == "rerun":
        return Calibrator(model, prune, calib, progress)
    if not model.family.chains_blocks:
        raise UnsupportedModelError(f"the {model.family.name} denoiser is not a plain chain of blocks, so block "
                                    "inputs cannot be cached; use --calibration-mode rerun")
    return CachedCalibrator(model, prune, calib, blocks, progress)
