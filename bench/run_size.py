"""Run directories and FLOP counting at real size, on random weights with the published denoiser configs.

    flock /tmp/obsdiff-bigmem.lock .venv/bin/python bench/run_size.py [--model sd3-medium] [--shard 2GB]
    .venv/bin/python bench/run_size.py --quick      # FLOP counting only (meta device, no memory)

FLOPs: `count_flops` (meta device) at each model's default shape and full depth, its time, and at reduced
depth with real weights the measured forward it replaces (same count, seconds vs minutes).
Save/load: a full-depth fp32 denoiser saved as an fp16 run in shards, then rebuilt in fp32 and fp16; each
step in its own process so its peak resident memory (ru_maxrss) is its own. "whole state dict" loads every
shard into one dict before assigning and casting (the previous way) for comparison. Seconds are single runs
on a shared machine (disk cache state differs between steps); interleaved at 6 layers both loads take the
same time. The point of the table is peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results  # noqa: E402  (bench/ is the script's directory)

from obsdiff.models import get_family  # noqa: E402
from obsdiff.pruning.flops import count_flops, forward_flops  # noqa: E402
from obsdiff.tables import format_table  # noqa: E402
from obsdiff.testing import SIZED_MODELS, sized_denoiser  # noqa: E402

GB = 1e9


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def default_inputs(name: str, denoiser) -> dict:
    family = get_family(SIZED_MODELS[name][1])
    return family.example_inputs(denoiser, batch=1, generator=torch.Generator().manual_seed(0))


def flops_rows(names: list[str], measured_layers: int | None) -> list[dict]:
    rows = []
    for name in names:
        d = sized_denoiser(name, device="meta")
        inputs = default_inputs(name, d)
        times, flops = [], None
        for _ in range(3):
            t0 = time.perf_counter()
            flops = count_flops(d, inputs)
            times.append(time.perf_counter() - t0)
        row = {"model": name, "depth": "full", "tflops": flops / 1e12, "count_s": statistics.median(times)}
        rows.append(row)
        if measured_layers and SIZED_MODELS[name][1] == "sd3":
            d = sized_denoiser(name, num_layers=measured_layers)
            inputs = default_inputs(name, d)
            t0 = time.perf_counter()
            counted = count_flops(d, inputs)
            t_count = time.perf_counter() - t0
            t0 = time.perf_counter()
            measured = forward_flops(d, inputs)
            rows.append({"model": name, "depth": f"{measured_layers} layers", "tflops": counted / 1e12,
                         "count_s": t_count, "measured_s": time.perf_counter() - t0,
                         "counted_equals_measured": counted == measured})
            del d
    return rows


def child(args) -> dict:
    """One save or load step in this process; returns its numbers."""
    from obsdiff.runs import io, rebuild
    from obsdiff.runs.loading import LoadedModel

    name, run = args.model, Path(args.run)
    family = get_family(SIZED_MODELS[name][1])
    t0 = time.perf_counter()
    if args.step == "save":
        d = sized_denoiser(name)
        model_gb = sum(p.numel() * p.element_size() for p in d.parameters()) / GB
        rss_model = peak_rss()
        t0 = time.perf_counter()
        pipe = SimpleNamespace(**{family.denoiser_attr: d})
        model = LoadedModel(ref=f"sized:{name}", path=run.parent / "no-base", pipeline=pipe, family=family)
        io.save_run(model, {}, run, dtype="fp16", max_shard_size=args.shard)
        files = sorted((run / "denoiser").glob("*.safetensors"))
        return {"step": "save fp32 -> fp16 shards", "seconds": time.perf_counter() - t0, "model_gb": model_gb,
                "peak_rss_gb": peak_rss(), "rss_before_gb": rss_model, "shards": len(files),
                "disk_gb": sum(f.stat().st_size for f in files) / GB}
    dtype = getattr(torch, args.dtype)
    record = io.read_run(run)
    if args.step == "load":
        d = rebuild.build_run_denoiser(run, record, family, dtype)
        label = f"load shard by shard -> {args.dtype}"
    else:  # the previous way: one dict with everything, assigned, then cast
        state = rebuild.read_run_weights(run, record)
        with torch.device("meta"):
            d = type(sized_denoiser(name, device="meta")).from_config(json.loads(
                (run / "denoiser" / "config.json").read_text()))
        d.load_state_dict(state, strict=True, assign=True)
        d = d.to(dtype)
        label = f"whole state dict -> {args.dtype}"
    model_gb = sum(p.numel() * p.element_size() for p in d.parameters()) / GB
    return {"step": label, "seconds": time.perf_counter() - t0, "model_gb": model_gb, "peak_rss_gb": peak_rss()}


def run_child(**kw) -> dict:
    cmd = [sys.executable, __file__, "--child", *[f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd3-medium", choices=sorted(SIZED_MODELS))
    ap.add_argument("--shard", default="2GB", help="max shard size for the save/load part")
    ap.add_argument("--measured-layers", type=int, default=2, help="depth for the measured-forward comparison")
    ap.add_argument("--quick", action="store_true", help="FLOP counting on the meta device only; nothing written")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "run_size.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(child(args)))
        return
    t_start = time.perf_counter()
    frows = flops_rows(sorted(SIZED_MODELS), None if args.quick else args.measured_layers)
    text = "FLOPs per forward (batch 1, default shape) counted on the meta device\n\n" + format_table(
        ["model", "depth", "TFLOPs", "count s", "measured forward s", "equal"],
        [[r["model"], r["depth"], r["tflops"], r["count_s"], r.get("measured_s"), r.get("counted_equals_measured")]
         for r in frows])
    srows = []
    if not args.quick:
        with tempfile.TemporaryDirectory(dir=args.out.parent.parent) as tmp:
            run = Path(tmp) / "run"
            srows.append(run_child(step="save", model=args.model, run=run, shard=args.shard))
            for step, dtype in [("load", "float32"), ("load", "float16"), ("whole", "float32")]:
                srows.append(run_child(step=step, model=args.model, run=run, dtype=dtype))
        text += f"\n\n{args.model}: run directory save and load (one process each, peak resident memory)\n\n"
        text += format_table(["step", "seconds", "model GB", "peak RSS GB", "shards", "disk GB"],
                             [[r["step"], r["seconds"], r["model_gb"], r["peak_rss_gb"], r.get("shards"),
                               r.get("disk_gb")] for r in srows])
    print(text)
    if not args.quick:
        save_results(args.out, text, {"model": args.model, "shard": args.shard, "flops": frows, "save_load": srows},
                     t_start)


if __name__ == "__main__":
    main()
