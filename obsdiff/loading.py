"""Resolve and load `--model` values: a local diffusers pipeline directory or `builtin:NAME`.

Nothing is fetched from a hub: a hub id gets an error that says how to download it first.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from obsdiff.builtin import PREFIX as BUILTIN_PREFIX
from obsdiff.builtin import builtin_pipeline_dir
from obsdiff.errors import ConfigError, ModelLoadError
from obsdiff.models import ModelFamily, family_for_pipeline

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A pipeline with what obsdiff knows about it."""

    ref: str  # what the user passed
    path: Path  # the diffusers pipeline directory
    pipeline: object
    family: ModelFamily
    builtin: str | None = None
    generation_defaults: dict = field(default_factory=dict)
    run: dict | None = None  # the run record when `ref` is a pruned run directory

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.family.denoiser(self.pipeline)

    @property
    def name(self) -> str:
        if self.run is not None:
            return Path(self.ref).name
        return f"{BUILTIN_PREFIX}{self.builtin}" if self.builtin else self.path.name


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16") from None


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but no CUDA GPU is available; use --device cpu")
    return device


def resolve_model(ref: str) -> tuple[Path, str | None]:
    """The pipeline directory behind a `--model` value, and the builtin name if it is one."""
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        return builtin_pipeline_dir(name), name
    path = Path(ref).expanduser()
    if not path.exists():
        looks_like_hub_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
        if looks_like_hub_id:
            raise ModelLoadError(
                f"{ref!r} is not a local directory; obsdiff does not download from a hub: fetch it first "
                f"(e.g. `hf download {ref} --local-dir DIR`) and pass --model DIR")
        raise ModelLoadError(f"model path {ref!r} does not exist; pass a diffusers pipeline directory "
                             "or builtin:digits")
    if not path.is_dir():
        raise ModelLoadError(f"model path {ref!r} is a file; pass a diffusers pipeline directory "
                             "(the folder with model_index.json)")
    if not (path / "model_index.json").exists():
        raise ModelLoadError(f"{ref!r} is not a diffusers pipeline directory (no model_index.json); "
                             "pass the folder that save_pretrained wrote")
    return path, None


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
    from obsdiff import io

    if Path(ref).expanduser().is_dir() and io.is_run_dir(Path(ref).expanduser()):
        return _load_run(ref, device, dtype)
    path, builtin = resolve_model(ref)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    pipe = _from_pretrained(path, ref, torch_dtype)
    family = family_for_pipeline(pipe)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded %s (%s family) on %s", ref, family.name, device)
    return LoadedModel(ref=ref, path=path, pipeline=pipe, family=family, builtin=builtin,
                       generation_defaults=_generation_defaults(builtin))


def as_loaded(pipeline) -> LoadedModel:
    """Wrap an in-memory diffusers pipeline (or pass a `LoadedModel` through) for the obsdiff API."""
    if isinstance(pipeline, LoadedModel):
        return pipeline
    family = family_for_pipeline(pipeline)
    origin = getattr(getattr(pipeline, "config", None), "_name_or_path", None) or "."
    if hasattr(pipeline, "set_progress_bar_config"):  # obsdiff shows its own progress over whole generations
        pipeline.set_progress_bar_config(disable=True)
    return LoadedModel(ref=str(origin), path=Path(origin), pipeline=pipeline, family=family)


def _from_pretrained(path: Path, ref: str, torch_dtype: torch.dtype, **components):
    from diffusers import DiffusionPipeline

    try:
        with quiet_libraries():
            return DiffusionPipeline.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True,
                                                     **components)
    except Exception as exc:  # corrupt weights, missing component folders, wrong class names, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load a diffusers pipeline from {ref!r}: {first}") from exc


def _load_run(ref: str, device, dtype) -> LoadedModel:
    """A run directory: its base pipeline with the pruned (possibly shrunk) denoiser in place."""
    from obsdiff import io
    from obsdiff.models import get_family

    run_path = Path(ref).expanduser()
    record = io.read_run(run_path)
    base_path, builtin = resolve_model(record["base_model"])
    family = get_family(record.get("family", "sd3"))
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    io.check_base_matches(run_path, base_path / family.denoiser_attr, record["base_model"])
    denoiser = io.build_run_denoiser(run_path, record, family, torch_dtype)
    pipe = _from_pretrained(base_path, record["base_model"], torch_dtype, **{family.denoiser_attr: denoiser})
    loaded_family = family_for_pipeline(pipe)
    if loaded_family.name != family.name:
        raise ModelLoadError(f"run {ref!r} was made for the {family.name} family but its base "
                             f"{record['base_model']!r} is {loaded_family.name}")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(ref=ref, path=base_path, pipeline=pipe, family=family, builtin=builtin,
                       generation_defaults=_generation_defaults(builtin), run=record)


