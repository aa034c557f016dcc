"""`obsdiff-export diffusers`: a pruned run as a complete diffusers pipeline folder.

The folder is what `DiffusionPipeline.from_pretrained(DIR)` reads, with nothing of obsdiff in it: the base
pipeline's `model_index.json` and components, and the pruned denoiser written by diffusers' own
`save_pretrained` (stock config, safetensors). Unstructured and N:M runs keep every tensor shape, so a stock
config describes them exactly. Structured runs are refused: their blocks have different widths (heads, FFN
neurons), which the one config of a stock diffusers class cannot express: their denoiser folder also holds
`pruned_model.py`, a small subclass of the stock class (torch and diffusers only) that narrows those modules
after the base model is built, loaded through diffusers' custom-component mechanism (`trust_remote_code=True`).
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


CUSTOM_MODULE = "pruned_model"  # <denoiser folder>/pruned_model.py, model_index.json: [CUSTOM_MODULE, class]
CUSTOM_CLASS = '''"""{base} with attention heads and FFN neurons removed by structured pruning.

Self-contained (torch and diffusers only). The config is the base model's plus `pruned_linears`
({{module: [out_features, in_features]}}: the linears whose shape changed) and `pruned_attention`
({{module: {{attribute: value}}}}: `heads` and the inner widths the attention processors read). The modules are
narrowed right after the base model is built, before the weights are loaded, so loading stays strict.
Load the pipeline with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.
"""

import inspect

from diffusers import {base} as _Base
from torch import nn


class {name}(_Base):
    def __init__(self, pruned_linears=None, pruned_attention=None, **kwargs):
        super().__init__(**kwargs)
        for path, (out_features, in_features) in (pruned_linears or {{}}).items():
            old = self.get_submodule(path)
            new = nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                            dtype=old.weight.dtype)
            parent, _, child = path.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, child, new)
        for path, attributes in (pruned_attention or {{}}).items():
            for attribute, value in attributes.items():
                setattr(self.get_submodule(path), attribute, value)
        self.register_to_config(pruned_linears=pruned_linears, pruned_attention=pruned_attention)


# diffusers passes a config key to __init__ only if its signature names it: name the base model's keys too
_base_params = [p for p in inspect.signature(_Base.__init__).parameters.values() if p.kind != p.VAR_KEYWORD]
{name}.__init__.__signature__ = inspect.Signature(
    _base_params + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
                    for n in ("pruned_linears", "pruned_attention")])
'''


def narrowed_modules(denoiser: torch.nn.Module) -> tuple[dict, dict]:
    """What structured pruning changed against the dense model of the same config: {linear: [out, in]} for
    the linears whose shape differs, {attention: {attribute: value}} for `heads` and the inner widths."""
    with torch.device("meta"):
        dense = dict(type(denoiser).from_config(denoiser.config).named_modules())
    linears, attention = {}, {}
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and module.weight.shape != dense[name].weight.shape:
            linears[name] = [module.out_features, module.in_features]
        changed = {a: getattr(module, a) for a in ("heads", "inner_dim", "inner_kv_dim")
                   if hasattr(module, a) and getattr(module, a) != getattr(dense[name], a, None)}
        if changed:
            attention[name] = changed
    return linears, attention


def _save_narrowed(denoiser: torch.nn.Module, folder: Path) -> str:
    """Save a structured run's denoiser as the custom subclass; returns the class name."""
    linears, attention = narrowed_modules(denoiser)
    denoiser.save_pretrained(str(folder), safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    base = config["_class_name"]
    name = f"Pruned{base}"
    config.update(_class_name=name, pruned_linears=linears, pruned_attention=attention)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / f"{CUSTOM_MODULE}.py").write_text(CUSTOM_CLASS.format(base=base, name=name))
    return name


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
    out = check_writable(out, force)
    target = torch_dtype(dtype) if dtype else torch_dtype(record.get("weights_dtype", "fp32"))
    base = resolve_run_base(run, record).path
    denoiser, family, _ = load_denoiser(str(run), target, "cpu")  # reads and checks the base's model_index.json
    index = json.loads((base / "model_index.json").read_text())
    done = {}
    with staged_dir(out, force=force) as tmp:
        for name, entry in _components(index).items():
            src = base / name
            if name == family.denoiser_attr and record.get("shrink_plan"):
                index[name] = [CUSTOM_MODULE, _save_narrowed(denoiser, tmp / name)]
                done[name] = f"pruned (structured: {CUSTOM_MODULE}.py, load with trust_remote_code=True)"
            elif name == family.denoiser_attr:
                denoiser.save_pretrained(str(tmp / name), safe_serialization=True)
                done[name] = "pruned"
            elif dtype and io.stored_dtype(src) not in (None, dtype):
                _save_cast(entry, src, tmp / name, target)
                done[name] = "converted"
            else:
                _place_tree(src, tmp / name, link)
                done[name] = "linked" if link else "copied"
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s: %s", out, ", ".join(f"{k} {v}" for k, v in done.items()))
    return done
