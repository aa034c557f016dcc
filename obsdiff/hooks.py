"""The one place that registers hooks. `HessianHooks` owns them and removes every one on exit."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from obsdiff.hessian import HessianAccumulator


class StepCounter:
    """Which denoising step (0 = noisiest) the pipeline is in; advanced by the step-end callback."""

    def __init__(self):
        self.step = 0

    def reset(self) -> None:
        self.step = 0

    def on_step_end(self, pipeline, i: int, t, callback_kwargs: dict) -> dict:
        self.step = i + 1
        return {}  # the pipeline pops overrides from the returned dict: change nothing


class HessianHooks:
    """Forward pre-hooks that feed each watched linear's input into its accumulator.

    `weights[k]` is the timestep weight alpha_k of step k. Use as a context manager: the hooks are removed
    when the block exits, also when it raises, so a failed prune never leaves a model instrumented.
    """

    def __init__(self, counter: StepCounter, weights: list[float]):
        self.counter = counter
        self.weights = weights
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def watch(self, module: nn.Module, acc: HessianAccumulator) -> None:
        self._handles.append(module.register_forward_pre_hook(self._make_hook(acc), with_kwargs=True))

    def _make_hook(self, acc: HessianAccumulator) -> Callable:
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            acc.add(x.detach(), self.weights[min(self.counter.step, len(self.weights) - 1)])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> HessianHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def tensors_to(obj, device: torch.device):
    """`obj` with every tensor inside (nested tuples, lists, dicts) detached and moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: tensors_to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(tensors_to(v, device) for v in obj)
    return obj


class InputCapture:
    """A forward pre-hook that records the keyword inputs of every call of one module, with the step.

    `calls` gets `(kwargs, step)` per call, tensors moved to `device`; `on_first` sees the first call's
    inputs. Blocks are called with keywords by the denoisers obsdiff caches (positional calls only happen
    under gradient checkpointing, in training).
    """

    def __init__(self, module: nn.Module, counter: StepCounter, device: torch.device,
                 on_first: Callable[[dict], None] | None = None):
        self.calls: list[tuple[dict, int]] = []

        def hook(mod, args, kwargs):
            if args:
                raise TypeError(f"{type(mod).__name__} was called with positional inputs; cached calibration "
                                "needs keyword calls (disable gradient checkpointing)")
            if not self.calls and on_first is not None:
                on_first(kwargs)  # e.g. check that the whole cache will fit before filling it
            self.calls.append((tensors_to(kwargs, device), counter.step))

        self._handle = module.register_forward_pre_hook(hook, with_kwargs=True)

    def __enter__(self) -> InputCapture:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
