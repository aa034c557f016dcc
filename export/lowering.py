"""Corrections to how the dynamo exporter lowers symbolic shape arithmetic to ONNX.

torch.export records integer arithmetic on dynamic dimensions as SymInt expressions, simplified by sympy,
and the exporter turns each Python `//` between them into ONNX ops. onnxscript 0.7 lowers `//` to integer
`Div`, which truncates toward zero: right for non-negative numerators only. sympy does produce negative ones:
SD3's cropped position table slices rows `top : top + h` with `top = (pos_embed_max_size - h) // 2`, and
sympy rewrites the slice end as `h + 96 + (-h) // 2` (pos_embed_max_size 192). For an odd patch count h,
`-65 // 2` is -33 in torch and -32 in the graph, so the slice takes h + 1 rows and the graph fails at run
time on every odd patch count (latent 130 = 65 patches = a 1040 px image). `custom_translations` replaces the
lowering with floor division for every sign: `(a - a mod b) / b` is exact, because ONNX `Mod` (fmod=0) takes
the divisor's sign, as Python's `%` does.
"""

from __future__ import annotations

import importlib
import operator


def floor_divide(opset: int):
    """An onnxscript (trace-only) function computing `a // b` on int64 scalars with Python's rounding."""
    op = getattr(importlib.import_module("onnxscript"), f"opset{opset}")

    def floordiv(a, b):
        return op.Div(op.Sub(a, op.Mod(a, b)), b)

    return floordiv


def custom_translations(opset: int) -> dict:
    """`torch.onnx.export(custom_translation_table=...)` for an export at `opset`."""
    return {operator.floordiv: floor_divide(opset)}
