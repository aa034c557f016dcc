"""Load `--model` values: a local diffusers pipeline directory, `builtin:NAME`, a hub id (`org/name` or
`org/name@revision`) or a run directory written by `obsdiff prune`; where each one is, `hub` resolves.

`load_denoiser` loads the denoiser alone (no text encoder, VAE or tokenizer), cast tensor by tensor.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from obsdiff import devices
from obsdiff.builtin import PREFIX as BUILTIN_PREFIX
from obsdiff.devices import SAFETENSORS_DTYPES, resolve_device
from obsdiff.errors import ModelLoadError, first_line
from obsdiff.models import ModelFamily, family_for_pipeline
from obsdiff.models.registry import ImageSizeRule
from obsdiff.runs.hub import ModelSource, cached_snapshot, parse_hub_id, resolve_model, resolve_run_base
from obsdiff.runs.io import DENOISER_DIR, RunRecord, is_run_dir, read_run, read_safetensors_header
from obsdiff.runs.rebuild import build_run_denoiser, check_base_matches, run_skeleton

log = logging.getLogger(__name__)

@dataclass
class LoadedModel:
    """A pipeline with what obsdiff knows about it."""

    ref: str  # what the user passed
    path: Path  # the diffusers pipeline directory
    pipeline: object
    family: ModelFamily
    builtin: str | None = None
    generation_defaults: dict = field(default_factory=dict)
    run: RunRecord | None = None  # the run record when `ref` is a pruned run directory
    hub_id: str | None = None  # the hub repository the pipeline directory is a cached snapshot of
    revision: str | None = None  # that snapshot's commit sha

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.family.denoiser(self.pipeline)

    @property
    def name(self) -> str:
        if self.run is not None:
            return Path(self.ref).name
        if self.hub_id:
            return self.hub_id
        return f"{BUILTIN_PREFIX}{self.builtin}" if self.builtin else self.path.name


@contextlib.contextmanager
def quiet_libraries():
    """Silence diffusers' and transformers' loading bars and warnings: noise for obsdiff's users."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def _generation_defaults(builtin: str | None) -> dict:
    if builtin == "digits":
        from dataclasses import asdict

        from obsdiff.builtin.digits import GenerationDefaults

        return asdict(GenerationDefaults())
    return {}


def load_pipeline(ref: str, device: str | torch.device | None = "cpu", dtype: str | torch.dtype = "fp32"
                  ) -> LoadedModel:
    """Load `ref` as a diffusers pipeline on `device` in `dtype` and find its model family.

    `ref` may also be a run directory written by `obsdiff prune`: its base model is loaded and the
    pruned denoiser weights replace the base ones.
    """
    if Path(ref).expanduser().is_dir() and is_run_dir(Path(ref).expanduser()):
        return _load_run(ref, device, dtype)
    src = resolve_model(ref)
    device = resolve_device(device)
    torch_dtype = devices.torch_dtype(dtype, device)  # "auto" follows the device
    pipe = _from_pretrained(src.path, ref, torch_dtype)
    family = family_for_pipeline(pipe)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded %s (%s family) on %s", ref, family.name, device)
    return LoadedModel(ref=ref, path=src.path, pipeline=pipe, family=family, builtin=src.builtin,
                       generation_defaults=_generation_defaults(src.builtin), hub_id=src.hub_id,
                       revision=src.revision)


def as_loaded(pipeline) -> LoadedModel:
    """Wrap an in-memory diffusers pipeline (or pass a `LoadedModel` through) for the obsdiff API."""
    if isinstance(pipeline, LoadedModel):
        return pipeline
    family = family_for_pipeline(pipeline)
    origin = str(getattr(getattr(pipeline, "config", None), "_name_or_path", None) or ".")
    if hasattr(pipeline, "set_progress_bar_config"):  # obsdiff shows its own progress over whole generations
        pipeline.set_progress_bar_config(disable=True)
    hub = parse_hub_id(origin) if not Path(origin).exists() else None
    snapshot = cached_snapshot(*hub) if hub else None  # loaded from the hub: a run then records id and commit
    if snapshot is not None:
        return LoadedModel(ref=origin, path=snapshot, pipeline=pipeline, family=family, hub_id=hub[0],
                           revision=snapshot.name)
    return LoadedModel(ref=origin, path=Path(origin), pipeline=pipeline, family=family)


def _from_pretrained(path: Path, ref: str, torch_dtype: torch.dtype, **components):
    from diffusers import DiffusionPipeline

    try:
        with quiet_libraries():
            return DiffusionPipeline.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True,
                                                     **components)
    except Exception as exc:  # corrupt weights, missing component folders, wrong class names, ...
        raise ModelLoadError(f"could not load a diffusers pipeline from {ref!r}: {first_line(exc)}") from exc


