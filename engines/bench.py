"""Latency of a model and its dense reference on every backend, interleaved, as ratios to the dense model.

    result = run_bench({"dense": "builtin:digits", "2:4": "runs/digits-24"}, BenchConfig(backends=("torch",)),
                       reference="dense")

Scopes: `denoiser` times one denoiser forward on example inputs; `pipeline` times the whole diffusers
pipeline (text encoders, every denoising step, VAE decode) with the denoiser replaced by the backend,
per stage like TensorRT's diffusion demo. Warm-up calls are not timed; on CUDA, denoiser calls are timed
with CUDA events, everything else with `time.perf_counter` around synchronised calls. Variants (model x
backend) are measured round-robin, so load changes on a shared machine hit them alike.

Result JSON (`schema` "obsdiff.bench", `schema_version` 1):

    config, device, inputs {batch, height, width, latent_height, latent_width, text_len, steps}
    models {label: {ref, parameters, flops_per_forward, flop_ratio, sparsity_type, reference}}
    baseline {model, backend}: the row every `ratio` divides by (the dense reference on PyTorch eager)
    rows [{model, backend, status: ok|skipped|failed, reason, details,
           latency_ms {median, p90, iqr, stdev, mean, min, n}, ratio {median, p90} (to the baseline),
           ratio_same_backend {median, p90} (to the reference model on this backend), speedup,
           max_abs_diff_vs_torch, stages {name: {latency_ms, ratio}} and images_per_s (pipeline scope)}]
    versions, machine, created, seconds
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch

from obsdiff.devices import time_call
from obsdiff.errors import ConfigError
from obsdiff.runs.artifacts import machine, versions

from .bench_config import BenchConfig
from .pipeline_bench import time_pipeline
from .runner_base import InputRanges, RunnerUnavailable
from .runners import make_runner
from .timing import Variant, rotated, summarize, warm

log = logging.getLogger(__name__)

SCHEMA = "obsdiff.bench"
SCHEMA_VERSION = 1
STAGES = ("text_encoders", "denoiser", "vae_decode", "other", "total")


# -------------------------------------------------------------------------------------------- shapes


def _load(models, cfg: BenchConfig) -> dict:
    from obsdiff.runs.loading import LoadedModel, as_loaded, load_pipeline

    if isinstance(models, str | Path) or not isinstance(models, Mapping):
        models = {None: models}
    loaded = {}
    for label, m in models.items():
        lm = load_pipeline(str(m), device=cfg.device, dtype=cfg.dtype) if isinstance(m, str | Path) else (
            m if isinstance(m, LoadedModel) else as_loaded(m))
        name = label or lm.name
        while name in loaded:
            name += "'"
        loaded[name] = lm
    return loaded


def bench_shapes(model, cfg: BenchConfig) -> dict:
    """Image and latent sizes, text tokens and denoiser batch rows the benchmark runs at."""
    pipe, fam, den = model.pipeline, model.family, model.denoiser
    factor = getattr(pipe, "vae_scale_factor", None) or 8
    defaults = model.generation_defaults
    size = getattr(pipe, "default_sample_size", None) or den.config.sample_size
    height = cfg.height or defaults.get("height") or size * factor
    width = cfg.width or defaults.get("width") or size * factor
    msl = defaults.get("max_sequence_length")
    text = fam.text_len(pipe, msl)
    if text is None:
        try:
            text = fam.onnx_default_ranges(pipe, msl)["text"][1]
        except Exception:
            text = 77
    return {"batch": cfg.batch, "height": int(height), "width": int(width), "latent_height": int(height) // factor,
            "latent_width": int(width) // factor, "text_len": int(text), "steps": cfg.steps}


def input_ranges(shapes: dict, scope: str) -> InputRanges:
    """Shapes graph backends are built for: fixed, except the pipeline's batch (CFG may double it)."""
    b, h, w, t = shapes["batch"], shapes["latent_height"], shapes["latent_width"], shapes["text_len"]
    if scope == "pipeline":
        return InputRanges((b, 2 * b, 2 * b), (h, h, h), (w, w, w), (t, t, t))
    return InputRanges.fixed(b, h, w, t)


