"""Resumable prunes: a staging directory that keeps every finished calibration group.

    runs/NAME.partial/state.json           settings and their hash, groups done, the report so far
    runs/NAME.partial/group-0003.safetensors   the tensors group 3 changed (pruned weights, zeroed rows)

A prune writes one group file, then the state, after each group (each file written to a temporary name and
renamed, so a kill at any instant leaves the last complete state). Resuming loads the base model as before,
re-applies the saved groups in order and continues with the next one: every step after that sees exactly the
model the uninterrupted run saw, so the weights come out bitwise identical on the same machine and software.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from obsdiff.errors import ConfigError, ModelLoadError, OutputExistsError
from obsdiff.pruning.distributed import World
from obsdiff.runs.artifacts import staged_file

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
SUFFIX = ".partial"
FORMAT = 1


def staging_dir(out: str | Path) -> Path:
    """Where a prune writing to `out` keeps its finished groups until the run is saved."""
    out = Path(out)
    return out.with_name(out.name + SUFFIX)


def settings_hash(settings: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def first_difference(old, new, prefix: str = "") -> tuple[str, object, object] | None:
    """The first (dotted key, old value, new value) that differs between two JSON-like settings."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            diff = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _write_atomic(path: Path, write) -> None:
    # staged_file: a full disk or Ctrl-C mid-write leaves the last complete file and no temporary behind
    with staged_file(path, force=True) as tmp:
        write(tmp)
        with open(tmp, "rb") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())


@runtime_checkable
class CheckpointLike(Protocol):
    """What a prune uses of its checkpoint (`session.PruningSession`): a `Checkpoint`, or in a distributed prune
    `distributed.SharedCheckpoint` (rank 0) and `distributed.CheckpointView` (the other ranks)."""

    @property
    def path(self) -> Path | None:
        """The staging directory (where cached calibration inputs may spill); None where this rank has none."""

    @property
    def done(self) -> int:
        """How many groups are finished and stored."""

    @property
    def report(self) -> dict | None:
        """The report as it was after the last finished group."""

    @property
    def extra(self) -> dict:
        """The strategy's state beyond the report, as stored with the last finished group."""

    def restore_(self, module: torch.nn.Module) -> None:
        """Apply every finished group to `module` (the dense base)."""

    def save_group(self, index: int, tensors: dict[str, torch.Tensor], report: dict, extra: dict | None = None
                   ) -> None:
        """Store group `index` (the tensors it changed, by state-dict name) and the state after it."""


