"""The pipeline scope of `run_bench`: whole diffusers generations with the denoiser swapped for a runner,
timed per stage (text encoders, denoiser calls, VAE decode, the rest) like TensorRT's diffusion demo."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from obsdiff.devices import synchronize

from .bench_config import BenchConfig
from .runner_base import Runner
from .runners import RunnerModule
from .timing import Variant, rotated, warm


@contextlib.contextmanager
def instrumented(model, runner: Runner):
    """The model's pipeline with the runner as denoiser and the text encoders, denoiser and VAE decode
    timed (synchronised perf_counter). Yields the dict the stage seconds accumulate in."""
    pipe, attr = model.pipeline, model.family.denoiser_attr
    device = model.denoiser.device
    times = {"text_encoders": 0.0, "denoiser": 0.0, "vae_decode": 0.0, "denoiser_calls": 0}

    def timed(key: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            synchronize(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(device)
            times[key] += time.perf_counter() - t0
            return out

        return wrapper

    def clock(r: Runner, kwargs: dict):
        times["denoiser_calls"] += 1
        return timed("denoiser", lambda: r(**kwargs))()

    original = getattr(pipe, attr)
    object.__setattr__(pipe, attr, RunnerModule(runner, original, clock))
    pipe.__dict__["encode_prompt"] = timed("text_encoders", pipe.encode_prompt)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        vae.__dict__["decode"] = timed("vae_decode", vae.decode)
    try:
        yield times
    finally:
        object.__setattr__(pipe, attr, original)
        pipe.__dict__.pop("encode_prompt", None)
        if vae is not None:
            vae.__dict__.pop("decode", None)


def pipeline_call(model, shapes: dict, cfg: BenchConfig) -> Callable[[], object]:
    """One end-to-end generation of `batch` images (same prompts and seeds every call)."""
    from obsdiff.calibration.prompts import calibration_prompts
    from obsdiff.config import CalibConfig

    prompts = calibration_prompts(CalibConfig(num_prompts=cfg.batch, seed=cfg.seed), model.builtin)
    kwargs = dict(model.generation_defaults) | {"num_inference_steps": cfg.steps, "height": shapes["height"],
                                                "width": shapes["width"], "output_type": "np"}
    device = model.denoiser.device

    def call():
        gens = [torch.Generator(device=device).manual_seed(cfg.seed + i) for i in range(cfg.batch)]
        return model.pipeline(prompt=prompts, generator=gens, **kwargs)

    return call


def time_pipeline(loaded: dict, variants: list[Variant], shapes: dict, cfg: BenchConfig, progress: bool) -> None:
    from obsdiff.runs.loading import quiet_libraries

    with quiet_libraries():  # tokenizer truncation warnings would repeat on every call
        _time_pipeline_quiet(loaded, variants, shapes, cfg, progress)


def _time_pipeline_quiet(loaded: dict, variants: list[Variant], shapes: dict, cfg: BenchConfig,
                         progress: bool) -> None:
    from obsdiff.progress import tqdm

    calls = {label: pipeline_call(m, shapes, cfg) for label, m in loaded.items()}

    def once(v: Variant) -> dict:
        model = loaded[v.model]
        device = model.denoiser.device
        with instrumented(model, v.runner) as times:
            synchronize(device)
            t0 = time.perf_counter()
            out = calls[v.model]()
            synchronize(device)
            times["total"] = time.perf_counter() - t0
        times["other"] = times["total"] - times["text_encoders"] - times["denoiser"] - times["vae_decode"]
        times["images"] = out.images
        return times

    reference_images = {}
    live = [v for v in variants if v.status == "ok"]
    for v in live:
        if v.model not in reference_images:
            reference_images[v.model] = calls[v.model]().images
        try:
            first = once(v)
            v.max_abs_diff = float(abs(first["images"] - reference_images[v.model]).max())
        except Exception as exc:
            v.fail(exc, "first call")
            continue
        warm(v, cfg.warmup, lambda v=v: once(v))
    live = [v for v in live if v.status == "ok"]
    for i in tqdm(range(cfg.iters), desc="bench pipeline", unit="round", disable=not progress):
        for v in rotated(live, i):
            if v.status != "ok":
                continue
            try:
                t = once(v)
            except Exception as exc:
                v.fail(exc, "timed call")
                continue
            t.pop("images")
            v.stage_times.append(t)
            v.times.append(t["total"])


