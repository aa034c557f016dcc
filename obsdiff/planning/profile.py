"""One denoiser forward measured on the meta device: every linear's input shape and the activation peak.

The denoiser is rebuilt on the meta device (no memory, seconds even at 12 B parameters) and run once at the
calibration shape under a dispatch mode that counts the bytes of live intermediate tensors: that gives
every prunable linear's input shape (so the Hessians, the hook transients and the cached block inputs) and
the activation peak of one forward, exactly, for any family (`memory.plan_groups` turns it into a plan).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from obsdiff.devices import tensor_bytes


class _LiveBytes:
    """Bytes of live tensors created inside a `TorchDispatchMode`, and their peak (views and in-place ops
    allocate nothing and are not counted)."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def track(self, out) -> None:
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)


class FusedAttention(torch.overrides.TorchFunctionMode):
    """Attention as the fused kernels run it (flash / memory-efficient on GPUs, flash on CPUs): an output the
    size of the query, no (tokens x tokens) score matrix. On the meta device SDPA would otherwise decompose
    into the math path and count scores that real runs never hold."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            return q.new_empty((*q.shape[:-1], v.shape[-1]))
        return func(*args, **kwargs)


def _allocates(func) -> bool:
    return not any(r.alias_info is not None for r in func._schema.returns)


class CountLiveBytes(TorchDispatchMode):
    """While active, tracks the bytes of every tensor an op allocates: `self.live.peak` is the most alive at once."""

    def __init__(self):
        super().__init__()
        self.live = _LiveBytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _allocates(func):
            self.live.track(out)
        return out


@dataclass
class ForwardProfile:
    """What one denoiser forward at the calibration shape needs, measured on the meta device."""

    linear_inputs: dict[str, tuple[int, ...]]  # dotted linear name -> input shape of its (first) call
    activation_peak: int  # bytes of intermediate tensors alive at once
    block_input_bytes: int  # one call's keyword inputs of the first selected block (cached calibration)


def profile_forward(denoiser: nn.Module, inputs: dict, first_block: nn.Module | None = None) -> ForwardProfile:
    """Run `denoiser` (on the meta device, with meta `inputs`) once and measure shapes and live bytes."""
    shapes: dict[str, tuple[int, ...]] = {}
    block_bytes = [0]
    count = CountLiveBytes()
    live = count.live

    handles = []
    for name, mod in denoiser.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, n=name: shapes.setdefault(n, tuple(args[0].shape)) and None))
    if first_block is not None:
        def on_block(mod, args, kwargs):
            if not block_bytes[0]:
                block_bytes[0] = tensor_bytes(kwargs) + tensor_bytes(args)

        handles.append(first_block.register_forward_pre_hook(on_block, with_kwargs=True))
    try:
        with torch.no_grad(), FusedAttention(), count:
            denoiser(**inputs, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return ForwardProfile(shapes, live.peak, block_bytes[0])


def meta_twin(denoiser: nn.Module, shrink_plan: list | None = None, family=None) -> nn.Module:
    """The same architecture on the meta device (shrunk like a structured run when given its plan)."""
    if all(p.is_meta for p in denoiser.parameters()):
        return denoiser
    with torch.device("meta"):
        twin = type(denoiser).from_config(denoiser.config)
    if shrink_plan:
        from obsdiff.runs.shrink import replay_plan_

        groups = [g for b in family.blocks(twin) for g in family.structure_groups(b)]
        replay_plan_(twin, groups, shrink_plan)
    return twin