class Checkpoint:
    """The staging directory of one prune. `done` groups are finished and stored."""

    def __init__(self, path: Path, settings: dict, state: dict | None = None):
        settings = json.loads(json.dumps(settings, default=str))  # compared as stored: tuples are lists there
        self.path = path
        self.settings = settings
        self.state = state or {"format": FORMAT, "settings": settings, "hash": settings_hash(settings),
                               "groups_done": 0, "report": None, "extra": {}}

    @property
    def done(self) -> int:
        return int(self.state["groups_done"])

    @property
    def report(self) -> dict | None:
        """The report as it was after the last finished group."""
        return self.state["report"]

    @property
    def extra(self) -> dict:
        """Orchestrator state beyond the report (e.g. structured pruning's removed columns)."""
        return self.state["extra"]

    @staticmethod
    def check_leftover(out: str | Path, resume: bool = False, force: bool = False) -> None:
        """Refuse, before any work, a leftover staging directory that neither --resume nor --force claims."""
        path = staging_dir(out)
        if path.exists() and not path.is_dir():
            raise OutputExistsError(f"{path} exists and is not a directory; remove it or choose another --out")
        if path.exists() and not resume and not force and _peek_done(path) != "0":  # nothing finished: no loss
            raise OutputExistsError(f"an interrupted prune left {path} ({_peek_done(path)} groups finished); pass "
                                    "--resume to continue it, or --force to discard it and start over")

    @classmethod
    def open(cls, out: str | Path, settings: dict, resume: bool = False, force: bool = False) -> Checkpoint:
        """The checkpoint for a prune writing to `out`.

        A leftover staging directory is continued with `resume`, discarded with `force`, and otherwise
        refused: it holds finished work that a silent restart would throw away.
        """
        cls.check_leftover(out, resume, force)
        path = staging_dir(out)
        if path.exists() and not resume:
            shutil.rmtree(path)
        if resume and path.is_dir():
            return cls._resume(path, settings)
        if resume:
            log.warning("--resume: nothing to resume at %s, starting from the first group", path)
        path.mkdir(parents=True)
        ckpt = cls(path, settings)
        ckpt._write_state()
        return ckpt

    @classmethod
    def _resume(cls, path: Path, settings: dict) -> Checkpoint:
        try:
            state = json.loads((path / STATE_FILE).read_text())
            saved = state["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path / STATE_FILE} is unreadable ({exc}); delete {path} (or pass --force "
                                 "without --resume) to start over") from None
        if state.get("format") != FORMAT:
            raise ConfigError(f"{path} was written by another obsdiff version (format {state.get('format')}); "
                              "pass --force without --resume to start over")
        diff = first_difference(saved, json.loads(json.dumps(settings, default=str)))
        if diff:
            key, old, new = diff
            raise ConfigError(f"cannot resume {path}: {key} was {old!r} and is now {new!r}; rerun with the "
                              "original settings, or pass --force without --resume to start over")
        log.info("resuming %s after %d finished groups", path, state["groups_done"])
        return cls(path, settings, state)

    def _group_file(self, index: int) -> Path:
        return self.path / f"group-{index:04d}.safetensors"

    def _write_state(self) -> None:
        text = json.dumps(self.state, indent=1, default=str) + "\n"
        _write_atomic(self.path / STATE_FILE, lambda p: p.write_text(text))

    def save_group(self, index: int, tensors: dict[str, torch.Tensor], report: dict, extra: dict | None = None
                   ) -> None:
        """Store group `index` (the tensors it changed, by state-dict name) and the state after it."""
        from safetensors.torch import save_file

        if index != self.done:
            raise RuntimeError(f"group {index} finished out of order (expected {self.done})")
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        _write_atomic(self._group_file(index), lambda p: save_file(cpu, str(p)))
        self.state.update(groups_done=index + 1, report=report, extra=extra or {})
        self._write_state()

    def load_group(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._group_file(index)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{path} is missing or corrupt ({exc}); pass --force without --resume to "
                                 "start over") from None

    def restore_(self, module: torch.nn.Module) -> None:
        """Apply every finished group to `module`, in order (the model must be the dense base)."""
        params = {**dict(module.named_parameters()), **dict(module.named_buffers())}  # quantized: scales too
        for g in range(self.done):
            for name, value in self.load_group(g).items():
                if name not in params or params[name].shape != value.shape:
                    raise ModelLoadError(f"{self._group_file(g)} does not fit this model ({name}); pass --force "
                                         "without --resume to start over")
                with torch.no_grad():
                    params[name].copy_(value.to(params[name].device))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _peek_done(path: Path) -> str:
    try:
        return str(json.loads((path / STATE_FILE).read_text())["groups_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown number of"


# ------------------------------------------------------------------ one checkpoint for every torchrun rank


class CheckpointView:
    """A non-zero rank's view of rank 0's checkpoint (a `resume.CheckpointLike`): its progress and state, and the
    restored weights."""

    path = None  # block-input spills stay off other machines' disks

    def __init__(self, world: World, state: dict):
        self.world, self.done, self.report, self.extra = world, state["done"], state["report"], state["extra"]

    def restore_(self, module: torch.nn.Module) -> None:
        self.world.agree(None)  # rank 0 reads its checkpoint; wait for its outcome
        self.world.broadcast_(_module_tensors(module), src=0)

    def save_group(self, index: int, tensors: dict, report: dict, extra: dict | None = None) -> None:
        self.world.agree(None)  # rank 0 writes; wait for its outcome


class SharedCheckpoint:
    """Rank 0's checkpoint in a distributed prune (a `resume.CheckpointLike`): it alone writes; restores are
    broadcast to every rank. Everything else is the wrapped `Checkpoint`'s."""

    def __init__(self, world: World, checkpoint: Checkpoint):
        self.world, self.checkpoint = world, checkpoint

    def __getattr__(self, name):
        return getattr(self.checkpoint, name)

    def restore_(self, module: torch.nn.Module) -> None:
        with self.world.failures():
            self.checkpoint.restore_(module)
        self.world.broadcast_(_module_tensors(module), src=0)

    def save_group(self, index: int, tensors: dict, report: dict, extra: dict | None = None) -> None:
        with self.world.failures():
            self.checkpoint.save_group(index, tensors, report, extra)


def share_checkpoint(world: World, checkpoint: Checkpoint | None) -> CheckpointLike | None:
    """The checkpoint object every rank passes to the prune: rank 0's own, wrapped, or a view of it."""
    if not world.distributed:
        return checkpoint
    state = None
    if world.is_main and checkpoint is not None:
        state = {"done": checkpoint.done, "report": checkpoint.report, "extra": checkpoint.extra}
    state = world.broadcast_object(state)
    if state is None:
        return None
    return SharedCheckpoint(world, checkpoint) if world.is_main else CheckpointView(world, state)


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for _, t in sorted(module.state_dict(keep_vars=True).items())]
