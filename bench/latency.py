"""CPU latency of pruned denoisers: dense vs 50 % unstructured vs 2:4 vs structured 30 %, PyTorch and onnxruntime.

    python bench/latency.py [--out bench/results/latency.json] [--iters 5] [--quick]

Models: builtin:digits (denoiser scope, batch 32 = 16 images with CFG; and pipeline scope, 16 images at its
20 steps) and a complete SD3 pipeline with random weights whose denoiser is wider (hidden 512 = 8 heads x 64,
8 blocks, 64x64 latents = 1024 image tokens + 333 text tokens; denoiser scope, and pipeline scope: one
512 px image, 10 steps, CFG, small text encoders and an 8x VAE). Pruned with magnitude scores: latency does
not depend on which weights are zero, and the structured variant removes the same number of heads and
neurons as OBS-Diff would at 30 %. Every figure is a median of interleaved iterations, as a ratio to the dense model
measured in the same run on the same backend.

Expected on CPU: structured pruning speeds up close to its FLOP reduction; unstructured and 2:4 sparsity
give nothing (zeros are multiplied like any other weight: there are no sparse CPU kernels for them).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from common import save_results  # bench/ is the script's directory

from obsdiff.config import PruneConfig
from obsdiff.engines.bench import BenchConfig, run_bench
from obsdiff.pruning.prune import prune_
from obsdiff.runs.artifacts import machine, versions
from obsdiff.runs.loading import as_loaded, load_pipeline
from obsdiff.tables import format_table

VARIANTS = {
    "unstructured 50%": PruneConfig(method="magnitude", sparsity=0.5),
    "2:4": PruneConfig(method="magnitude", sparsity_type="2:4"),
    "structured 30%": PruneConfig(method="magnitude", sparsity_type="structured", sparsity=0.3),
}
EXPECTED = ("Expected on CPU: structured pruning gives speedups close to its FLOP reduction; unstructured and 2:4 "
            "give none (no sparse CPU kernels: zeros are multiplied like any other weight).")


def onnx_exporter() -> str | None:
    """None if obsdiff's ONNX exporter can be used, else why not."""
    try:
        from obsdiff.export.onnx_export import ExportConfig, export_onnx  # noqa: F401
    except Exception as exc:
        return f"the ONNX exporter is not available ({type(exc).__name__}: {exc})"
    return None


def digits_models() -> dict:
    models = {"dense": load_pipeline("builtin:digits")}
    for label, cfg in VARIANTS.items():
        model = load_pipeline("builtin:digits")
        prune_(model, cfg, progress=False)
        models[label] = model
    return models


def wide_pipeline(blocks: int = 8, heads: int = 8, head_dim: int = 64, sample: int = 64):
    """A complete SD3 pipeline with random weights whose denoiser is SD3-shaped and wide (hidden
    heads x head_dim, 16 latent channels, `sample` x `sample` latents) behind small text encoders and an
    8x VAE, so the pipeline scope is end to end (text encoders, denoiser steps, VAE decode)."""
    from obsdiff.calibration.prompts import generic_prompts
    from obsdiff.models.sd3 import build_sd3_pipeline
    from obsdiff.models.text import TextStackConfig

    words = sorted({w.strip(",.").lower() for p in generic_prompts() for w in p.split()})
    # 77 CLIP tokens like SD3; the T5 stream is padded to the pipeline's 256 tokens: 333 text tokens
    text = TextStackConfig(clip_hidden=(64, 64), clip_projection=(64, 64), t5_d_model=256, max_length=77)
    return build_sd3_pipeline(words, num_layers=blocks, num_heads=heads, head_dim=head_dim, sample_size=sample,
                              latent_channels=16, vae_channels=(16, 32, 64, 64), text=text)


def wide_models(**sizes) -> dict:
    """The dense `wide_pipeline(**sizes)` and its pruned variants."""
    pipe = wide_pipeline(**sizes)
    models = {"dense": as_loaded(pipe)}
    for label, cfg in VARIANTS.items():
        model = as_loaded(copy.deepcopy(pipe))
        prune_(model, cfg, progress=False)
        models[label] = model
    return models


def summary_table(result: dict) -> tuple[str, list[dict]]:
    """Variant x backend: median ms, ratio to dense on the same backend, FLOP and parameter ratios."""
    models = result["models"]
    dense_params = models[result["reference"]]["parameters"]
    backends = list(dict.fromkeys(r["backend"] for r in result["rows"]))
    rows, records = [], []
    for label, info in models.items():
        cells = [label]
        for backend in backends:
            r = next(r for r in result["rows"] if r["model"] == label and r["backend"] == backend)
            if r["status"] != "ok":
                cells += ["", f"{r['status']}"]
                continue
            ratio = r["ratio_same_backend"]["median"] if r["ratio_same_backend"] else None
            cells += [r["latency_ms"]["median"], f"{ratio:.3f}" if ratio else ""]
            records.append({"model": label, "backend": backend, "median_ms": r["latency_ms"]["median"],
                            "latency_ratio": ratio, "flop_ratio": info["flop_ratio"]})
        cells += [f"{info['flop_ratio']:.3f}" if info["flop_ratio"] else "",
                  f"{info['parameters'] / dense_params:.3f}"]
        rows.append(cells)
    headers = ["variant"] + [h for b in backends for h in (f"{b} ms", f"{b} x dense")] + ["denoiser FLOPs x dense",
                                                                                       "params x dense"]
    return format_table(headers, rows), records


