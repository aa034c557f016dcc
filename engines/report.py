"""Benchmark results as text tables (markdown, like TensorRT's demo `Module | Latency`) and a bar chart."""

from __future__ import annotations

from pathlib import Path

from obsdiff.errors import MissingDependencyError
from obsdiff.runs.artifacts import check_writable, staged_file, write_json
from obsdiff.tables import format_table

STAGE_LABELS = {"text_encoders": "text encoders", "denoiser": "denoiser", "vae_decode": "VAE decoder",
                "other": "other (scheduler, post-processing)", "total": "pipeline"}


def _ms(value) -> str:
    return "" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _x(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def format_bench(result: dict) -> str:
    """Markdown tables: every (model, backend) row with ratios; per-stage tables in the pipeline scope."""
    ref = result["reference"]
    base = result.get("baseline") or {}
    inp = result["inputs"]
    head = (f"{result['scope']} scope on {result['device']}: batch {inp['batch']}, {inp['height']}x{inp['width']} "
            f"px (latent {inp['latent_height']}x{inp['latent_width']}), {inp['text_len']} text tokens"
            + (f", {inp['steps']} steps" if result["scope"] == "pipeline" else "")
            + f"; ratios to {base.get('model')} on {base.get('backend')} (x ref), median of "
              f"{result['config']['iters']} interleaved iterations")
    models = result["models"]
    headers = ["model", "backend", "median ms", "p90 ms", "IQR ms", "x ref", f"x {ref} same backend", "speedup",
               "FLOPs x ref", "max |diff| vs torch", "note"]
    rows = []
    for r in result["rows"]:
        flops = models.get(r["model"], {}).get("flop_ratio")
        if r["status"] != "ok":
            rows.append([r["model"], r["backend"], *[""] * 6, _x(flops), "", f"{r['status']}: {r['reason']}"])
            continue
        s = r["latency_ms"]
        same = r.get("ratio_same_backend")
        note = ", ".join(f"{k} {v}" for k, v in r["details"].items() if k in ("converted", "providers", "mode"))
        rows.append([r["model"], r["backend"], _ms(s["median"]), _ms(s["p90"]), _ms(s["iqr"]), _x(r["ratio"]["median"]),
                     _x(same["median"]) if same else "", _x(r["speedup"]), _x(flops),
                     f"{r['max_abs_diff_vs_torch']:.2g}" if r.get("max_abs_diff_vs_torch") is not None else "", note])
    parts = [head, format_table(headers, rows)]
    if result["scope"] == "pipeline":
        for r in result["rows"]:
            if r["status"] != "ok" or "stages" not in r:
                continue
            body = []
            for name in ("text_encoders", "denoiser", "vae_decode", "other", "total"):
                st = r["stages"][name]
                label = STAGE_LABELS[name] + (f" x {r['denoiser_calls']}" if name == "denoiser" else "")
                body.append([label, f"{_ms(st['latency_ms']['median'])} ms", _x(st["ratio"])])
            body.append(["throughput", f"{r['images_per_s']:.3g} images/s", ""])
            parts.append(f"{r['model']} on {r['backend']}\n\n" + format_table(["Module", "Latency", "x ref"], body))
    return "\n\n".join(parts)


def plot_bench(result: dict, path: str | Path) -> Path:
    """Bar chart of median latency (p90 as error bar) per backend and model, labelled with the ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib is needed for --plot and is not installed; "
                                     "pip install matplotlib") from None
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    backends = list(dict.fromkeys(r["backend"] for r in result["rows"]))
    models = list(result["models"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(backends) * max(1, len(models)) ** 0.5), 3.8))
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        xs, ys, errs, labels = [], [], [], []
        for i, backend in enumerate(backends):
            r = next((r for r in ok if r["model"] == model and r["backend"] == backend), None)
            if r is None:
                continue
            s = r["latency_ms"]
            xs.append(i + (j - (len(models) - 1) / 2) * width)
            ys.append(s["median"])
            errs.append(max(0.0, s["p90"] - s["median"]))
            labels.append(f"{r['ratio']['median']:.2f}x")
        bars = ax.bar(xs, ys, width, yerr=[[0] * len(errs), errs], capsize=3, label=model)
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    skipped = [f"{r['model']}/{r['backend']}" for r in result["rows"] if r["status"] != "ok"]
    ax.set_xticks(range(len(backends)), backends)
    what = "pipeline total" if result["scope"] == "pipeline" else "denoiser forward"
    ax.set_ylabel(f"{what}, median ms")
    ax.set_title(f"{what} latency on {result['device']}", fontsize=9)
    ax.margins(y=0.15)
    ax.legend(fontsize=7)
    fig.tight_layout()
    if skipped:
        fig.subplots_adjust(bottom=0.2)
        fig.text(0.01, 0.01, "not run (see the table): " + ", ".join(skipped), fontsize=6, va="bottom")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_outputs(paths, force: bool) -> None:
    """Refuse existing output files before any measurement (unless `force`)."""
    for path in paths:
        if path is not None:
            check_writable(path, force)


def save_bench(result: dict, json_path: str | Path | None = None, plot_path: str | Path | None = None,
               force: bool = False) -> list[Path]:
    """Write the result JSON and/or the bar chart, each atomically; returns the paths written."""
    written = []
    if json_path is not None:
        with staged_file(json_path, force=force) as tmp:
            write_json(tmp, result)
        written.append(Path(json_path))
    if plot_path is not None:
        with staged_file(plot_path, force=force) as tmp:
            plot_bench(result, tmp)
        written.append(Path(plot_path))
    return written
