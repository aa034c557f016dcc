"""A run's pruned denoiser read back: the base config rebuilt on the meta device, the shrink plan replayed, every
weight file checked against its recorded hash and loaded strictly (every key, every shape), shard by shard.

Refuses a base model whose denoiser config differs from the one the run was pruned from (`check_base_matches`).
"""

from __future__ import annotations

from pathlib import Path

from obsdiff.errors import ModelLoadError
from obsdiff.runs.artifacts import read_json, sha256_file
from obsdiff.runs.io import DENOISER_DIR, RUN_FILE, RunRecord


def run_weight_files(path: str | Path, record: RunRecord) -> dict[str, str | None]:
    """The run's weight files (paths relative to the run) and their recorded sha256 (None: not recorded)."""
    if record.denoiser_shards:
        return dict(record.denoiser_shards)
    return {record.denoiser_file: record.denoiser_sha256}  # format 1: one file


def _check_files(path: Path, files: dict[str, str | None]) -> None:
    for rel in files:
        if not (path / rel).is_file():
            raise ModelLoadError(f"run {str(path)!r} lacks its weights {rel}; re-run obsdiff prune")


def _read_shard(path: Path, rel: str, sha: str | None) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / rel
    if sha and sha256_file(weights) != sha:
        raise ModelLoadError(f"{weights} does not match the hash in {RUN_FILE}: the file is corrupt or was "
                             "replaced; re-run obsdiff prune")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{weights} is not a readable safetensors file ({exc})") from None


def _check_shapes(state: dict, expected: dict, path) -> None:
    bad = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ModelLoadError(f"run {str(path)!r} does not fit its base model and plan: {bad[0]} has shape "
                             f"{tuple(state[bad[0]].shape)}, the rebuilt model has {tuple(expected[bad[0]].shape)}")


def _check_keys(loaded: set, expected: set, path, missing_too: bool = True) -> None:
    missing = sorted(expected - loaded) if missing_too else []
    unexpected = sorted(loaded - expected)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelLoadError(f"run {str(path)!r} does not fit its base model ({what}); was the base changed?")


def read_run_weights(path: str | Path, record: RunRecord) -> dict:
    """All of the run's weights (CPU tensors, as stored), each file checked against its recorded hash.

    Holds the whole state dict: `build_run_denoiser` loads shard by shard instead.
    """
    path = Path(path)
    files = run_weight_files(path, record)
    _check_files(path, files)
    state = {}
    for rel, sha in files.items():
        state.update(_read_shard(path, rel, sha))
    return state


def _model_config(path: Path) -> dict:
    config = read_json(path, "model config", fix="pass an intact diffusers model", error=ModelLoadError)
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


def run_skeleton(cls, config: dict, record: RunRecord | None, family, device: str):
    """The denoiser class `cls` built from `config` on `device` (no weights read), then shaped as the run `record`
    left it: its shrink plan replayed and its quantized linears made `QuantLinear`s with empty scales, for
    `load_state_dict` to fill. `record` None: the plain base architecture."""
    import torch

    from obsdiff.runs.shrink import replay_plan_
    from obsdiff.solver.qlinear import placeholder_

    with torch.device(device):
        model = cls.from_config(config)
    if record is not None and record.shrink_plan:
        groups = [g for b in family.blocks(model) for g in family.structure_groups(b)]
        replay_plan_(model, groups, record.shrink_plan)
    modules = dict(model.named_modules())
    for name, spec in ((record.quantized_layers if record is not None else None) or {}).items():
        placeholder_(modules[name], spec)
    return model


def build_run_denoiser(path: str | Path, record: RunRecord, family, dtype):
    """Rebuild a run's denoiser: base config on the meta device, shrink plan replayed, weights loaded strictly.

    Nothing of the base denoiser's weights is read. Each shard is hash-checked, cast to `dtype` and
    assigned in place of the meta tensors before the next is read, so peak memory is the model plus one
    shard. If the architecture creates buffers that are not saved (they would stay on the meta device),
    it is built on the CPU instead.
    """
    import diffusers
    import torch

    from obsdiff.solver.qlinear import quantized_layers
    from obsdiff.solver.quant import expand_groups

    path = Path(path)
    config_file = path / DENOISER_DIR / "config.json"
    config = read_json(config_file, "model config", require={"_class_name": str}, fix="re-run obsdiff prune",
                       error=ModelLoadError)
    try:
        cls = getattr(diffusers, config["_class_name"])
    except AttributeError as exc:
        raise ModelLoadError(f"{config_file} is missing or not a diffusers model config ({exc})") from None
    files = run_weight_files(path, record)
    _check_files(path, files)

    def build(device: str):
        return run_skeleton(cls, config, record, family, device)

    model = build("meta")
    expected = model.state_dict()
    tensors = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    if tensors - set(expected):  # non-persistent buffers: nothing in the files would replace them
        model = build("cpu")
        expected = model.state_dict()
    loaded: set[str] = set()
    quantized = quantized_layers(model)
    scales = {f"{n}.{b}" for n, lin in quantized.items() for b, _ in lin.named_buffers()}
    codes = {f"{n}.weight" for n in quantized}
    for rel, sha in files.items():
        state = _read_shard(path, rel, sha)
        _check_shapes(state, expected, path)
        _check_keys(loaded | set(state), set(expected), path, missing_too=False)
        for k, v in state.items():  # one tensor at a time: the shard is never held twice
            if k in scales:
                state[k] = v.float()
            elif (v.is_floating_point() or k in codes) and v.dtype != dtype:
                state[k] = v.to(dtype)  # codes too: int8, int4 and float8 values are exact in every float dtype
        model.load_state_dict(state, strict=False, assign=True)
        loaded |= set(state)
        del state
    _check_keys(loaded, set(expected), path)
    scale_ids = {id(b) for lin in quantized.values() for b in lin.buffers()}
    if any(t.is_floating_point() and t.dtype != dtype and id(t) not in scale_ids
           for t in [*model.parameters(), *model.buffers()]):
        # nn.Module's own `to`: diffusers' override warns about casting even when nothing must stay fp32; quantized
        # linears keep their scales float32 through it
        model = torch.nn.Module.to(model, dtype)
    for lin in quantized.values():  # codes -> the dequantized weight the layer computes with
        lin.weight.data = (lin.weight.float() * expand_groups(lin.weight_scale, lin.in_features)).to(dtype)
    return model.eval()
