"""The one place that registers hooks. `HessianHooks` owns them and removes every one on exit."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from obsdiff.devices import synchronize
from obsdiff.solver.hessian import HessianAccumulator


class StepCounter:
    """Which denoising step (0 = noisiest) the pipeline is in; advanced by the step-end callback.

    `run` counts pipeline calls (`reset`), `total` is the number of steps of the current call once the
    pipeline has reported it (after its first step).
    """

    def __init__(self):
        self.step = 0
        self.run = 0
        self.total: int | None = None

    def reset(self) -> None:
        self.step = 0
        self.run += 1
        self.total = None

    def on_step_end(self, pipeline, i: int, t, callback_kwargs: dict) -> dict:
        self.step = i + 1
        self.total = getattr(pipeline, "num_timesteps", None)
        return {}  # the pipeline pops overrides from the returned dict: change nothing


class StopPass(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a hook when the rest of the pipeline call is not needed; `run_pass` catches it."""


class LastStepCut:
    """Ends a pipeline call early: in its last step, once every hook that reports here has fired as often as
    in the first and the second-to-last step, nothing after it is needed (the output latents are not).

    Schedulers that call the denoiser a varying number of times per step are never cut.
    """

    def __init__(self, counter: StepCounter):
        self.counter = counter
        self._run = -1
        self._counts: dict[int, int] = {}

    def fired(self) -> None:
        c = self.counter
        if c.run != self._run:
            self._run, self._counts = c.run, {}
        n = self._counts[c.step] = self._counts.get(c.step, 0) + 1
        last = (c.total or 0) - 1
        if last >= 1 and c.step == last and n == self._counts.get(0) == self._counts.get(last - 1):
            raise StopPass


class CallCut:
    """Ends a run of hooked blocks once every hook has fired as often as in the first run (`start` before
    each run, `finish` after it): the rest of the last hooked block computes outputs nobody reads."""

    def __init__(self):
        self.expected: int | None = None
        self._fires = 0

    def start(self) -> None:
        self._fires = 0

    def fired(self) -> None:
        self._fires += 1
        if self._fires == self.expected:
            raise StopPass

    def finish(self) -> None:
        if self.expected is None:
            self.expected = self._fires


class HessianHooks:
    """Forward pre-hooks that feed each watched linear's input into its accumulator.

    `weights[k]` is the timestep weight alpha_k of step k. `seconds` sums the time spent accumulating; with
    `sync` the accelerator is synchronised around each accumulation so that the time is real (slower: only
    when asked to measure). Use as a context manager: the hooks are removed when the block exits, also when
    it raises, so a failed prune never leaves a model instrumented.
    """

    def __init__(self, counter: StepCounter, weights: list[float], sync: bool = False,
                 cut: LastStepCut | CallCut | None = None):
        self.counter = counter
        self.weights = weights
        self.sync = sync
        self.cut = cut
        self.seconds = 0.0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def watch(self, module: nn.Module, acc: HessianAccumulator) -> None:
        self._handles.append(module.register_forward_pre_hook(self._make_hook(acc), with_kwargs=True))

    def _make_hook(self, acc: HessianAccumulator) -> Callable:
        weights, counter, last = self.weights, self.counter, len(self.weights) - 1

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            if self.sync:
                _synchronize(x.device)
            t0 = time.perf_counter()
            acc.add(x, weights[min(counter.step, last)])  # the hooks run under no_grad: no detach needed
            if acc.ranges is not None:
                acc.ranges.add(x, counter.step)
            if self.sync:
                _synchronize(acc.device)
            self.seconds += time.perf_counter() - t0
            if self.cut is not None:
                self.cut.fired()

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> HessianHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        synchronize(device)


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

    By default `calls` gets `(kwargs, step)` per call, tensors moved to `device`; with `sink`, each call's
    `(kwargs, step)` goes there instead (tensors as the model has them). `on_first` sees the first call's
    inputs; `cut` is told after each call. Blocks are called with keywords by the denoisers obsdiff caches
    (positional calls only happen under gradient checkpointing, in training).
    """

    def __init__(self, module: nn.Module, counter: StepCounter, device: torch.device | None = None,
                 on_first: Callable[[dict], None] | None = None,
                 sink: Callable[[dict, int], None] | None = None, cut: LastStepCut | None = None):
        self.calls: list[tuple[dict, int]] = []
        self.count = 0

        def hook(mod, args, kwargs):
            if args:
                raise TypeError(f"{type(mod).__name__} was called with positional inputs; cached calibration "
                                "needs keyword calls (disable gradient checkpointing)")
            if not self.count and on_first is not None:
                on_first(kwargs)  # e.g. check that the whole cache will fit before filling it
            self.count += 1
            if sink is not None:
                sink(kwargs, counter.step)
            else:
                self.calls.append((tensors_to(kwargs, device), counter.step))
            if cut is not None:
                cut.fired()

        self._handle = module.register_forward_pre_hook(hook, with_kwargs=True)

    def __enter__(self) -> InputCapture:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
