"""Models embedded in the package, addressed as `builtin:NAME`."""

from __future__ import annotations

from pathlib import Path

from obsdiff.errors import ModelLoadError

PREFIX = "builtin:"


def builtin_names() -> list[str]:
    return ["digits"]


def builtin_pipeline_dir(name: str) -> Path:
    """The diffusers pipeline directory of a builtin model."""
    if name == "digits":
        from obsdiff.builtin import digits

        path = digits.PIPELINE_DIR
    else:
        raise ModelLoadError(f"unknown builtin model {PREFIX}{name}; available: "
                             + ", ".join(PREFIX + n for n in builtin_names()))
    if not (path / "model_index.json").exists():
        raise ModelLoadError(f"{PREFIX}{name} weights are missing from the installation ({path}); "
                             "reinstall obsdiff or rebuild them with tools/train_digits.py")
    return path
