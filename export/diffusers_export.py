"""`obsdiff-export diffusers`: a pruned run as a complete diffusers pipeline folder.

The folder is what `DiffusionPipeline.from_pretrained(DIR)` reads, with nothing of obsdiff in it: the base
pipeline's `model_index.json` and components, and the pruned denoiser written by diffusers' own
`save_pretrained` (stock config, safetensors). Unstructured and N:M runs keep every tensor shape, so a stock
config describes them exactly. Structured runs are refused: their blocks have different widths (heads, FFN
neurons), which the one config of a stock diffusers class cannot express.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from obsdiff.artifacts import check_writable, staged_dir
from obsdiff.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)


def _components(index: dict) -> dict[str, list]:
    """The model_index.json entries that are components ({name: [library, class]}; None entries skipped)."""
    return {k: v for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] and v[1]}


def _place(src: Path, dst: Path, link: bool) -> None:
    """Copy `src` to `dst`, or hard-link it (a symlink across filesystems) with `link`; links are followed
    first, so a hub-cache snapshot gives its blobs, not links to links."""
    src = src.resolve()
    if not link:
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        dst.symlink_to(src)


def _place_tree(src: Path, dst: Path, link: bool) -> None:
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif f.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _place(f, target, link)


def _save_cast(entry: list, src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Load one component with its own library's class in `dtype` and save it with that library."""
    from obsdiff.loading import quiet_libraries

    library, name = entry
    try:
        cls = getattr(importlib.import_module(library), name)
    except (ImportError, AttributeError):
        raise ModelLoadError(f"{src} is a {library}.{name}, which is not installed; install {library} or export "
                             "without --dtype") from None
    with quiet_libraries():
        cls.from_pretrained(str(src), dtype=dtype).save_pretrained(str(dst))


def structured_refusal(run: Path) -> ConfigError:
    return ConfigError(
        f"{run} is a structured run (heads and FFN neurons removed per block): a stock diffusers config has one "
        f"width for every block, so no plain diffusers folder can hold it; load it with "
        f"obsdiff.load_pipeline({str(run)!r}), or deploy it with obsdiff-export onnx (and build-engine)")


def export_diffusers(run: str | Path, out: str | Path, dtype: str | None = None, link: bool = False,
                     force: bool = False) -> dict:
    """Write run `run` as a diffusers pipeline folder at `out` (atomically; `force` replaces `out`).

    `dtype` ("fp32", "fp16", "bf16") converts the denoiser and every component stored in another precision;
    None keeps what is stored (the denoiser in the run's `weights_dtype`). `link` hard-links (or symlinks)
    the unchanged components' files instead of copying them. Returns {component: "pruned" | "copied" |
    "linked" | "converted"}.
    """
    from obsdiff import io
    from obsdiff.devices import torch_dtype
    from obsdiff.loading import load_denoiser, resolve_run_base

    run = Path(run).expanduser()
    if not io.is_run_dir(run):
        raise ConfigError(f"{run} is not a run directory (no {io.RUN_FILE}); pass the --out of obsdiff prune")
    record = io.read_run(run)
    if record.get("shrink_plan"):
        raise structured_refusal(run)
    out = check_writable(out, force)
    target = torch_dtype(dtype) if dtype else torch_dtype(record.get("weights_dtype", "fp32"))
    base = resolve_run_base(run, record).path
    index = json.loads((base / "model_index.json").read_text())
    denoiser, family, _ = load_denoiser(str(run), target, "cpu")
    done = {}
    with staged_dir(out, force=force) as tmp:
        _place(base / "model_index.json", tmp / "model_index.json", link=False)
        for name, entry in _components(index).items():
            src = base / name
            if name == family.denoiser_attr:
                denoiser.save_pretrained(str(tmp / name), safe_serialization=True)
                done[name] = "pruned"
            elif dtype and io.stored_dtype(src) not in (None, dtype):
                _save_cast(entry, src, tmp / name, target)
                done[name] = "converted"
            else:
                _place_tree(src, tmp / name, link)
                done[name] = "linked" if link else "copied"
    log.info("wrote %s: %s", out, ", ".join(f"{k} {v}" for k, v in done.items()))
    return done
