"""GPU validation: dense vs 2:4 vs structured latency of an SD3-shaped denoiser at a realistic width, and what
each quantized format (INT8, FP8, with and without 2:4) buys at SD3-Medium and Flux width.

    python tools/gpu_check.py [--out DIR] [--blocks 4] [--iters 30]     # one NVIDIA GPU, < 8 min on an H100
    python tools/gpu_check.py --quant-only --out DIR                     # the format section alone (~1 min)
    python tools/gpu_check.py --dry-run --out /tmp/x                     # tiny sizes, CPU backends only

Builds `SD3Transformer2DModel` with random weights (hidden 1536 = 24 heads x 64, as SD3-medium; a few
blocks; bf16), prunes copies 2:4 and structured 30 % (heads and FFN neurons) with `obsdiff.prune_`
using magnitude scores: latency does not depend on which weights are zero, and calibration through a
full pipeline would not fit the time budget. Then times one denoiser forward (batch 2 = one image with
CFG, 1024 px = 128x128 latents, 333 text tokens) with `obsdiff.engines.bench.run_bench`: PyTorch eager
and 2:4 sparse tensor cores, TensorRT where installed, then torch.compile if the time budget allows.
Writes gpu_check.json (+ .md) under --out ($OUT by default) and prints a short table last.

The format section runs first (tools/gpu_quant.py: GEMMs and one transformer block, bf16 dense vs 2:4 bf16, INT8
via torch._int_mm, 2:4 INT8, FP8 via torch._scaled_mm, 2:4 FP8) and writes gpu_check_quant.json (+ .md) on its
own; it needs no diffusers. GPU name, torch version and date are recorded with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent


def _import_obsdiff() -> None:
    """Use the installed obsdiff, else this checkout (its three folders form one package)."""
    try:
        import obsdiff.engines  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
        import obsdiff

        obsdiff.__path__.append(str(REPO))  # obsdiff.export -> export/, obsdiff.engines -> engines/


SIZES = {
    # SD3-medium widths: 24 heads x 64, T5 4096, pooled 2 x CLIP = 2048, 16 latent channels
    "gpu": dict(heads=24, head_dim=64, joint=4096, pooled=2048, channels=16, sample=128, pos=192,
                height=1024, width=1024, batch=2, dtype="bf16"),
    "dry": dict(heads=4, head_dim=16, joint=64, pooled=32, channels=4, sample=16, pos=32,
                height=128, width=128, batch=2, dtype="fp32"),
}


def build_denoiser(size: dict, blocks: int, device, dtype):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    inner = size["heads"] * size["head_dim"]
    with torch.device(device):
        model = SD3Transformer2DModel(
            sample_size=size["sample"], patch_size=2, in_channels=size["channels"], num_layers=blocks,
            attention_head_dim=size["head_dim"], num_attention_heads=size["heads"], joint_attention_dim=size["joint"],
            caption_projection_dim=inner, pooled_projection_dim=size["pooled"], out_channels=size["channels"],
            pos_embed_max_size=size["pos"])
    return model.to(dtype=dtype).eval()


def pruned_variants(dense, progress: bool = False) -> tuple[dict, dict]:
    """{label: LoadedModel} for dense, 2:4 and structured 30 %, and what each prune reported."""
    from obsdiff.config import PruneConfig
    from obsdiff.pruning.prune import prune_
    from obsdiff.runs.loading import as_loaded

    models = {"dense": as_loaded(SimpleNamespace(transformer=dense))}
    info = {}
    for label, cfg in (("2:4", PruneConfig(method="magnitude", sparsity_type="2:4")),
                       ("structured 30%", PruneConfig(method="magnitude", sparsity_type="structured", sparsity=0.3))):
        model = as_loaded(SimpleNamespace(transformer=copy.deepcopy(dense)))
        t0 = time.perf_counter()
        report = prune_(model, cfg, progress=progress)
        info[label] = {"method": "magnitude", "sparsity_type": cfg.sparsity_type, "sparsity": report.sparsity,
                       "seconds": time.perf_counter() - t0, "model_stats": report.model_stats}
        models[label] = model
    return models, info


def environment() -> dict:
    import torch

    from obsdiff.info import sparse_tensor_cores, tensorrt_version

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "tensorrt": tensorrt_version(),
           "sparse_tensor_cores": dict(zip(("usable", "reason"), sparse_tensor_cores(), strict=True))}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        env["compute_capability"] = f"{major}.{minor}"
    return env


def short_table(results: list[dict]) -> str:
    from obsdiff.tables import format_table

    rows = []
    for res in results:
        models = res["models"]
        for r in res["rows"]:
            flops = models[r["model"]]["flop_ratio"]
            if r["status"] == "ok":
                rows.append([r["model"], r["backend"], r["latency_ms"]["median"], f"{r['ratio']['median']:.3f}",
                             f"{r['speedup']:.2f}x", f"{flops:.3f}" if flops else "", r.get("max_abs_diff_vs_torch"),
                             ""])
            else:
                rows.append([r["model"], r["backend"], None, "", "", f"{flops:.3f}" if flops else "", None,
                             f"{r['status']}: {r['reason'].split(';')[0]}"])
    seen, unique = set(), []
    for row in rows:  # dense/torch appears in both phases: keep each (model, backend) once, first phase wins
        if (row[0], row[1]) not in seen:
            seen.add((row[0], row[1]))
            unique.append(row)
    return format_table(["model", "backend", "median ms", "x dense", "speedup", "FLOPs x dense",
                         "max |diff| vs torch", "note"], unique)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (CPU backends only)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks [4; dry run 2]")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--backends", default=None, help="comma list for the first phase [torch,torch-sparse24,tensorrt"
                                                     " (+onnxruntime in a dry run)]")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile phase")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip torch.compile when past this much time")
    quant = ap.add_mutually_exclusive_group()
    quant.add_argument("--quant-only", action="store_true", help="only the quantized-format section")
    quant.add_argument("--no-quant", action="store_true", help="skip the quantized-format section")
    ap.add_argument("--quant-rounds", type=int, default=None, help="timed samples per format [30; dry run 3]")
    ap.add_argument("--quant-reps", type=int, default=None, help="calls per sample (one CUDA graph) [10; dry run 1]")
    ap.add_argument("--quant-batch", type=int, default=1, help="images per GEMM (2 = one image with CFG) [1]")
    ap.add_argument("--quant-budget-s", type=float, default=150.0, help="skip the next width when past this much time")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    _import_obsdiff()
    import torch

    from obsdiff.errors import first_line
    from obsdiff.runs.artifacts import machine, versions, write_json

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA GPU visible to PyTorch; run with --dry-run for the CPU smoke test", file=sys.stderr)
        return 2
    if dry:  # a busy 2-core machine makes multi-threaded PyTorch erratic: one thread for steady numbers
        torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"environment: {json.dumps(environment())}", flush=True)
    quant = None
    if not args.no_quant:
        try:
            quant = run_quant_section(args, dry, versions, machine, write_json)
        except Exception as exc:  # the denoiser section below still has something to say
            if args.quant_only:
                raise
            quant = {"error": f"{type(exc).__name__}: {first_line(exc)}"}
            print(f"quant section failed: {quant['error']}", file=sys.stderr, flush=True)
    if args.quant_only:
        print(f"wrote {args.out / 'gpu_check_quant.json'} in {time.perf_counter() - t_start:.0f} s")
        return 0

    from obsdiff.devices import torch_dtype
    from obsdiff.engines.bench import BenchConfig, run_bench
    from obsdiff.engines.report import format_bench

    size = SIZES["dry" if dry else "gpu"]
    blocks = args.blocks or (2 if dry else 4)
    warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    iters = args.iters or (3 if dry else 30)
    device = "cpu" if dry else "cuda"
    backends = args.backends or ("torch,onnxruntime,torch-sparse24,tensorrt" if dry
                                 else "torch,torch-sparse24,tensorrt")

    t0 = time.perf_counter()
    dense = build_denoiser(size, blocks, device, torch_dtype(size["dtype"]))
    models, prune_info = pruned_variants(dense)
    print(f"built and pruned 3 variants in {time.perf_counter() - t0:.1f} s (magnitude scores: timing only)",
          flush=True)
    base = dict(scope="denoiser", batch=size["batch"], height=size["height"], width=size["width"], warmup=warmup,
                iters=iters, device=device, dtype=size["dtype"])
    results = []
    phases = [("eager", backends)]
    if not args.no_compile:
        phases.append(("compile", "torch,torch-compile"))
    for name, phase_backends in phases:
        elapsed = time.perf_counter() - t_start
        if name == "compile" and elapsed > args.budget_s * 0.5:
            print(f"skipping the torch.compile phase: {elapsed:.0f} s used of a {args.budget_s:.0f} s budget",
                  flush=True)
            break
        t0 = time.perf_counter()
        res = run_bench(models, BenchConfig(backends=phase_backends, **base), reference="dense")
        res["phase"] = name
        results.append(res)
        print(f"\nphase {name} ({time.perf_counter() - t0:.1f} s)\n{format_bench(res)}", flush=True)
        _write(args.out, results, prune_info, size, blocks, t_start, versions, machine, write_json, quant)
    print("\npruning: magnitude scores (timing does not depend on which weights are zero); "
          f"SD3-shaped, hidden {size['heads'] * size['head_dim']}, {blocks} blocks, {size['dtype']}, "
          f"batch {size['batch']}, {size['height']}x{size['width']} px, device {device}")
    print(short_table(results))
    print(f"wrote {args.out / 'gpu_check.json'} in {time.perf_counter() - t_start:.0f} s")
    return 0


def run_quant_section(args, dry: bool, versions, machine, write_json) -> dict:
    """The quantized-format section (tools/gpu_quant.py): gpu_check_quant.json and .md, its tables printed."""
    here = str(Path(__file__).resolve().parent)  # gpu_quant and gpu_quant_formats sit next to this script
    if here not in sys.path:
        sys.path.insert(0, here)
    import gpu_quant

    rounds = args.quant_rounds or (3 if dry else 30)
    reps = args.quant_reps or (1 if dry else 10)
    result = gpu_quant.run_quant(dry, rounds, reps, warmup=1 if dry else 3, batch=args.quant_batch,
                                 budget_s=args.quant_budget_s, log=lambda line: print(line, flush=True))
    data = {"artifact": "gpu-check-quant", **result, "versions": versions(), "machine": machine()}
    write_json(args.out / "gpu_check_quant.json", data)
    text = gpu_quant.markdown(result)
    (args.out / "gpu_check_quant.md").write_text(text)
    print(text, flush=True)
    return result


def _write(out: Path, results, prune_info, size, blocks, t_start, versions, machine, write_json, quant) -> None:
    data = {"artifact": "gpu-check", "dry_run": size is SIZES["dry"], "sizes": size, "blocks": blocks,
            "pruning": prune_info, "pruning_note": "magnitude scores: latency does not depend on which weights "
            "are zero", "environment": environment(), "phases": results, "quant": quant,
            "seconds": time.perf_counter() - t_start, "versions": versions(), "machine": machine()}
    write_json(out / "gpu_check.json", data)
    (out / "gpu_check.md").write_text(short_table(results) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
