"""Errors the user can act on. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import errno
import os
import re


class ObsdiffError(Exception):
    """Base class: the message is one line that names the bad value and says what to do."""

    exit_code = 2


class ModelLoadError(ObsdiffError):
    """`--model` is not something obsdiff can load (missing path, hub id, not a pipeline, corrupt file)."""


class UnsupportedModelError(ObsdiffError):
    """The pipeline's denoiser belongs to no registered model family."""


class ConfigError(ObsdiffError):
    """An option or a combination of options is invalid."""


class MissingDependencyError(ObsdiffError):
    """An optional package is needed for this command and is not installed."""


class OutputExistsError(ObsdiffError):
    """The output path exists and `--force` was not given."""


class OutputPathError(ObsdiffError):
    """The operating system refuses an output path: permissions, a read-only or special file system, a file
    where a directory must be, a full disk."""


class BadFileError(ObsdiffError):
    """An input file cannot be read or is not what it claims to be (not UTF-8 text, truncated or wrong-shape JSON)."""


class Interrupted(ObsdiffError):
    """The user stopped a long command (Ctrl-C); the message says what was kept and how to continue."""

    exit_code = 130


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type name when the message is empty.

    Messages of other libraries (torch, onnx, TensorRT) often hold a whole dump; a one-line error shows this.
    """
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


# What to do about an OS fault, by errno; the path and the OS's own words are added by `os_error_message`.
_ADVICE = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose a path on a writable disk",
    errno.ENOTDIR: "a component of the path is a file, not a directory; choose another path",
    errno.EEXIST: "a file is in the way; choose another path",
    errno.EISDIR: "it is a directory, not a file; pass a file",
    errno.ENOENT: "check the path",
    errno.ENOSPC: "the disk is full; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EFBIG: "the file is too large for this file system; write elsewhere",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "a symbolic link in the path points back to itself; check the path",
    errno.EIO: "the device reported an I/O error; check the disk",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and run again",
}


def os_error_message(exc: OSError, path: str | os.PathLike | None = None, action: str = "") -> str:
    """One line for an OS fault: `[action ]PATH: <the OS's words> [ERRNO]; <what to do>`.

    `path` replaces `exc.filename` where the caller knows better (a staging name means nothing to the user).
    """
    target = path if path is not None else exc.filename
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    what = (exc.strerror or first_line(exc)) + (f" [{code}]" if code else "")
    where = f"{action} {target}" if action and target is not None else (action or target)
    advice = _ADVICE.get(exc.errno, "check the path and run again" if target is not None else "run with -v for details")
    return f"{where}: {what}; {advice}" if where else f"{what}; {advice}"


# What allocators say when memory runs out where they raise a plain RuntimeError: torch's CPU allocator (Linux
# "can't allocate memory", Windows "not enough memory"), CUDA outside its OutOfMemoryError (context creation,
# "CUDA error: out of memory"), cuBLAS workspaces, MPS ("MPS backend out of memory").
_OUT_OF_MEMORY = ("can't allocate memory", "not enough memory", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: Python's MemoryError, torch's OutOfMemoryError (any device), an
    allocator's RuntimeError, or an OS refusal (ENOMEM)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOMEM
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m.lower() in text for m in _OUT_OF_MEMORY)


def out_of_memory_detail(exc: BaseException) -> str:
    """A few words on an allocation failure: how much was asked for, where, and what was free when it says so.

    torch's messages run to several sentences on one line (allocator statistics, tuning hints): only the facts
    the user acts on are kept.
    """
    text = str(exc)
    asked = re.search(r"tried to allocate (\d+) bytes", text, re.I)
    size = f"{int(asked[1]) / 2**30:.2f} GiB" if asked else None
    if size is None:
        asked = re.search(r"(?:tried to|unable to) allocate ([\d.]+ ?[KMGT]i?B)", text, re.I)
        size = asked[1] if asked else None
    where = ("the CPU" if "CPUAllocator" in text else "the GPU" if "CUDA" in text or "GPU" in text
             else "MPS" if "MPS" in text else "host memory" if isinstance(exc, MemoryError) else None)
    free = re.search(r"total capacity of ([\d.]+ ?[KMGT]i?B) of which ([\d.]+ ?[KMGT]i?B) is free", text)
    if size is None:
        return where if where and not text.strip() else first_line(exc)
    return (f"tried to allocate {size}" + (f" on {where}" if where and where != "host memory" else "")
            + (f", {free[2]} free of {free[1]}" if free else ""))
