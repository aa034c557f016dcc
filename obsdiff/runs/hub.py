"""Where the pipeline behind a `--model` value is: a local diffusers pipeline directory, `builtin:NAME`, a hub id
(`org/name` or `org/name@revision`), or a run's base model.

Hub ids are taken from the local Hugging Face cache first (so they work offline once cached) and
downloaded only where the network is allowed, the way diffusers downloads a pipeline.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from obsdiff.builtin import PREFIX as BUILTIN_PREFIX
from obsdiff.builtin import builtin_pipeline_dir
from obsdiff.errors import ModelLoadError, first_line
from obsdiff.runs.io import RunRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where a `--model` value (or a run's base model) was found."""

    path: Path  # the diffusers pipeline directory (for a hub id: the cached snapshot)
    builtin: str | None = None
    hub_id: str | None = None
    revision: str | None = None  # commit sha of the hub snapshot


def resolve_model(ref: str) -> ModelSource:
    """Where the pipeline behind a `--model` value is: every loader resolves through here.

    A local path wins over a hub id of the same spelling (as in diffusers).
    """
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        return ModelSource(builtin_pipeline_dir(name), builtin=name)
    path = Path(ref).expanduser()
    if not path.exists():
        hub = parse_hub_id(ref)
        if hub is not None:
            return resolve_hub(*hub)
        raise ModelLoadError(f"model path {ref!r} does not exist; pass a diffusers pipeline directory, a hub id "
                             "(org/name[@revision]) or builtin:digits")
    if not path.is_dir():
        raise ModelLoadError(f"model path {ref!r} is a file; pass a diffusers pipeline directory "
                             "(the folder with model_index.json)")
    if not (path / "model_index.json").exists():
        raise ModelLoadError(f"{ref!r} is not a diffusers pipeline directory (no model_index.json); "
                             "pass the folder that save_pretrained wrote")
    return ModelSource(path)


# the repository id rules of huggingface_hub (validate_repo_id), with the organisation required
_HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[\w.-]+")


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `ref` is spelled like `org/name[@revision]`, else None."""
    repo, at, revision = ref.partition("@")
    if not _HUB_ID.fullmatch(repo) or ".." in repo or repo.endswith((".", "-")) or (at and not revision):
        return None
    return repo, revision or None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


def _is_complete_pipeline(folder: Path) -> bool:
    """Whether a snapshot holds model_index.json and a non-empty folder for every component it names."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
    return all((folder / k).is_dir() and any((folder / k).iterdir()) for k in parts)


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The hub cache's snapshot folder of `repo` at `revision` (None: not cached); never uses the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def resolve_hub(repo: str, revision: str | None = None) -> ModelSource:
    """The cached snapshot of hub pipeline `repo` at `revision` (a branch, tag or commit; default main).

    The local cache is tried first, without the network; a model that is not (fully) cached is downloaded
    by diffusers' own `DiffusionPipeline.download` (safetensors preferred over pickles, only the files the
    pipeline loads, huggingface_hub's progress bars), unless HF_HUB_OFFLINE forbids it.
    """
    name = f"{repo}@{revision}" if revision else repo
    cache = hub_cache_dir()
    folder = cached_snapshot(repo, revision)
    if folder is not None and _is_complete_pipeline(folder):
        log.info("%s: cached snapshot %s", name, folder)
        return ModelSource(folder, hub_id=repo, revision=folder.name)
    if hub_offline():
        cached = "is only partly" if folder is not None else "is not"
        raise ModelLoadError(f"hub model {name!r} {cached} in the local cache ({cache}) and HF_HUB_OFFLINE is set: "
                             f"download it where the hub is reachable (`hf download {repo}`"
                             f"{f' --revision {revision}' if revision else ''}), or unset HF_HUB_OFFLINE")
    folder = _download(repo, revision, cache, name)
    return ModelSource(folder, hub_id=repo, revision=folder.name)


def _download(repo: str, revision: str | None, cache: Path, name: str) -> Path:
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog

    log.info("downloading %s from the hub into %s", name, cache)
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # its "couldn't connect" warnings would precede our one-line error
    try:
        return Path(DiffusionPipeline.download(repo, revision=revision, cache_dir=str(cache)))
    except Exception as exc:  # hub, HTTP and file errors arrive wrapped in several layers: name the cause
        raise _hub_error(exc, repo, revision, name) from exc
    finally:
        dlog.set_verbosity(level)


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and everything chained to it (causes and contexts), nearest first."""
    seen, todo = [], [exc]
    while todo and len(seen) < 16:
        e = todo.pop(0)
        if e is not None and all(e is not s for s in seen):
            seen.append(e)
            todo += [e.__cause__, e.__context__]
    return seen


def _hub_error(exc: BaseException, repo: str, revision: str | None, name: str) -> ModelLoadError:
    """One line for a failed hub download, saying which case it was (the cause may be chained)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = _causes(exc)
    kinds = (GatedRepoError, RevisionNotFoundError, RepositoryNotFoundError, OfflineModeIsEnabled)
    cause = next((e for kind in kinds for e in chain if isinstance(e, kind)), None)
    if isinstance(cause, GatedRepoError):
        return ModelLoadError(f"hub model {repo!r} is gated: accept its licence on https://huggingface.co/{repo} "
                              "and log in with `hf auth login` (huggingface-cli login) or set HF_TOKEN")
    if isinstance(cause, RevisionNotFoundError):
        return ModelLoadError(f"hub model {repo!r} has no revision {revision!r}; pass a branch, tag or commit "
                              "that exists")
    if isinstance(cause, RepositoryNotFoundError):
        return ModelLoadError(f"no hub model {repo!r} (or it is private: log in with `hf auth login`); check the "
                              "id, or pass a local pipeline directory")
    if isinstance(cause, OfflineModeIsEnabled):
        return ModelLoadError(f"hub model {name!r} is not in the local cache ({hub_cache_dir()}) and offline mode "
                              f"forbids downloading: download it with `hf download {repo}` where the hub is "
                              "reachable, or unset HF_HUB_OFFLINE")
    root = chain[-1]
    return ModelLoadError(f"hub model {name!r} is not in the local cache ({hub_cache_dir()}) and could not be "
                          f"downloaded ({type(root).__name__}: {first_line(root)}); check the network (or "
                          "HF_ENDPOINT), or pass a local pipeline directory")


def resolve_run_base(run: Path, record: RunRecord) -> ModelSource:
    """The base model of a run: a hub id from the cache (or downloaded), a path relative to the run, then the
    absolute path it had when the run was made; runs of format <= 2 without `base` name only `base_model`."""
    if record.base_hub_id:
        return resolve_hub(record.base_hub_id, record.base_revision)
    ref = record.base_model
    if record.base_path is None and not Path(ref).is_absolute():  # builtin:NAME, or an id written by hand
        return resolve_model(ref)
    places = ([Path(os.path.normpath(run / record.base_path))] if record.base_path else []) + [Path(ref)]
    for place in places:
        if (place / "model_index.json").is_file():
            return ModelSource(place)
    looked = " and ".join(f"{p} ({why})" for p, why in zip(
        places, ["relative to the run", "where it was when pruned"][-len(places):], strict=True))
    raise ModelLoadError(f"run {str(run)!r} cannot find its base model: looked in {looked}; put the base pipeline "
                         "directory back in one of these places (moving it together with the run keeps the relative "
                         "one valid)")