def _load_run(ref: str, device, dtype) -> LoadedModel:
    """A run directory: its base pipeline with the pruned (possibly shrunk) denoiser in place."""
    from obsdiff.models import get_family

    run_path = Path(ref).expanduser()
    record = read_run(run_path)
    base = resolve_run_base(run_path, record)
    family = get_family(record.family)
    device = resolve_device(device)
    torch_dtype = devices.torch_dtype(dtype, device)  # "auto" follows the device
    check_base_matches(run_path, base.path / family.denoiser_attr, record.base_model)
    denoiser = build_run_denoiser(run_path, record, family, torch_dtype)
    pipe = _from_pretrained(base.path, record.base_model, torch_dtype, **{family.denoiser_attr: denoiser})
    loaded_family = family_for_pipeline(pipe)
    if loaded_family.name != family.name:
        raise ModelLoadError(f"run {ref!r} was made for the {family.name} family but its base "
                             f"{record.base_model!r} is {loaded_family.name}")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(ref=ref, path=base.path, pipeline=pipe, family=family, builtin=base.builtin,
                       generation_defaults=_generation_defaults(base.builtin), run=record, hub_id=base.hub_id,
                       revision=base.revision)


@dataclass(frozen=True)
class LoadedDenoiser:
    """A denoiser loaded without its pipeline (`load_denoiser`), with what callers would otherwise take from
    the pipeline."""

    denoiser: torch.nn.Module
    family: ModelFamily
    ref: str  # what the user passed
    path: Path  # the diffusers pipeline directory (a run's base)
    source: ModelSource
    builtin: str | None = None
    run: RunRecord | None = None  # the run record when `ref` is a pruned run directory
    generation_defaults: dict = field(default_factory=dict)
    # {tokenizer attribute: model_max_length} from each tokenizer's config file, for the ones that state it
    tokenizer_max_length: dict[str, int] = field(default_factory=dict)

    def with_pipeline(self, pipeline) -> LoadedModel:
        """A `LoadedModel` of this denoiser's model around `pipeline` (the real one, or a stand-in)."""
        return LoadedModel(ref=self.ref, path=self.path, pipeline=pipeline, family=self.family,
                           builtin=self.builtin, generation_defaults=self.generation_defaults, run=self.run)


