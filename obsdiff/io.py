"""Run directories: a pruned denoiser plus the report that made it.

    runs/NAME/obsdiff.json                                  report, configs, base model, weight hash
    runs/NAME/denoiser/config.json                          the base denoiser's config, unchanged
    runs/NAME/denoiser/diffusion_pytorch_model.safetensors  pruned weights, same shapes as the base

Loading builds the base pipeline and loads the pruned weights strictly (every key, every shape).
"""

from __future__ import annotations

import json
from pathlib import Path

from obsdiff.artifacts import machine, sha256_file, staged_dir, versions, write_json
from obsdiff.errors import ModelLoadError

RUN_FILE = "obsdiff.json"
DENOISER_DIR = "denoiser"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
FORMAT_VERSION = 1


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def base_reference(model) -> str:
    """How a run refers to its base model: `builtin:NAME`, or the absolute pipeline directory."""
    return f"builtin:{model.builtin}" if model.builtin else str(model.path.resolve())


def save_run(model, report: dict, out: str | Path, force: bool = False) -> Path:
    """Write the pruned denoiser of `model` and `report` as a run directory (atomically)."""
    out = Path(out)
    with staged_dir(out, force=force) as tmp:
        model.denoiser.save_pretrained(tmp / DENOISER_DIR, safe_serialization=True)
        weights = tmp / DENOISER_DIR / WEIGHTS_FILE
        if not weights.exists():
            raise ModelLoadError(f"the denoiser was saved in shards; runs expect one {WEIGHTS_FILE}")
        record = {
            "format": FORMAT_VERSION,
            "base_model": base_reference(model),
            "family": model.family.name,
            "denoiser_file": f"{DENOISER_DIR}/{WEIGHTS_FILE}",
            "denoiser_sha256": sha256_file(weights),
            **report,
            "versions": versions(),
            "machine": machine(),
        }
        write_json(tmp / RUN_FILE, record)
    return out


def read_run(path: str | Path) -> dict:
    path = Path(path)
    try:
        record = json.loads((path / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / RUN_FILE} is unreadable ({exc}); the run directory is damaged") from None
    for key in ("base_model", "denoiser_file"):
        if key not in record:
            raise ModelLoadError(f"{path / RUN_FILE} has no {key!r}; it was not written by obsdiff prune")
    return record


def _check_state(state: dict, expected: dict, path) -> None:
    bad = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ModelLoadError(f"run {str(path)!r} does not fit its base model and plan: {bad[0]} has shape "
                             f"{tuple(state[bad[0]].shape)}, the rebuilt model has {tuple(expected[bad[0]].shape)}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelLoadError(f"run {str(path)!r} does not fit its base model ({what}); was the base changed?")


def read_run_weights(path: str | Path, record: dict) -> dict:
    """The run's pruned weights (CPU tensors), after checking the file against its recorded hash."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(path) / record["denoiser_file"]
    if not weights.is_file():
        raise ModelLoadError(f"run {str(path)!r} lacks its weights {record['denoiser_file']}; re-run obsdiff prune")
    if record.get("denoiser_sha256") and sha256_file(weights) != record["denoiser_sha256"]:
        raise ModelLoadError(f"{weights} does not match the hash in {RUN_FILE}: the file is corrupt or was "
                             "replaced; re-run obsdiff prune")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{weights} is not a readable safetensors file ({exc})") from None


def _model_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is missing or unreadable ({exc})") from None
    return {k: v for k, v in config.items() if not k.startswith("_")}


def check_base_matches(run: Path, base_denoiser_dir: Path, base_ref: str) -> None:
    """Refuse a base model whose denoiser is not the one the run was pruned from (compared by config)."""
    ours = _model_config(Path(run) / DENOISER_DIR / "config.json")
    theirs = _model_config(Path(base_denoiser_dir) / "config.json")
    diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if diff:
        k = diff[0]
        raise ModelLoadError(f"run {str(run)!r} does not fit its base model {base_ref!r}: denoiser config {k} is "
                             f"{ours.get(k)!r} in the run and {theirs.get(k)!r} in the base; the plan does not "
                             "fit this base model")


def build_run_denoiser(path: str | Path, record: dict, family, dtype):
    """Rebuild a run's denoiser: base config on the meta device, shrink plan replayed, weights loaded strictly.

    Nothing of the base denoiser's weights is read. If the architecture creates buffers that are not
    saved (so they would stay on the meta device), it is rebuilt on the CPU instead.
    """
    import diffusers
    import torch

    from obsdiff.shrink import replay_plan_

    config_file = Path(path) / DENOISER_DIR / "config.json"
    try:
        config = json.loads(config_file.read_text())
        cls = getattr(diffusers, config["_class_name"])
    except (OSError, json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise ModelLoadError(f"{config_file} is missing or not a diffusers model config ({exc})") from None
    state = read_run_weights(path, record)

    def build(device: str):
        with torch.device(device):
            model = cls.from_config(config)
        if record.get("shrink_plan"):
            groups = [g for b in family.blocks(model) for g in family.structure_groups(b)]
            replay_plan_(model, groups, record["shrink_plan"])
        _check_state(state, model.state_dict(), path)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    model = build("meta")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = build("cpu")
    if model.dtype != dtype:
        from obsdiff.loading import quiet_libraries

        with quiet_libraries():  # diffusers warns about casting with `to()` even when nothing must stay fp32
            model = model.to(dtype)
    return model.eval()
