"""Outputs on disk: written whole or not at all, never over the user's files without `force`.

Every artefact obsdiff writes gets a JSON record of the software and machine that made it; the helpers
for that live here too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from obsdiff.errors import OutputExistsError

TRACKED_PACKAGES = ("obsdiff", "torch", "diffusers", "transformers", "onnx", "onnxruntime",
                    "onnxruntime-gpu", "tensorrt", "polygraphy")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that affect results (None when not installed)."""
    return {name: package_version(name) for name in TRACKED_PACKAGES}


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def check_writable(path: str | Path, force: bool) -> Path:
    """Refuse an existing output unless `force`; called before any work so nothing is wasted."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it or choose another --out")
    return path


@contextlib.contextmanager
def staged_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path`, on error it vanishes."""
    path = check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    tmp.rename(path)


@contextlib.contextmanager
def staged_file(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Like `staged_dir` for one file: yields a temporary path that is renamed onto `path` on success."""
    path = check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.chmod(0o644)
    os.replace(tmp, path)
