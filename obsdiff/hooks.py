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