def stage_table(result: dict) -> str:
    """Pipeline scope: where the time goes (median ms per stage) per variant and backend."""
    stages = ("text_encoders", "denoiser", "vae_decode", "other", "total")
    ok = [r for r in result["rows"] if r["status"] == "ok" and r.get("stages")]

    def ms(r, stage):
        return r["stages"][stage]["latency_ms"]["median"]

    dense = {r["backend"]: ms(r, "denoiser") for r in ok if r["model"] == result["reference"]}
    rows = []
    for r in ok:
        ratio = ms(r, "denoiser") / dense[r["backend"]] if r["backend"] in dense else None
        rows.append([r["model"], r["backend"]] + [round(ms(r, s), 1) for s in stages]
                    + [f"{ratio:.3f}" if ratio else "", f"{r['images_per_s']:.2f}"])
    header = ["variant", "backend", "text encoders ms", "denoiser ms", "VAE decode ms", "other ms", "total ms",
              "denoiser x dense (same backend)", "images/s"]
    return format_table(header, rows)


def verdict(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        if r["model"] == "dense" or r["latency_ratio"] is None:
            continue
        if r["model"].startswith("structured"):
            lines.append(f"- {r['model']} on {r['backend']}: {1 / r['latency_ratio']:.2f}x faster, FLOP reduction "
                         f"{1 / r['flop_ratio']:.2f}x (latency ratio {r['latency_ratio']:.3f} vs FLOP ratio "
                         f"{r['flop_ratio']:.3f})")
        else:
            lines.append(f"- {r['model']} on {r['backend']}: latency ratio {r['latency_ratio']:.3f} "
                         f"(FLOPs unchanged: {r['flop_ratio']:.3f})")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/latency.json"))
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per variant [denoiser 20/5, pipeline 5]")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few iterations, small wide model")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch and onnxruntime")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    # one thread for PyTorch and onnxruntime alike: on a shared 2-core machine a second OpenMP thread that
    # loses its core stalls every parallel region (measured: 2.9 s instead of 0.04 s per digits forward)
    torch.set_num_threads(args.threads)
    why_no_onnx = onnx_exporter()
    backends = ("torch",) if why_no_onnx else ("torch", "onnxruntime")
    note_backends = (f"onnxruntime not measured: {why_no_onnx}; torch only" if why_no_onnx
                     else "onnxruntime on graphs exported on the fly (fp32, static shapes)")
    q = args.quick
    sections = []
    digits = digits_models()
    wide = wide_models(blocks=2, sample=16) if q else wide_models()
    den_iters = args.iters or (3 if q else 20)
    pipe_iters = args.iters or (2 if q else 5)
    wide_iters = args.iters or (2 if q else 5)
    wide_px = 128 if q else 512  # image pixels: latents are 8x smaller
    wide_steps = 2 if q else 10
    wide_name = ("SD3-shaped random (quick: 2 blocks, 16x16 latent)" if q else
                 "SD3-shaped random, hidden 512, 8 blocks, 64x64 latent")
    runs = [
        ("builtin:digits, denoiser forward (batch 32 = 16 images with CFG)", digits,
         BenchConfig(backends=backends, batch=32, warmup=2, iters=den_iters, device="cpu")),
        ("builtin:digits, whole pipeline (16 images, 20 steps, CFG 3)", digits,
         BenchConfig(backends=backends, scope="pipeline", batch=16, steps=20, warmup=1, iters=pipe_iters,
                     device="cpu")),
        (f"{wide_name} (denoiser forward, batch 1)", wide,
         BenchConfig(backends=backends, batch=1, height=wide_px, width=wide_px, warmup=1, iters=wide_iters,
                     device="cpu")),
        (f"{wide_name} (whole pipeline: 1 image {wide_px}x{wide_px}, {wide_steps} steps, CFG 7)", wide,
         BenchConfig(backends=backends, scope="pipeline", batch=1, steps=wide_steps, height=wide_px,
                     width=wide_px, warmup=1, iters=args.iters or (2 if q else 3), device="cpu")),
    ]
    for title, models, cfg in runs:
        t0 = time.perf_counter()
        result = run_bench(models, cfg, reference="dense")
        table, records = summary_table(result)
        if cfg.scope == "pipeline":
            table += "\n\nPer stage (medians):\n\n" + stage_table(result)
        sections.append({"title": title, "result": result, "table": table, "records": records,
                         "verdict": verdict(records), "seconds": time.perf_counter() - t0})
        print(f"\n## {title} ({time.perf_counter() - t0:.0f} s)\n\n{table}\n" + "\n".join(verdict(records)),
              flush=True)
    head = (f"CPU latency on {sections[0]['result']['device']} ({machine()['platform']}), "
            f"torch {versions()['torch']}, onnxruntime {versions()['onnxruntime']}, "
            f"{time.strftime('%Y-%m-%d')}. {note_backends}. Pruned by magnitude (latency does not depend on "
            "which weights are zero). Medians of interleaved iterations; `x dense` = ratio to the dense model on the "
            "same backend in the same run (< 1 is faster).")
    text = "\n\n".join([head, EXPECTED] + [f"## {s['title']}\n\n{s['table']}\n\nObserved:\n" + "\n".join(s["verdict"])
                                             for s in sections])
    print("\n" + EXPECTED)
    save_results(args.out, text, {"expected": EXPECTED, "backends_note": note_backends,
                                  "sections": [{k: v for k, v in s.items() if k != "table"} for s in sections]},
                 t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
