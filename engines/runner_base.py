"""The runner interface every backend implements, and the registry they join: a leaf module, so the PyTorch
runners (`runners`) and the graph runners (`graph_runners`) both build on it without importing each other."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from obsdiff.devices import synchronize as sync_device
from obsdiff.errors import ConfigError, ObsdiffError

RUNNERS: dict[str, type[Runner]] = {}


class RunnerUnavailable(ObsdiffError):
    """This backend cannot run this model here; the message says why (reported as a skipped backend)."""


@dataclass(frozen=True)
class InputRanges:
    """(min, opt, max) of the denoiser's user-level dims: batch rows, latent height/width, text tokens.

    Backends that compile a graph for shapes (ONNX export, TensorRT profiles) build for these.
    """

    batch: tuple[int, int, int]
    height: tuple[int, int, int]
    width: tuple[int, int, int]
    text: tuple[int, int, int]

    @classmethod
    def fixed(cls, batch: int, height: int, width: int, text: int) -> InputRanges:
        return cls((batch,) * 3, (height,) * 3, (width,) * 3, (text,) * 3)


def register_runner(cls: type[Runner]) -> type[Runner]:
    RUNNERS[cls.name] = cls
    return cls


def model_param(model) -> torch.Tensor:
    return next(model.denoiser.parameters())


class Runner(ABC):
    """A backend that runs one model's denoiser. Subclasses register with `@register_runner`."""

    name: str = ""
    min_warmup: int = 0  # calls a benchmark must make before timing (compilation, graph capture)

    def __init__(self, **options):
        unknown = set(options) - set(self.options())
        if unknown:
            raise ConfigError(f"backend {self.name} takes no option {sorted(unknown)[0]!r}; "
                              f"it takes {', '.join(self.options()) or 'none'}")
        self.opts = options
        self.details: dict = {}
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @classmethod
    def options(cls) -> tuple[str, ...]:
        return ()

    def available(self) -> tuple[bool, str]:
        """Whether the libraries and devices this backend needs are here, and if not, why (one line)."""
        return True, ""

    @abstractmethod
    def prepare(self, model, ranges: InputRanges | None = None) -> None:
        """Get ready to run `model` (a `LoadedModel`) for inputs within `ranges`; raises RunnerUnavailable."""

    @abstractmethod
    def __call__(self, **denoiser_kwargs) -> torch.Tensor:
        """One denoiser forward; returns its output tensor on the model's device and dtype."""

    def synchronize(self) -> None:
        if self.device.type != "cpu":
            sync_device(self.device)

    def close(self) -> None:  # noqa: B027 (optional hook: most runners hold nothing to release)
        """Release what `prepare` made (temporary exports, engines)."""

    def _adopt(self, model) -> None:
        p = model_param(model)
        self.device, self.dtype = p.device, p.dtype