def load_denoiser(ref: str, dtype: str | torch.dtype = "fp32", device: str | torch.device | None = "cpu",
                  weights: bool = True) -> LoadedDenoiser:
    """Load only the denoiser of `ref` (pipeline directory, `builtin:NAME` or run directory) in `dtype`.

    No text encoder, VAE or tokenizer is built. The model is built on the meta device from its config (a
    run's shrink plan replayed, as `rebuild.build_run_denoiser` does) and its safetensors are read tensor by
    tensor, each cast to `dtype` as it is read (modules the class keeps in fp32 stay fp32) and checked
    strictly: the peak is the model in `dtype` plus one tensor, whatever precision the files hold.
    `weights=False` gives the meta-device model (for callers that need only `denoiser.config`).
    """
    import json

    from obsdiff.models import get_family

    device = resolve_device(device)
    torch_dtype = devices.torch_dtype(dtype, device)  # "auto" follows the device
    run_path = Path(ref).expanduser()
    record = read_run(run_path) if run_path.is_dir() and is_run_dir(run_path) else None
    src = resolve_run_base(run_path, record) if record else resolve_model(ref)
    path, builtin = src.path, src.builtin
    index = _read_json(path / "model_index.json")
    if record is not None:
        family = get_family(record.family)
        check_base_matches(run_path, path / family.denoiser_attr, record.base_model)
        folder = run_path / DENOISER_DIR  # its weight files are checked (present, hashes) by build_run_denoiser
    else:
        family = _index_family(index, ref)
        folder = path / family.denoiser_attr
        files = _safetensors_files(folder) if weights else []
    config = _read_json(folder / "config.json")

    def build(where: str):
        import diffusers

        try:
            cls = getattr(diffusers, config["_class_name"])
        except (KeyError, AttributeError):
            raise ModelLoadError(f"{folder / 'config.json'} does not name a diffusers model class") from None
        return run_skeleton(cls, config, record, family, where)

    if record is not None and weights:  # the run's own loader: shards, hashes, quantized layers
        denoiser = build_run_denoiser(run_path, record, family, torch_dtype).to(device)
    else:
        denoiser = build("meta")
    if weights and record is None:
        state = _read_state_cast(files, torch_dtype, getattr(denoiser, "_keep_in_fp32_modules", None) or [])
        expected = denoiser.state_dict()
        bad = sorted(set(expected) ^ set(state)) or [k for k in state if state[k].shape != expected[k].shape]
        if bad:
            raise ModelLoadError(f"the weights in {files[0].parent} do not fit the model built from "
                                 f"{folder / 'config.json'} (first: {bad[0]}); the files are damaged or mixed")
        denoiser.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in [*denoiser.parameters(), *denoiser.buffers()]):  # unsaved buffers
            denoiser = build("cpu")
            denoiser.load_state_dict(state, strict=True, assign=True)
        del state
        denoiser.to(device)
    denoiser.eval()
    max_lengths = {}
    for attr in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        try:
            tok = json.loads((path / attr / "tokenizer_config.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(tok.get("model_max_length"), int):
            max_lengths[attr] = tok["model_max_length"]
    log.info("loaded the %s of %s (%s family) on %s in %s", family.denoiser_attr, ref, family.name, device,
             torch_dtype)
    return LoadedDenoiser(denoiser=denoiser, family=family, ref=ref, path=path, source=src, builtin=builtin,
                          run=record, generation_defaults=_generation_defaults(builtin),
                          tokenizer_max_length=max_lengths)


def _index_family(index: dict, ref: str) -> ModelFamily:
    """The family of the denoiser class that model_index.json names (as `family_for_pipeline` tells it)."""
    from obsdiff.models import FAMILIES

    family = next((f for f in FAMILIES.values() if (index.get(f.denoiser_attr) or [None, None])[1]
                   in f.denoiser_classes), None)
    if family is None:
        classes = [v[1] for v in index.values() if isinstance(v, list) and len(v) == 2 and v[1]]
        raise ModelLoadError(f"{ref!r} has no denoiser of a supported family (components: "
                             f"{', '.join(classes)}); supported: {', '.join(FAMILIES)}")
    return family


def image_size_rule(ref: str) -> ImageSizeRule:
    """The image heights and widths the pipeline behind `ref` accepts, from its config files alone.

    `ref` is anything `load_pipeline` takes; a run is judged by its base pipeline's VAE and denoiser configs
    (pruning, structured included, keeps the patch size and the position table).
    """
    from obsdiff.models import get_family

    run_path = Path(ref).expanduser()
    record = read_run(run_path) if run_path.is_dir() and is_run_dir(run_path) else None
    path = (resolve_run_base(run_path, record) if record else resolve_model(ref)).path
    index = _read_json(path / "model_index.json")
    family = get_family(record.family) if record else _index_family(index, ref)
    vae = _read_json(path / "vae" / "config.json") if (index.get("vae") or [None])[0] else None
    return family.image_size_rule(vae, _read_json(path / family.denoiser_attr / "config.json"))


def _read_json(file: Path) -> dict:
    from obsdiff.runs.artifacts import read_json

    return read_json(file, "pipeline file", fix="pass a diffusers pipeline or run directory", error=ModelLoadError)


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a diffusers model folder: one file, or the shards its index names."""
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(_read_json(index).get("weight_map", {}).values()))]
    raise ModelLoadError(f"{folder} has no diffusion_pytorch_model.safetensors (or sharded index); obsdiff "
                         "reads safetensors weights only: re-save the model with safe_serialization=True")


def _read_state_cast(files: list[Path], dtype: torch.dtype, keep_fp32: list[str]) -> dict[str, torch.Tensor]:
    """All tensors of `files`, floating ones cast to `dtype` (`keep_fp32` modules to fp32), one at a time.

    Read with plain file reads, not a memory map: mapped pages of the whole file would stay resident (and
    count as the process's memory) on top of the cast copies until the last tensor is read.
    """
    import struct

    state = {}
    for file in files:
        try:
            with open(file, "rb") as f:
                header, start = read_safetensors_header(f)
                for key, meta in header.items():
                    if key == "__metadata__":
                        continue
                    src = getattr(torch, SAFETENSORS_DTYPES[meta["dtype"]])
                    begin, end = meta["data_offsets"]
                    if end == begin:
                        t = torch.empty(meta["shape"], dtype=src)
                    else:
                        f.seek(start + begin)
                        buf = bytearray(end - begin)
                        if f.readinto(buf) != len(buf):
                            raise OSError(f"{key} ends past the end of the file")
                        t = torch.frombuffer(buf, dtype=src).reshape(meta["shape"])
                    if t.is_floating_point():
                        t = t.to(torch.float32 if any(k in key.split(".") for k in keep_fp32) else dtype)
                    state[key] = t
        except (OSError, ValueError, KeyError, struct.error) as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file ({exc})") from None
    return state


def check_sizes(refs: list[str | None], height: int | None, width: int | None) -> None:
    """Refuse --height/--width values the models behind `refs` cannot take, from their config files: before any
    weight loads or output is staged (diffusers would refuse them only inside the first pipeline call)."""
    if height is None and width is None:
        return
    from obsdiff.models.registry import check_image_size

    for ref in refs:
        if ref is not None:
            check_image_size(image_size_rule(ref), {"--height": height, "--width": width}, ref)
