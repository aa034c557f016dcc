"""Save a random-weight pipeline whose denoiser has a released model's exact widths (obsdiff.testing).

    python tools/sized_pipeline.py NAME --layers N [--single-layers K] [--narrow] --dtype bf16 --out DIR [--force]

NAME is one of obsdiff.testing.SIZED_MODELS (sd3-medium, sd3.5-large, sd3.5-medium, flux.1-dev, sdxl).
The result is an ordinary diffusers pipeline directory: `obsdiff prune --model DIR --dtype D ...` runs on it.
Pass obsdiff the same `--dtype` as here: diffusers 0.42 (without accelerate) loads these transformers in their
saved dtype whatever dtype it is asked for, and a float32 run then fails on bf16 weights.
`--narrow` keeps the published graph (patching, position table, qk-norm, embedding widths, block structure)
with fewer and narrower heads (obsdiff.testing.NARROW_WIDTHS): a few million parameters, for shape-dependent
runs (export, deployment) in seconds.
Weights are random: use it for memory, speed and CLI runs at real width, never for quality.
SD3-Medium at full depth takes ~1.5 min and ~9 GB of RAM to build on a 2-core CPU: run big builds under
`flock /tmp/obsdiff-bigmem.lock`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from obsdiff.devices import torch_dtype
from obsdiff.testing import SIZED_MODELS, sized_pipeline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(SIZED_MODELS))
    ap.add_argument("--layers", type=int, default=None,
                    help="transformer blocks (Flux: double blocks; SDXL: max transformer layers per block); "
                         "default: the published depth")
    ap.add_argument("--single-layers", type=int, default=None, help="Flux single blocks (default: 38)")
    ap.add_argument("--narrow", action="store_true",
                    help="fewer and narrower heads, every other config field as published")
    ap.add_argument("--dtype", default="bf16", help="fp32, fp16 or bf16 (weights are built and saved in it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    pipe = sized_pipeline(args.name, num_layers=args.layers, num_single_layers=args.single_layers,
                          dtype=torch_dtype(args.dtype), seed=args.seed, width="narrow" if args.narrow else "published")
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    n_params = sum(p.numel() for p in denoiser.parameters())
    t_build = time.perf_counter() - t0
    # write next to the target, then rename: an interrupted save never leaves a half-written pipeline
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    width = ", narrow" if args.narrow else ""
    print(f"{args.name}{width}: {type(pipe).__name__}, denoiser {n_params:,} parameters ({args.dtype}), "
          f"{size / 1e9:.2f} GB on disk at {args.out} (build {t_build:.0f} s, total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
