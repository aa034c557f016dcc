"""Outputs on disk: written whole or not at all, never over the user's files without `force`.

Every artefact obsdiff writes gets a JSON record of the software and machine that made it; the helpers
for that live here too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from obsdiff.errors import (
    BadFileError,
    ObsdiffError,
    OutputExistsError,
    OutputPathError,
    first_line,
    os_error_message,
)

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


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "true or false", int: "an integer",
               float: "a number", type(None): "null"}


def _json_kind(value_or_type) -> str:
    kind = value_or_type if isinstance(value_or_type, type) else type(value_or_type)
    return _JSON_KINDS.get(kind, kind.__name__)


def _kinds(types) -> str:
    return " or ".join(_json_kind(t) for t in (types if isinstance(types, tuple) else (types,)))


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)  # JSON true is no int


def read_text(path: str | Path, what: str, fix: str = "check the file", error: type[ObsdiffError] = BadFileError
              ) -> str:
    """The UTF-8 text of `path`; `error` in one line naming `what` and `path` when it is unreadable or not text."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is unreadable (not UTF-8 text: byte {exc.start}, {exc.reason}); {fix}") from None
    except OSError as exc:
        raise error(os_error_message(exc, path, f"cannot read {what}")) from None


def read_json(path: str | Path, what: str, expect: type | tuple = dict,
              require: Mapping[str, type | tuple] | None = None, fix: str = "check the file",
              error: type[ObsdiffError] = BadFileError):
    """The JSON value in `path`, checked by `check_json` (an `expect` holding `require`'s keys and types).

    Readers call this instead of `json.loads` so a truncated or foreign file is one line (`error`) naming it and
    `fix`, never a KeyError or TypeError deep in the code that uses the value.
    """
    text = read_text(path, what, fix, error)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")  # runs to the end
        state = "truncated JSON" if cut else "not JSON"
        raise error(f"{what} {path} is unreadable ({state}; {exc.msg}: line {exc.lineno} column {exc.colno}); "
                    f"{fix}") from None
    return check_json(data, path, what, expect, require, fix, error)


def check_json(data, path: str | Path, what: str, expect: type | tuple = dict,
               require: Mapping[str, type | tuple] | None = None, fix: str = "check the file",
               error: type[ObsdiffError] = BadFileError):
    """`data` (read from `path`) if it is an `expect` with every key of `require` of that type; else `error`."""
    if not _is(data, expect):
        raise error(f"{what} {path} holds {_json_kind(data)}, not {_kinds(expect)}; {fix}")
    for key, types in (require or {}).items():
        if key not in data:
            raise error(f"{what} {path} has no {key!r}; {fix}")
        if not _is(data[key], types):
            raise error(f"{what} {path}: {key!r} is {_json_kind(data[key])}, not {_kinds(types)}; {fix}")
    return data


def _nearest_existing(path: Path) -> Path:
    while not _exists(path) and path != path.parent:
        path = path.parent
    return path


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. EACCES on a component: treat as existing, so the probe below names the refusal
        return True


def check_writable(path: str | Path, force: bool) -> Path:
    """Refuse an existing output unless `force`, and a path the OS will not let us create; called before any
    work so nothing is wasted.

    The nearest existing ancestor must be a directory that accepts a new entry: a probe directory is created
    and removed there (permissions, read-only and special file systems such as /proc or /sys, a file where a
    directory must be), so these fail now with the user's path instead of after an hour of pruning.
    """
    path = Path(path)
    if _exists(path) and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it or choose another --out")
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {path}: {ancestor} is a file, not a directory; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".obsdiff-probe-", dir=ancestor))
    except OSError as exc:
        why = f"{exc.strerror} [{errno.errorcode.get(exc.errno, exc.errno)}]" if exc.errno else first_line(exc)
        raise OutputPathError(f"cannot write {path}: {ancestor} does not accept new files ({why}); choose a path "
                              "on a writable disk where you have permission") from None
    return path


def unfinished_outputs(exc: BaseException) -> tuple[str, ...]:
    """The outputs whose staging an exception (e.g. Ctrl-C) abandoned and removed, for the user's message."""
    return getattr(exc, "obsdiff_unfinished", ())


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created, deepest first (to undo on failure)."""
    missing = []
    while not _exists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return missing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    """Move `tmp` onto `path`; an existing `path` is set aside first and restored if the move fails."""
    if not (path.exists() or path.is_symlink()):
        tmp.rename(path)
        return
    if tmp.is_file() and path.is_file():
        os.replace(tmp, path)  # atomic: readers see the old file or the new one
        return
    old = path.with_name(f".{path.name}.replaced-{os.getpid()}")
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    _remove(old)


@contextlib.contextmanager
def _staged(path: str | Path, force: bool, make_tmp, mode: int) -> Iterator[Path]:
    """Yield a temporary sibling of `path` made by `make_tmp`; on success it replaces `path`.

    On any failure, Ctrl-C included, the temporary and the parent directories made for it are removed, so
    nothing half-written is left. An OS fault while writing (a full disk, a refused rename) becomes
    `OutputPathError` naming `path` rather than the temporary name, which means nothing to the user.
    """
    path = check_writable(path, force)
    tmp = None
    created: list[Path] = []
    try:
        created = _make_parents(path.parent)
        tmp = make_tmp(path)
        yield tmp
        tmp.chmod(mode)
        _replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            _remove(tmp)
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(exc, KeyboardInterrupt):
            exc.obsdiff_unfinished = (*unfinished_outputs(exc), str(path))
        fault = _os_fault(exc)
        if fault is not None and _about_output(fault, tmp):
            raise OutputPathError(os_error_message(fault, path, "could not write") + "; nothing was written") from exc
        raise


def _os_fault(exc: BaseException) -> OSError | None:
    """The OS fault behind `exc`: itself, its cause (exporters wrap a full disk in their own errors), or one
    rebuilt from a Rust I/O error's "(os error N)" (safetensors raises `SafetensorError` for a full disk).

    Ctrl-C and an `OutputPathError` (an inner staged write already named its output) are left as they are.
    """
    for _ in range(8):
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, OutputPathError):
            return None
        if isinstance(exc, OSError):
            return exc
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found:
            return OSError(int(found.group(1)), os.strerror(int(found.group(1))))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def _about_output(exc: OSError, tmp: Path | None) -> bool:
    """Whether an OS fault concerns the staged output (not, say, an input read inside the `with` block)."""
    if tmp is None or exc.filename is None:  # making the staging area, or a write error without a name
        return True
    name = Path(os.fsdecode(exc.filename)).absolute()
    return name == tmp.absolute() or tmp.absolute() in name.parents


def staged_dir(path: str | Path, force: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path`, on error it vanishes."""
    return _staged(path, force, lambda p: Path(tempfile.mkdtemp(prefix=f".{p.name}.", dir=p.parent)), 0o755)


def _temp_file(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def staged_file(path: str | Path, force: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Like `staged_dir` for one file: yields a temporary path that is renamed onto `path` on success."""
    return _staged(path, force, _temp_file, 0o644)
