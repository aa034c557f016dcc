"""The formats gpu_quant.py compares, each as a prepared GEMM: bf16 dense and 2:4, INT8 dense and 2:4, FP8 dense and
2:4, with the quantization of obsdiff.solver.quant (symmetric; weights per output channel, activations per tensor).

A prepared format gives the kernel alone on operands quantized beforehand (`gemm`), its output dequantized for the
error check (`result`), and the eager linear a model would run (`linear`: quantize the activation, the kernel,
dequantize to bf16). Sparse formats compress 2:4-pruned weights with torch.sparse.to_sparse_semi_structured; the
"fused" ones call cuSPARSELt directly with a per-channel alpha vector and bf16 output (the dequantize in the kernel's
epilogue; a vector, because cuSPARSELt would read a single alpha with .item(), a host sync).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obsdiff.errors import first_line
from obsdiff.solver.quant import FORMATS, SCALE_FLOOR, activation_scale, codes, weight_scales

BF16 = torch.bfloat16
REL_ERR_LIMIT = 0.1  # above this the kernel's output is wrong or saturated: its timing is all the row is good for
NOTES = [
    "rel err: ||y - y_ref|| / ||y_ref|| of the kernel's dequantized output against float32 x @ W^T with the same "
    "weights (2:4-pruned for the 2:4 rows): the kernel's numerics and the quantization error, not the pruning error.",
    "INT8: weights per output channel, activations per tensor with a static scale, symmetric (obsdiff.solver.quant). "
    "torch._int_mm returns int32: 'int8' is the kernel alone; 'int8 +q/dq' adds the activation quantize and the "
    "int32 -> bf16 dequantize in eager PyTorch (unfused, an upper bound of the epilogue's cost).",
    "FP8: E4M3 with per-tensor scales (torch._scaled_mm applies them in its epilogue, bf16 output); 'fp8 +q' adds "
    "the activation cast.",
    "2:4: weights pruned 2 of every 4 along the input dimension by magnitude and compressed with "
    "torch.sparse.to_sparse_semi_structured (cuSPARSELt where available, else CUTLASS; the algorithm from "
    "torch._cslt_sparse_mm_search where it answers). 'int8 2:4' is the kernel as torch.mm gives it (cuSPARSELt: int8 "
    "output, which saturates: timing only); 'fused' rows call torch._cslt_sparse_mm with a per-channel alpha and "
    "bf16 output.",
    "Blocks: q, k, v, out, ff up, GELU (tanh), ff down with bf16 SDPA attention; norms, modulation, residuals and "
    "the text stream's own linears are left out. 'linears': the six linears alone, with their eager quantize/"
    "dequantize; 'GEMM kernels': the sum of the six kernels of the GEMM table (4 x q/k/v/out + up + down), what "
    "fused epilogues approach. Activation scales are calibrated on the benchmark input.",
    "Timing: CUDA graphs of `reps` calls and CUDA events, formats interleaved round by round, median of `rounds`. "
    "One GEMM's weights stay in L2 between its calls. Random weights: latency does not depend on the values.",
]


@dataclass(frozen=True)
class Format:
    label: str
    dtype: str  # bf16, int8, fp8
    sparse: bool = False
    fused: bool = False  # cuSPARSELt with a per-channel alpha and bf16 output
    fallback: Format | None = None  # blocks: the format to use when this one cannot be prepared

    @property
    def quantized(self) -> bool:
        return self.dtype != "bf16"


INT8_24 = Format("int8 2:4", "int8", sparse=True)
INT8_24_FUSED = Format("int8 2:4 fused", "int8", sparse=True, fused=True)
GEMM_FORMATS = (Format("bf16", "bf16"), Format("bf16 2:4", "bf16", sparse=True), Format("int8", "int8"), INT8_24,
                INT8_24_FUSED, Format("fp8", "fp8"), Format("fp8 2:4", "fp8", sparse=True, fused=True))
BLOCK_FORMATS = (Format("bf16", "bf16"), Format("bf16 2:4", "bf16", sparse=True), Format("int8", "int8"),
                 Format("int8 2:4", "int8", sparse=True, fused=True, fallback=INT8_24), Format("fp8", "fp8"),
                 Format("fp8 2:4", "fp8", sparse=True, fused=True))


@dataclass
class Prepared:
    gemm: Callable[[], torch.Tensor]
    result: Callable[[torch.Tensor], torch.Tensor]
    linear: Callable[[torch.Tensor], torch.Tensor]
    out_dtype: str
    epilogue: str  # "+q/dq" (quantize and dequantize around the kernel) or "+q" (the kernel dequantizes)
    note: str = ""


def capabilities(device: str) -> dict:
    """What this PyTorch and GPU offer for the formats (recorded with the results)."""
    caps = {"compute_capability": None, "cusparselt": False,
            "semi_structured": hasattr(torch.sparse, "to_sparse_semi_structured"),
            "int_mm": hasattr(torch, "_int_mm"), "scaled_mm": hasattr(torch, "_scaled_mm")}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        caps["compute_capability"] = f"{major}.{minor}"
        caps["cusparselt"] = bool(torch.backends.cusparselt.is_available())
    return caps


def skip_reason(fmt: Format, device: str, caps: dict) -> str | None:
    """Why `fmt` cannot run here at all (None: try it, and record the error if it raises)."""
    cc = tuple(int(v) for v in caps["compute_capability"].split(".")) if caps["compute_capability"] else None
    if fmt.sparse and cc is None:
        return (f"2:4 sparse kernels (cuSPARSELt / CUTLASS) need an NVIDIA GPU of compute capability 8.0+; "
                f"this is {device}")
    if fmt.sparse and cc < (8, 0):
        return f"2:4 sparse tensor cores need compute capability 8.0+, this GPU has {caps['compute_capability']}"
    if fmt.fused and not caps["cusparselt"]:
        return "needs cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
    if fmt.dtype == "fp8" and cc is not None and cc < (8, 9):
        return f"FP8 tensor cores need compute capability 8.9+ (Ada, Hopper), this GPU has {caps['compute_capability']}"
    return None


# ------------------------------------------------------------------------------------------------ data


def random_weight(n: int, k: int, device: str) -> torch.Tensor:
    return (torch.randn(n, k, device=device) * 0.02).to(BF16)


def random_activation(m: int, k: int, device: str) -> torch.Tensor:
    return torch.randn(m, k, device=device).to(BF16)


def prune_24(W: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs (the layout of sparse tensor cores)."""
    n, k = W.shape
    groups = W.reshape(n, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(n, k)


def reference(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return x.float() @ W.float().t()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def error_note(note: str, rel: float) -> str:
    if rel <= REL_ERR_LIMIT:
        return note
    return f"{note}; rel err > {REL_ERR_LIMIT}: wrong or saturated output, timing only".lstrip("; ")


def free_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ formats


def _act_scale(x: torch.Tensor, fmt) -> torch.Tensor:
    """A static per-tensor activation scale (0-dim float32 on x's device), calibrated on x."""
    return torch.tensor(activation_scale(float(x.abs().amax()), fmt), dtype=torch.float32, device=x.device)


def _to_sparse(W: torch.Tensor, dense_b: torch.Tensor, fused: bool = False, **search) -> tuple[object, str]:
    """W compressed 2:4, and a note naming the backend (and cuSPARSELt's searched algorithm)."""
    from torch.sparse import to_sparse_semi_structured

    ws = to_sparse_semi_structured(W)
    backend = getattr(ws, "BACKEND", type(ws).__name__)
    if fused and backend != "cusparselt":
        raise RuntimeError(f"the fused kernel is cuSPARSELt's; to_sparse_semi_structured chose {backend}")
    if backend != "cusparselt" or not hasattr(torch, "_cslt_sparse_mm_search"):
        return ws, backend
    try:
        alg = int(torch._cslt_sparse_mm_search(ws.packed, dense_b, **search))
        ws.alg_id_cusparselt = alg
        return ws, f"cusparselt alg {alg}"
    except Exception as exc:  # the search is an optimisation only
        return ws, f"cusparselt default alg (search failed: {first_line(exc)[:60]})"


def _cslt_mm(ws, kw: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    def mm(a: torch.Tensor) -> torch.Tensor:
        y = torch._cslt_sparse_mm(ws.packed, a.t(), alg_id=ws.alg_id_cusparselt, **kw)
        return y if kw["transpose_result"] else y.t()

    return mm


def _fused(W8: torch.Tensor, x8: torch.Tensor, alpha: torch.Tensor) -> tuple[Callable, str]:
    """cuSPARSELt's W8 @ x8^T scaled per output row by `alpha` (N,) with bf16 output, as a function of the quantized
    activation returning (M, N): with its transposed-result mode where it has one, else transposed back (a view).

    alpha is a vector even for per-tensor scales: cuSPARSELt reads a single alpha with .item(), a host sync that
    CUDA graphs cannot capture."""
    alpha = alpha.float().contiguous()
    want, failure = (x8.shape[0], W8.shape[0]), None
    for transpose in (True, False):
        kw = dict(alpha=alpha, out_dtype=BF16, transpose_result=transpose)
        try:
            ws, note = _to_sparse(W8, x8.t(), fused=True, **kw)
            mm = _cslt_mm(ws, kw)
            if tuple(mm(x8).shape) != want:
                raise RuntimeError(f"cuSPARSELt returned {tuple(mm(x8).shape)}, expected {want}")
            return mm, note if transpose else f"{note}, result transposed back"
        except Exception as exc:  # the transposed-result mode is an optimisation: try without it
            failure = exc
    raise failure


def _bf16(fmt: Format, W: torch.Tensor, x: torch.Tensor) -> Prepared:
    note = ""
    if fmt.sparse:
        W, note = _to_sparse(W, x.t())
    return Prepared(lambda: F.linear(x, W), lambda y: y.float(), lambda a: F.linear(a, W), "bfloat16", "", note)


def _int8(fmt: Format, W: torch.Tensor, x: torch.Tensor) -> Prepared:
    q = FORMATS["int8"]
    sw, sx = weight_scales(W, q), _act_scale(x, q)  # (N, 1) per output channel; per tensor
    xq, Wq = codes(x, sx, q), codes(W, sw, q)
    deq = (sx * sw).t().contiguous()  # (1, N): int32 accumulators -> real values
    quant = lambda a: codes(a, sx, q)
    if not fmt.sparse:
        wt = Wq.t()  # column-major: the layout cuBLASLt's int8 GEMM wants
        return Prepared(lambda: torch._int_mm(xq, wt), lambda y: y.float() * deq,
                        lambda a: (torch._int_mm(quant(a), wt).float() * deq).to(BF16), "int32", "+q/dq",
                        "torch._int_mm")
    if fmt.fused:
        mm, note = _fused(Wq, xq, (sx * sw).flatten())  # alpha (N,): one scale per output row of W @ x^T
        return Prepared(lambda: mm(xq), lambda y: y.float(), lambda a: mm(quant(a)), "bfloat16", "+q",
                        f"{note}, per-channel alpha epilogue")
    ws, note = _to_sparse(Wq, xq.t())
    mm = lambda b: torch.mm(ws, b.t())  # (N, M): W @ x^T, the sparse operand first
    out = str(mm(xq).dtype).removeprefix("torch.")
    return Prepared(lambda: mm(xq), lambda y: y.float().t() * deq,
                    lambda a: (mm(quant(a)).float().t() * deq).to(BF16), out, "+q/dq", f"{note}, {out} output")


def _fp8(fmt: Format, W: torch.Tensor, x: torch.Tensor) -> Prepared:
    q = FORMATS["fp8"]
    sw = (W.float().abs().amax().clamp_min(SCALE_FLOOR) / q.qmax).reshape(())  # per tensor, as torch._scaled_mm
    sx = _act_scale(x, q)
    xf, Wf = codes(x, sx, q), codes(W, sw, q)
    quant = lambda a: codes(a, sx, q)
    if not fmt.sparse:
        wt = Wf.t()
        mm = lambda a8: torch._scaled_mm(a8, wt, sx, sw, out_dtype=BF16)
        return Prepared(lambda: mm(xf), lambda y: y.float(), lambda a: mm(quant(a)), "bfloat16", "+q",
                        "torch._scaled_mm, per-tensor scales")
    mm, note = _fused(Wf, xf, (sx * sw).reshape(1).expand(W.shape[0]))  # per-tensor scales as a vector alpha
    return Prepared(lambda: mm(xf), lambda y: y.float(), lambda a: mm(quant(a)), "bfloat16", "+q",
                    f"{note}, alpha epilogue")


def prepare(fmt: Format, W: torch.Tensor, x: torch.Tensor) -> Prepared:
    """`fmt` applied to weight W (N, K) (already 2:4-pruned for a sparse format) and activation x (M, K)."""
    return {"bf16": _bf16, "int8": _int8, "fp8": _fp8}[fmt.dtype](fmt, W, x)


# ------------------------------------------------------------------------------------------------ block


def _heads(t: torch.Tensor, dims: dict) -> torch.Tensor:
    return t.reshape(1, t.shape[0], dims["heads"], dims["head_dim"]).transpose(1, 2)


def attention_fn(x: torch.Tensor, dims: dict) -> Callable[[], torch.Tensor]:
    """bf16 SDPA over the joint sequence (x as query, key and value: the values do not change the time)."""
    q = _heads(x, dims)
    return lambda: F.scaled_dot_product_attention(q, q, q)


def block_fns(fmt: Format, weights: dict, x: torch.Tensor, hidden: torch.Tensor, dims: dict
              ) -> tuple[Callable, Callable, str, str]:
    """(the block, its six linears alone, a note, the GEMM-table label of the kernel it uses) for `fmt`."""

    def make(f: Format) -> dict[str, Prepared]:
        return {name: prepare(f, prune_24(W) if f.sparse else W, hidden if name == "down" else x)
                for name, W in weights.items()}

    note, used = "", fmt
    try:
        preps = make(fmt)
    except Exception as exc:
        if fmt.fallback is None:
            raise
        used = fmt.fallback
        preps = make(used)
        note = f"unfused: the fused kernel failed ({first_line(exc)[:80]})"
    lin = {name: p.linear for name, p in preps.items()}
    m = x.shape[0]

    def block() -> torch.Tensor:
        q, k, v = (_heads(lin[name](x), dims) for name in ("q", "k", "v"))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(m, -1)
        return lin["down"](F.gelu(lin["up"](lin["out"](a)), approximate="tanh"))

    def linears() -> torch.Tensor:
        for name in ("q", "k", "v", "out", "up"):
            lin[name](x)
        return lin["down"](hidden)

    note = "; ".join(p for p in (note, preps["q"].note) if p)
    kernel = INT8_24_FUSED.label if used.fused and used.dtype == "int8" else used.label
    return block, linears, note, kernel
