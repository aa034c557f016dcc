"""What each quantized format buys on one GPU, at SD3-Medium and Flux width: GEMMs and one transformer block.

Loaded by gpu_check.py (its "quant" section); formats and their kernels are in gpu_quant_formats.py.

    GEMMs   the block's three GEMM shapes per width (q/k/v/out: hidden x hidden, ff up: hidden -> FFN,
            ff down: FFN -> hidden) at the token count of one 1024 px image (SD3: 4096 + 333, Flux: 4096 + 512,
            rounded up to a multiple of 64: FP8 GEMMs need multiples of 16, sparse kernels pad to 32 or 64 otherwise).
            Each format twice: the kernel alone on operands quantized beforehand (what a fused engine approaches),
            and "+q/dq" / "+q": with the activation quantize and the dequantize epilogue in eager PyTorch around it.
    blocks  q, k, v, out, ff up, GELU, ff down in sequence with bf16 SDPA attention between them, per format
            (activations quantized and dequantized around every quantized GEMM, eager), next to the
            attention alone, the six linears alone, and the sum of the six kernels from the GEMM table.

Timing: CUDA graphs of `reps` calls (eager when a capture fails), CUDA events, formats interleaved round by
round, median of `rounds` samples. A format that raises is recorded as "unsupported: <reason>"; one whose
preconditions are missing (a CPU dry run, no FP8 on this GPU) as "skipped" with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import gpu_quant_formats as QF

from obsdiff.errors import first_line
from obsdiff.tables import format_table

WIDTHS = {
    "sd3-medium": dict(hidden=1536, ffn=6144, heads=24, head_dim=64, image_tokens=4096, text_tokens=333),
    "flux": dict(hidden=3072, ffn=12288, heads=24, head_dim=128, image_tokens=4096, text_tokens=512),
}
DRY_WIDTHS = {
    "sd3-medium": dict(hidden=64, ffn=256, heads=4, head_dim=16, image_tokens=48, text_tokens=13),
    "flux": dict(hidden=128, ffn=512, heads=4, head_dim=32, image_tokens=48, text_tokens=16),
}
M_MULTIPLE = 64
GEMM_HEADERS = ["width", "GEMM", "M x K x N", "format", "median ms", "TFLOP/s", "speedup vs bf16", "rel err", "note"]
BLOCK_HEADERS = ["width", "format", "block ms", "linears ms", "attention ms", "block speedup", "linears speedup",
                 "GEMM kernels ms", "kernels speedup", "note"]


def padded_tokens(dims: dict, batch: int = 1) -> tuple[int, int]:
    """(tokens, M): the joint sequence of `batch` images and M, the GEMM row count rounded up to M_MULTIPLE."""
    tokens = batch * (dims["image_tokens"] + dims["text_tokens"])
    return tokens, -(-tokens // M_MULTIPLE) * M_MULTIPLE


def gemm_shapes(dims: dict) -> list[tuple[str, int, int, int]]:
    """(name, uses per block, K, N) of the block's GEMMs."""
    h, f = dims["hidden"], dims["ffn"]
    return [("q/k/v/out", 4, h, h), ("ff up", 1, h, f), ("ff down", 1, f, h)]


# ------------------------------------------------------------------------------------------------ timing


