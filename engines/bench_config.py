"""What a benchmark times (`BenchConfig`): its own module, so the scopes (`bench`, `pipeline_bench`) share it
without importing each other."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from obsdiff.errors import ConfigError

from .runners import RUNNERS

SCOPES = ("denoiser", "pipeline")


@dataclass(frozen=True)
class BenchConfig:
    """What to time. `height`/`width` are image pixels (None: the model's default); `batch` is images in the
    pipeline scope and denoiser batch rows in the denoiser scope (pipelines with CFG double it inside)."""

    backends: tuple[str, ...] = ("torch", "onnxruntime")
    scope: str = "denoiser"
    steps: int = 25
    batch: int = 1
    height: int | None = None
    width: int | None = None
    warmup: int = 5
    iters: int = 20
    device: str = "auto"
    dtype: str = "fp32"
    seed: int = 0
    threads: int | None = None  # CPU threads for PyTorch and onnxruntime (None: PyTorch's current setting)
    backend_options: Mapping[str, Mapping] = field(default_factory=dict)

    def __post_init__(self):
        backends = tuple(b.strip() for b in (self.backends.split(",") if isinstance(self.backends, str)
                                             else self.backends) if b.strip())
        object.__setattr__(self, "backends", backends)
        if not backends:
            raise ConfigError("--backend is empty; give e.g. torch,onnxruntime")
        unknown = [b for b in backends if b not in RUNNERS]
        if unknown:
            raise ConfigError(f"unknown backend {unknown[0]!r}; use a comma list of {', '.join(RUNNERS)}")
        if self.scope not in SCOPES:
            raise ConfigError(f"--scope {self.scope!r} must be denoiser or pipeline")
        for name in ("steps", "batch", "iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)} must be at least 1")
        if self.warmup < 0:
            raise ConfigError(f"--warmup {self.warmup} must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads} must be at least 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["backend_options"] = {k: {o: str(v) for o, v in opts.items()} for k, opts in self.backend_options.items()}
        return d
