"""Parameters and FLOPs of one denoiser forward, measured by running it (so shrunk models count right)."""

from __future__ import annotations

import torch
from torch import nn


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


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