class Timer:
    """Times zero-argument callables: CUDA graphs of `reps` calls and CUDA events, or perf_counter on a CPU."""

    def __init__(self, device: str, reps: int, warmup: int, graphs: bool = True):
        self.device, self.reps, self.warmup, self.graphs = device, reps, warmup, graphs and device == "cuda"

    def runner(self, fn: Callable[[], object]) -> tuple[Callable[[], None], str]:
        """(run `reps` calls, how it is timed). The warm-up also compiles cuBLAS/cuSPARSELt plans before capture."""
        import torch

        def loop():
            for _ in range(self.reps):
                fn()

        if self.device != "cuda":
            for _ in range(self.warmup):
                fn()
            return loop, "cpu perf_counter"
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture needs its warm-up on a side stream
            for _ in range(max(self.warmup, 2)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        if not self.graphs:
            return loop, "cuda events, eager"
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loop()
            graph.replay()
            torch.cuda.synchronize()
            return graph.replay, f"cuda graph of {self.reps} calls, cuda events"
        except Exception as exc:  # a kernel that synchronizes or allocates outside the pool: time it eagerly
            with contextlib.suppress(Exception):  # the failed capture has ended; settle the device
                torch.cuda.synchronize()
            return loop, f"cuda events, eager (graph capture failed: {first_line(exc)[:80]})"

    def sample(self, run: Callable[[], None]) -> float:
        """Milliseconds per call of one run."""
        import torch

        if self.device != "cuda":
            t0 = time.perf_counter()
            run()
            return (time.perf_counter() - t0) * 1e3 / self.reps
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / self.reps


def measure(fns: dict[str, Callable[[], object]], timer: Timer, rounds: int) -> dict[str, dict]:
    """{label: {"status", "median_ms", "p10_ms", "p90_ms", "n", "timing"} or {"status": "unsupported", "reason"}}.

    Labels are timed round-robin, each round starting at another label, so drift (clocks, heat) is shared."""
    out, runs = {}, {}
    for label, fn in fns.items():
        try:
            runs[label], how = timer.runner(fn)
            out[label] = {"status": "ok", "timing": how, "samples": []}
        except Exception as exc:
            out[label] = {"status": "unsupported", "reason": f"{type(exc).__name__}: {first_line(exc)}"}
    labels = list(runs)
    for r in range(rounds):
        k = r % len(labels) if labels else 0
        for label in labels[k:] + labels[:k]:
            rec = out[label]
            if rec["status"] != "ok":
                continue
            try:
                rec["samples"].append(timer.sample(runs[label]))
            except Exception as exc:
                out[label] = {"status": "unsupported", "reason": f"{type(exc).__name__}: {first_line(exc)}"}
    for rec in out.values():
        samples = sorted(rec.pop("samples", []))
        if rec["status"] == "ok" and samples:
            n = len(samples)
            rec.update(median_ms=statistics.median(samples), p10_ms=samples[int(0.1 * (n - 1))],
                       p90_ms=samples[int(0.9 * (n - 1) + 0.5)], samples=n)
    return out


# ------------------------------------------------------------------------------------------------ sections


def gemm_rows(width: str, dims: dict, m: int, device: str, timer: Timer, rounds: int, caps: dict) -> list[dict]:
    """One row per (GEMM shape, format, with or without the eager quantize/dequantize around the kernel)."""
    import torch

    rows = []
    for name, _, k, n in gemm_shapes(dims):
        torch.manual_seed(0)
        W = QF.random_weight(n, k, device)
        x = QF.random_activation(m, k, device)
        refs = {False: QF.reference(x, W), True: QF.reference(x, QF.prune_24(W))}
        fns, meta = {}, {}
        for fmt in QF.GEMM_FORMATS:
            base = {"width": width, "gemm": name, "m": m, "k": k, "n": n, "format": fmt.label}
            why = QF.skip_reason(fmt, device, caps)
            if why:
                meta[fmt.label] = base | {"status": "skipped", "reason": why}
                continue
            try:
                prep = QF.prepare(fmt, QF.prune_24(W) if fmt.sparse else W, x)
                rel = QF.rel_err(prep.result(prep.gemm()), refs[fmt.sparse])
            except Exception as exc:
                meta[fmt.label] = base | {"status": "unsupported", "reason": f"{type(exc).__name__}: {first_line(exc)}"}
                continue
            note = QF.error_note(prep.note, rel)
            meta[fmt.label] = base | {"out_dtype": prep.out_dtype, "rel_err": rel, "note": note}
            fns[fmt.label] = prep.gemm
            if fmt.quantized:  # the same kernel with the activation quantize and dequantize around it, eager
                label = f"{fmt.label} {prep.epilogue}"
                meta[label] = base | {"format": label, "out_dtype": "bfloat16", "rel_err": rel, "note": note}
                fns[label] = functools.partial(prep.linear, x)
        timed = measure(fns, timer, rounds)
        for label, rec in meta.items():
            row = rec | timed.get(label, {})
            if row.get("status") == "ok":
                row["tflops"] = 2.0 * m * k * n / (row["median_ms"] * 1e-3) / 1e12
            rows.append(row)
        dense = next((r["median_ms"] for r in rows[-len(meta):] if r["format"] == "bf16" and "median_ms" in r), None)
        for row in rows[-len(meta):]:
            row["speedup_vs_bf16"] = dense / row["median_ms"] if dense and "median_ms" in row else None
        del fns, timed, refs  # the CUDA graphs and their memory pools go with them
        QF.free_memory(device)
    return rows


def block_rows(width: str, dims: dict, m: int, device: str, timer: Timer, rounds: int, caps: dict,
               gemms: list[dict]) -> list[dict]:
    """One row per format: the whole block, its six linears, bf16 attention, and the sum of the kernels alone."""
    import torch

    torch.manual_seed(0)
    h, f = dims["hidden"], dims["ffn"]
    weights = {name: QF.random_weight(n, k, device) for name, n, k in
               (("q", h, h), ("k", h, h), ("v", h, h), ("out", h, h), ("up", f, h), ("down", h, f))}
    x = QF.random_activation(m, h, device)
    hidden = QF.random_activation(m, f, device)
    fns, meta = {"attention": QF.attention_fn(x, dims)}, {}
    for fmt in QF.BLOCK_FORMATS:
        base = {"width": width, "format": fmt.label}
        why = QF.skip_reason(fmt, device, caps)
        if why:
            meta[fmt.label] = base | {"status": "skipped", "reason": why}
            continue
        try:
            block, linears, note, kernel = QF.block_fns(fmt, weights, x, hidden, dims)
            block()
        except Exception as exc:
            meta[fmt.label] = base | {"status": "unsupported", "reason": f"{type(exc).__name__}: {first_line(exc)}"}
            continue
        meta[fmt.label] = base | {"note": note, "kernel": kernel}
        fns[f"{fmt.label} block"], fns[f"{fmt.label} linears"] = block, linears
    timed = measure(fns, timer, rounds)
    attention = timed["attention"].get("median_ms")
    rows = []
    for label, rec in meta.items():
        row = dict(rec)
        if row.get("status") != "skipped" and "reason" not in row:
            b, lin = timed[f"{label} block"], timed[f"{label} linears"]
            row.update(status=b["status"], timing=b.get("timing"), block_ms=b.get("median_ms"),
                       linears_ms=lin.get("median_ms"), attention_ms=attention)
            if b["status"] != "ok":
                row["reason"] = b.get("reason")
        row["gemm_kernels_ms"] = kernels_ms(gemms, width, row.get("kernel"), dims)
        rows.append(row)
    dense = next((r for r in rows if r["format"] == "bf16" and r.get("block_ms")), None)
    for row in rows:
        for key, out in (("block_ms", "block_speedup"), ("linears_ms", "linears_speedup"),
                         ("gemm_kernels_ms", "kernels_speedup")):
            ok = dense and dense.get(key) and row.get(key)
            row[out] = dense[key] / row[key] if ok else None
    del fns, timed
    QF.free_memory(device)
    return rows


def kernels_ms(gemms: list[dict], width: str, label: str | None, dims: dict) -> float | None:
    """The block's six GEMM kernels from the GEMM table (4 x q/k/v/out + up + down) for `label`, or None."""
    if label is None:
        return None
    times = {r["gemm"]: r.get("median_ms") for r in gemms if r["width"] == width and r["format"] == label}
    uses = {name: count for name, count, _, _ in gemm_shapes(dims)}
    if set(times) != set(uses) or None in times.values():
        return None
    return sum(uses[name] * times[name] for name in uses)


def environment(device: str) -> dict:
    import torch

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": device, "gpu": None}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        env.update(gpu=torch.cuda.get_device_name(0), compute_capability=f"{major}.{minor}")
        env["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    return env


def run_quant(dry: bool, rounds: int, reps: int, warmup: int, batch: int = 1, budget_s: float = 180.0,
              log: Callable[[str], None] = print) -> dict:
    """The quant section: environment, settings, GEMM rows, block rows (see the module docstring)."""
    t0 = time.perf_counter()
    device = "cpu" if dry else "cuda"
    caps = QF.capabilities(device)
    timer = Timer(device, reps, warmup)
    widths = DRY_WIDTHS if dry else WIDTHS
    result = {"environment": environment(device), "capabilities": caps, "dry_run": dry,
              "settings": {"rounds": rounds, "reps": reps, "warmup": warmup, "batch": batch, "m_multiple": M_MULTIPLE,
                           "budget_s": budget_s},
              "widths": {}, "gemms": [], "blocks": [], "notes": QF.NOTES}
    for width, dims in widths.items():
        tokens, m = padded_tokens(dims, batch)
        result["widths"][width] = dims | {"tokens": tokens, "m": m}
        if time.perf_counter() - t0 > budget_s:
            reason = f"time budget: {time.perf_counter() - t0:.0f} s used of --quant-budget-s {budget_s:.0f}"
            result["gemms"].append({"width": width, "status": "skipped", "reason": reason})
            result["blocks"].append({"width": width, "status": "skipped", "reason": reason})
            continue
        gemms = gemm_rows(width, dims, m, device, timer, rounds, caps)
        result["gemms"] += gemms
        log(f"quant: {width} GEMMs done ({time.perf_counter() - t0:.0f} s)")
        result["blocks"] += block_rows(width, dims, m, device, timer, rounds, caps, gemms)
        log(f"quant: {width} block done ({time.perf_counter() - t0:.0f} s)")
    result["seconds"] = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------ tables


def _note(row: dict) -> str:
    if row.get("status") not in (None, "ok"):
        return f"{row['status']}: {row.get('reason', '')}"
    parts = [p for p in (row.get("note"), row.get("timing") if "eager" in (row.get("timing") or "") else None) if p]
    return "; ".join(parts)


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v else ""


def gemm_table(rows: list[dict]) -> str:
    body = [[r["width"], r.get("gemm", ""), f"{r['m']} x {r['k']} x {r['n']}" if "m" in r else "", r.get("format", ""),
             r.get("median_ms"), r.get("tflops"), _x(r.get("speedup_vs_bf16")),
             f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else "", _note(r)] for r in rows]
    return format_table(GEMM_HEADERS, body)


def block_table(rows: list[dict]) -> str:
    body = [[r["width"], r.get("format", ""), r.get("block_ms"), r.get("linears_ms"), r.get("attention_ms"),
             _x(r.get("block_speedup")), _x(r.get("linears_speedup")), r.get("gemm_kernels_ms"),
             _x(r.get("kernels_speedup")), _note(r)] for r in rows]
    return format_table(BLOCK_HEADERS, body)


def markdown(result: dict) -> str:
    env = result["environment"]
    head = (f"GPU {env['gpu'] or 'none (' + env['device'] + ')'}, torch {env['torch']}, CUDA {env['cuda']}, "
            f"{env['date']}; M = tokens of one 1024 px image rounded up to {M_MULTIPLE} "
            + ", ".join(f"{w}: {d['tokens']} -> {d['m']}" for w, d in result["widths"].items()))
    notes = "\n".join(f"- {n}" for n in result["notes"])
    return (f"## GEMMs by format\n\n{head}\n\n{gemm_table(result['gemms'])}\n\n"
            f"## One transformer block by format\n\n{block_table(result['blocks'])}\n\n{notes}\n")
