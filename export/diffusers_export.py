"""`obsdiff-export diffusers`: a pruned run as a complete diffusers pipeline folder.

The folder is what `DiffusionPipeline.from_pretrained(DIR)` reads, with nothing of obsdiff in it: the base
pipeline's `model_index.json` and components, and the pruned denoiser written by diffusers' own
`save_pretrained` (stock config, safetensors). Unstructured and N:M runs keep every tensor shape, so a stock
config describes them exactly. Structured runs are refused: their blocks have different widths (heads, FFN
neurons), which the one config of a stock diffusers class cannot express: their denoiser folder also holds
`pruned_model.py`, a small subclass of the stock class (torch and diffusers only) that narrows those modules
after the base model is built, loaded through diffusers' custom-component mechanism (`trust_remote_code=True`).

Precision under the plain call (no dtype argument): diffusers builds its own models (denoiser, VAE) in torch's
default dtype, float32, whatever they store, and nothing in a folder changes that; transformers 5 loads its models
(the text encoders) in `dtype="auto"`: the config's `dtype` (legacy `torch_dtype`), else the weights' own dtype.
Text encoders stored in fp16 would then meet an fp32 denoiser and VAE, and the pipeline, which makes latents in
the prompt embeddings' dtype, stops in the VAE. So the folder's transformers configs say `"dtype": "float32"`:
every component loads in float32 under the plain call, the stored weights keep their precision, and
`torch_dtype=...` still loads everything in one other dtype.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from obsdiff.errors import ConfigError, ModelLoadError
from obsdiff.runs.artifacts import check_writable, read_json, staged_dir

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
    from obsdiff.runs.loading import quiet_libraries

    library, name = entry
    try:
        cls = getattr(importlib.import_module(library), name)
    except (ImportError, AttributeError):
        raise ModelLoadError(f"{src} is a {library}.{name}, which is not installed; install {library} or export "
                             "without --dtype") from None
    with quiet_libraries():
        cls.from_pretrained(str(src), dtype=dtype).save_pretrained(str(dst))


PLAIN_DTYPE = "float32"  # torch's default dtype: what diffusers gives its models when no dtype is passed


def _pins_plain_dtype(config: dict) -> bool:
    """Whether a transformers config already makes `dtype="auto"` load in PLAIN_DTYPE (with neither `dtype` nor
    `torch_dtype`, transformers falls back to the weights' dtype)."""
    keys = [k for k in ("dtype", "torch_dtype") if k in config]
    return bool(keys) and all(config[k] == PLAIN_DTYPE for k in keys)


def _pin_plain_dtype(folder: Path, src: Path) -> bool:
    """Set a transformers model folder's config to load in PLAIN_DTYPE under `dtype="auto"`; the weights are left
    as stored. `src` is the component's folder in the base pipeline (named if the config is broken). Returns
    whether the config changed."""
    path = folder / "config.json"
    config = read_json(path, f"the {folder.name} config", fix=f"repair {src / 'config.json'}", error=ModelLoadError)
    if _pins_plain_dtype(config):
        return False
    config["dtype"] = PLAIN_DTYPE
    if "torch_dtype" in config:  # read by transformers 4 when asked for "auto"
        config["torch_dtype"] = PLAIN_DTYPE
    path.unlink()  # with --link it is the base's own file: write a new one, never through the link
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def _is_transformers_model(entry: list, folder: Path) -> bool:
    """Whether a component is a transformers model (tokenizers and processors have no dtype to pin)."""
    library, name = entry
    if library != "transformers" or not (folder / "config.json").is_file():
        return False
    import transformers

    cls = getattr(transformers, name, None)
    return isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)


def loading_line(out: str | Path, trust_remote_code: bool) -> str:
    """The one call that loads an exported folder, as the user types it."""
    return f"DiffusionPipeline.from_pretrained({str(out)!r}{', trust_remote_code=True' if trust_remote_code else ''})"


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


def _dequantize_(denoiser: torch.nn.Module) -> int:
    """Quantized linears back to plain ones holding their dequantized weights (diffusers has no quantized
    linear to load them into); returns how many."""
    from obsdiff.solver.qlinear import dequantize_, quantized_layers

    layers = quantized_layers(denoiser)
    for lin in layers.values():
        dequantize_(lin)
    return len(layers)


def export_diffusers(run: str | Path, out: str | Path, dtype: str | None = None, link: bool = False,
                     force: bool = False) -> dict:
    """Write run `run` as a diffusers pipeline folder at `out` (atomically; `force` replaces `out`).

    `dtype` ("fp32", "fp16", "bf16") converts the denoiser and every component stored in another precision;
    None keeps what is stored (the denoiser in the run's `weights_dtype`). `link` hard-links (or symlinks)
    the unchanged components' files instead of copying them. Returns {"components": {component: "pruned" |
    "copied" | "linked" | "converted", with what else changed}, "stored": {component: dtype its weights are
    stored in}, "plain_dtype": the dtype every component loads in under the plain call, "trust_remote_code":
    whether loading needs it, "load": the loading line}.
    """
    from obsdiff.devices import dtype_name, torch_dtype
    from obsdiff.runs import io
    from obsdiff.runs.hub import resolve_run_base
    from obsdiff.runs.loading import load_denoiser

    run = Path(run).expanduser()
    if not io.is_run_dir(run):
        raise ConfigError(f"{run} is not a run directory (no {io.RUN_FILE}); pass the --out of obsdiff prune")
    record = io.read_run(run)
    out = check_writable(out, force)
    target = torch_dtype(dtype or record.weights_dtype or "fp32")
    base = resolve_run_base(run, record).path
    found = load_denoiser(str(run), target, "cpu")  # reads and checks the base's model_index.json
    denoiser, family = found.denoiser, found.family
    quantized = _dequantize_(denoiser)
    index = json.loads((base / "model_index.json").read_text())
    structured = bool(record.shrink_plan)
    done, stored = {}, {}
    with staged_dir(out, force=force) as tmp:
        for name, entry in _components(index).items():
            src = base / name
            if name == family.denoiser_attr and structured:
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
            if name == family.denoiser_attr and quantized:
                done[name] += (f" ({quantized} {record.quant_scheme} layers dequantized: their weights are written in "
                               f"{dtype_name(target)} and activations are not quantized; obsdiff-export onnx keeps "
                               "the quantization)")
            if _is_transformers_model(entry, tmp / name) and _pin_plain_dtype(tmp / name, src):
                done[name] += f" (config dtype {PLAIN_DTYPE})"
            if (precision := io.stored_dtype(tmp / name)) is not None:
                stored[name] = precision
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s: %s", out, ", ".join(f"{k} {v}" for k, v in done.items()))
    return {"components": done, "stored": stored, "plain_dtype": PLAIN_DTYPE, "trust_remote_code": structured,
            "load": loading_line(out, structured)}
