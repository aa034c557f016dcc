"""What every benchmark script does with its results: JSON with the numbers, markdown with the tables."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from obsdiff.runs.artifacts import machine, versions


def save_results(out: Path, text: str, data: dict, t_start: float) -> dict:
    """`data` plus date, seconds, versions and machine as JSON at `out`; `text` as markdown beside it."""
    result = {"date": time.strftime("%Y-%m-%d"), **data, "seconds": time.perf_counter() - t_start,
              "versions": versions(), "machine": machine() | {"processor": platform.processor()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')} ({result['seconds']:.0f} s)")
    return result
