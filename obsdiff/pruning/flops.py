"""Parameters and FLOPs of one denoiser forward, counted by tracing it (so shrunk models count right).

`count_flops` traces the forward on the meta device: the same operator shapes as a real forward, no
arithmetic and no memory, so a full-size model is counted in about a second. `forward_flops` runs the real
forward (the reference the meta count is tested against).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # QK^T and (softmax)V: two batched matmuls of 2 * B * heads * Lq * Lk * d FLOPs each.
    b, h, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def _custom_mapping() -> dict:
    # PyTorch's flop counter knows the CUDA attention kernels but not the CPU one.
    ops = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        if hasattr(ops, name):
            mapping[getattr(ops, name)] = _sdpa_flops
    return mapping


@torch.no_grad()
def forward_flops(denoiser: nn.Module, inputs: dict) -> int:
    """FLOPs (2 per multiply-add) of one forward on `inputs`, matmuls, convolutions and attention."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        denoiser(**inputs, return_dict=False)
    return int(counter.get_total_flops())


@torch.no_grad()
def count_flops(denoiser: nn.Module, inputs: dict) -> int:
    """What `forward_flops` measures, traced on the meta device: the weights are neither read nor copied.

    The parameters and buffers are swapped for meta tensors of the same shapes and dtypes for one call
    (`torch.func.functional_call`), the inputs (nested dicts too) are moved to meta. A forward that
    needs real values (data-dependent control flow) falls back to the real, measured forward.
    """
    from torch.func import functional_call
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import FlopCounterMode

    meta = {n: torch.empty_like(t, device="meta") for n, t in [*denoiser.named_parameters(),
                                                               *denoiser.named_buffers()]}
    meta_inputs = tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, inputs)
    try:
        with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
            functional_call(denoiser, meta, args=(), kwargs={**meta_inputs, "return_dict": False})
    except (NotImplementedError, RuntimeError) as exc:
        log.warning("counting FLOPs on the meta device failed (%s); running the forward instead", exc)
        return forward_flops(denoiser, inputs)
    return int(counter.get_total_flops())


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