# ---------------------------------------------------------------------------------------------- run


def run_bench(models, config: BenchConfig | None = None, reference: str | None = None,
              onnx: Mapping[str, str | Path] | None = None, engines: Mapping[str, str | Path] | None = None,
              progress: bool = False) -> dict:
    """Time every (model, backend) of `models` ({label: `--model` value, run dir or `LoadedModel`}, or one).

    `reference`: the label of the dense model the ratios divide by (default: the first model). `onnx` /
    `engines`: {label: export dir or .onnx / .plan} for the graph backends; without one they export (and
    build) on the fly. Backends that cannot run are kept as rows with status "skipped" and the reason.
    """
    cfg = config or BenchConfig()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_bench(models, cfg, reference, onnx, engines, progress)
    finally:
        torch.set_num_threads(threads)


def _run_bench(models, cfg: BenchConfig, reference, onnx, engines, progress: bool) -> dict:
    t_start = time.perf_counter()
    loaded = _load(models, cfg)
    labels = list(loaded)
    reference = reference if reference is not None else labels[0]
    if reference not in loaded:
        raise ConfigError(f"reference {reference!r} is not one of the models {', '.join(labels)}")
    shapes = bench_shapes(loaded[reference], cfg)
    ranges = input_ranges(shapes, cfg.scope)
    variants = _prepare(loaded, cfg, ranges, onnx or {}, engines or {})
    gen = torch.Generator().manual_seed(cfg.seed)
    ref_model = loaded[reference]
    inputs = ref_model.family.example_inputs(ref_model.denoiser, batch=shapes["batch"],
                                             height=shapes["latent_height"], width=shapes["latent_width"],
                                             text_len=shapes["text_len"], generator=gen)
    model_info = _describe(loaded, reference, inputs)
    try:
        if cfg.scope == "denoiser":
            _time_denoiser(loaded, variants, inputs, cfg, progress)
        else:
            time_pipeline(loaded, variants, shapes, cfg, progress)
    finally:
        for v in variants:
            if v.runner is not None:
                v.runner.close()
    device = next(iter(loaded.values())).denoiser.device
    result = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "scope": cfg.scope, "config": cfg.to_dict(),
              "device": _device_name(device), "inputs": shapes, "models": model_info, "reference": reference}
    result |= _rows(variants, reference, cfg)
    result |= {"versions": versions(), "machine": machine(), "seconds": time.perf_counter() - t_start,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({cpu_name()}, {n} thread{'s' if n != 1 else ''})"


def cpu_name() -> str:
    import platform

    try:  # Linux names the model here; platform.processor() is often empty
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _prepare(loaded: dict, cfg: BenchConfig, ranges: InputRanges, onnx: Mapping, engines: Mapping) -> list[Variant]:
    variants = []
    for label, model in loaded.items():
        for backend in cfg.backends:
            v = Variant(label, backend)
            variants.append(v)
            opts = dict(cfg.backend_options.get(backend, {}))
            if backend in ("onnxruntime", "tensorrt") and label in onnx:
                opts["onnx"] = onnx[label]
            if backend == "tensorrt" and label in engines:
                opts["engine"] = engines[label]
            try:
                runner = make_runner(backend, **opts)
                ok, why = runner.available()
                if not ok:
                    v.status, v.reason = "skipped", why
                    continue
                runner.prepare(model, ranges)
                v.runner = runner
            except RunnerUnavailable as exc:
                v.status, v.reason = "skipped", str(exc)
            except Exception as exc:
                v.fail(exc, "prepare")
    return variants


def _describe(loaded: dict, reference: str, inputs: dict) -> dict:
    from obsdiff.pruning.flops import forward_flops, parameter_count

    info = {}
    for label, model in loaded.items():
        den = model.denoiser
        kw = {k: v.to(next(den.parameters()).device) for k, v in inputs.items()}
        try:
            flops = forward_flops(den, kw)
        except Exception as exc:  # FLOP counting is informative only
            log.debug("flop count failed for %s: %s", label, exc)
            flops = None
        info[label] = {"ref": model.ref, "parameters": parameter_count(den), "flops_per_forward": flops,
                       "sparsity_type": model.run.sparsity_type if model.run else None,
                       "reference": label == reference}
    base = info[reference]["flops_per_forward"]
    for rec in info.values():
        rec["flop_ratio"] = rec["flops_per_forward"] / base if base and rec["flops_per_forward"] else None
    return info


def _time_denoiser(loaded: dict, variants: list[Variant], inputs: dict, cfg: BenchConfig, progress: bool) -> None:
    from obsdiff.progress import tqdm

    reference_out = {}
    live = [v for v in variants if v.status == "ok"]
    per_variant_inputs = {}
    for v in live:
        kw = {k: t.to(device=v.runner.device, dtype=v.runner.dtype if t.is_floating_point() else t.dtype)
              for k, t in inputs.items()}
        per_variant_inputs[id(v)] = kw
        if v.model not in reference_out:
            den = loaded[v.model].denoiser
            with torch.inference_mode():
                reference_out[v.model] = den(**kw, return_dict=False)[0].float().cpu()
        try:
            out = v.runner(**kw)
            v.max_abs_diff = float((out.float().cpu() - reference_out[v.model]).abs().max())
        except Exception as exc:
            v.fail(exc, "first call")
            continue
        warm(v, cfg.warmup, lambda v=v, kw=kw: v.runner(**kw))
    live = [v for v in live if v.status == "ok"]
    for i in tqdm(range(cfg.iters), desc="bench", unit="round", disable=not progress):
        for v in rotated(live, i):
            if v.status != "ok":
                continue
            kw = per_variant_inputs[id(v)]
            try:
                v.times.append(time_call(lambda v=v, kw=kw: v.runner(**kw), v.runner.device))
            except Exception as exc:
                v.fail(exc, "timed call")


# -------------------------------------------------------------------------------------------- results


def _rows(variants: list[Variant], reference: str, cfg: BenchConfig) -> dict:
    ok = {(v.model, v.backend): v for v in variants if v.status == "ok" and v.times}
    base = (reference, "torch") if (reference, "torch") in ok else next(
        (k for k in ok if k[0] == reference), next(iter(ok), None))
    rows = []
    stats = {k: summarize(v.times) for k, v in ok.items()}
    stage_stats = {k: {s: summarize([t[s] for t in v.stage_times]) for s in STAGES}
                   for k, v in ok.items() if v.stage_times}
    for v in variants:
        row = {"model": v.model, "backend": v.backend, "status": v.status, "reason": v.reason or None,
               "details": v.runner.details if v.runner is not None else {}}
        key = (v.model, v.backend)
        if key in stats:
            s = stats[key]
            b = stats[base]
            same = stats.get((reference, v.backend))
            row |= {"latency_ms": s, "ratio": {"median": s["median"] / b["median"], "p90": s["p90"] / b["p90"]},
                    "ratio_same_backend": ({"median": s["median"] / same["median"], "p90": s["p90"] / same["p90"]}
                                           if same else None),
                    "speedup": b["median"] / s["median"], "max_abs_diff_vs_torch": v.max_abs_diff}
            if key in stage_stats:
                bs = stage_stats.get(base, {})
                row["stages"] = {name: {"latency_ms": st,
                                        "ratio": st["median"] / bs[name]["median"] if bs and bs[name]["median"] > 0
                                        else None}
                                 for name, st in stage_stats[key].items()}
                row["denoiser_calls"] = v.stage_times[0]["denoiser_calls"]
                row["images_per_s"] = cfg.batch / (s["median"] / 1e3)
        rows.append(row)
    return {"baseline": {"model": base[0], "backend": base[1]} if base else None, "rows": rows}