def load_denoiser(ref: str, dtype: str | torch.dtype = "fp32", device: str | torch.device | None = "cpu",
                  weights: bool = True) -> tuple[torch.nn.Module, ModelFamily, dict]:
    """Load only the denoiser of `ref` (pipeline directory, `builtin:NAME` or run directory) in `dtype`.

    No text encoder, VAE or tokenizer is built. The model is built on the meta device from its config (a
    run's shrink plan replayed, as `io.build_run_denoiser` does) and its safetensors are read tensor by
    tensor, each cast to `dtype` as it is read (modules the class keeps in fp32 stay fp32) and checked
    strictly: the peak is the model in `dtype` plus one tensor, whatever precision the files hold.
    `weights=False` returns the meta-device model (for callers that need only `denoiser.config`).
    Returns (denoiser, family, info); `info` holds what callers would otherwise take from the pipeline:
    `ref`, `path` (pipeline directory), `builtin`, `run` (the run record or None), `generation_defaults`
    and `tokenizer_max_length` ({tokenizer attribute: model_max_length} from each tokenizer's config file,
    for the ones that state it).
    """
    import json

    from obsdiff import io
    from obsdiff.artifacts import sha256_file
    from obsdiff.models import FAMILIES, get_family

    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    run_path = Path(ref).expanduser()
    record = io.read_run(run_path) if run_path.is_dir() and io.is_run_dir(run_path) else None
    path, builtin = resolve_model(record["base_model"] if record else ref)
    index = _read_json(path / "model_index.json")
    if record is not None:
        family = get_family(record.get("family", "sd3"))
        io.check_base_matches(run_path, path / family.denoiser_attr, record["base_model"])
        folder = run_path / io.DENOISER_DIR
        files = [run_path / record["denoiser_file"]]
        if weights and not files[0].is_file():
            raise ModelLoadError(f"run {ref!r} lacks its weights {record['denoiser_file']}; re-run obsdiff prune")
        if weights and record.get("denoiser_sha256") and sha256_file(files[0]) != record["denoiser_sha256"]:
            raise ModelLoadError(f"{files[0]} does not match the hash in {io.RUN_FILE}: the file is corrupt or was "
                                 "replaced; re-run obsdiff prune")
    else:
        # the family is told by the denoiser class model_index.json names, as family_for_pipeline does
        family = next((f for f in FAMILIES.values() if (index.get(f.denoiser_attr) or [None, None])[1]
                       in f.denoiser_classes), None)
        if family is None:
            classes = [v[1] for v in index.values() if isinstance(v, list) and len(v) == 2 and v[1]]
            raise ModelLoadError(f"{ref!r} has no denoiser of a supported family (components: "
                                 f"{', '.join(classes)}); supported: {', '.join(FAMILIES)}")
        folder = path / family.denoiser_attr
        files = _safetensors_files(folder) if weights else []
    config = _read_json(folder / "config.json")

    def build(where: str):
        import diffusers

        from obsdiff.shrink import replay_plan_

        try:
            cls = getattr(diffusers, config["_class_name"])
        except (KeyError, AttributeError):
            raise ModelLoadError(f"{folder / 'config.json'} does not name a diffusers model class") from None
        with torch.device(where):
            model = cls.from_config(config)
        if record is not None and record.get("shrink_plan"):
            groups = [g for b in family.blocks(model) for g in family.structure_groups(b)]
            replay_plan_(model, groups, record["shrink_plan"])
        return model

    denoiser = build("meta")
    if weights:
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
    info = {"ref": ref, "path": path, "builtin": builtin, "run": record,
            "generation_defaults": _generation_defaults(builtin), "tokenizer_max_length": max_lengths}
    return denoiser, family, info


def _read_json(file: Path) -> dict:
    import json

    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} is missing or unreadable ({exc}); pass a diffusers pipeline or run "
                             "directory") from None


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


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_state_cast(files: list[Path], dtype: torch.dtype, keep_fp32: list[str]) -> dict[str, torch.Tensor]:
    """All tensors of `files`, floating ones cast to `dtype` (`keep_fp32` modules to fp32), one at a time.

    Read with plain file reads, not a memory map: mapped pages of the whole file would stay resident (and
    count as the process's memory) on top of the cast copies until the last tensor is read.
    """
    import json
    import struct

    state = {}
    for file in files:
        try:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
                start = 8 + size
                for key, meta in header.items():
                    if key == "__metadata__":
                        continue
                    src = _SAFETENSORS_DTYPES[meta["dtype"]]
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
