"""`obsdiff-export` with every command: the export group of `obsdiff.export.cli` plus the engine commands
(build-engine, bench). This module is the `obsdiff-export` entry point; the engine commands live here because
`obsdiff.engines` may depend on `obsdiff.export`, never the reverse."""

from __future__ import annotations

import json
from pathlib import Path

import click

from obsdiff.export.cli import FORCE
from obsdiff.export.cli import cli as export_cli

# a group of its own with the export group's options, callback and commands, so that importing this module
# leaves `obsdiff.export.cli.cli` as it is
cli = type(export_cli)(name="obsdiff-export", commands=dict(export_cli.commands), callback=export_cli.callback,
                       params=export_cli.params, help=export_cli.help, context_settings=export_cli.context_settings)


@cli.command(name="build-engine")
@click.argument("onnx_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="engine file (.plan)")
@click.option("--sparse-weights/--no-sparse-weights", default=None, help="[on for N:M-pruned models]")
@click.option("--profile-from-sidecar/--no-profile-from-sidecar", default=True, show_default=True,
              help="shape profile from the export sidecar <onnx stem>.json (explicit shapes override it)")
@click.option("--min-shapes", default=None, help="NAME:DxD...,NAME:... [= --opt-shapes]")
@click.option("--opt-shapes", default=None, help="NAME:DxD...,NAME:... (the shapes the engine is tuned for)")
@click.option("--max-shapes", default=None, help="NAME:DxD...,NAME:... [= --opt-shapes]")
@click.option("--workspace-gib", type=float, default=8.0, show_default=True)
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="read and update this timing cache file")
@click.option("--strict-nans", is_flag=True, help="keep NaN/Inf semantics (no x*0 -> 0 rewrites)")
@click.option("--strongly-typed/--weakly-typed", default=None,
              help="[strongly typed for a Q/DQ ONNX and on TensorRT 11; weakly typed with precision flags on 10.x]")
@click.option("--also-dense", is_flag=True, help="also build the dense twin <stem>.dense.plan for comparison")
@click.option("--json", "as_json", is_flag=True, help="print the engine sidecar as JSON on stdout")
@FORCE
def build_engine(onnx_path: Path, out: Path, force: bool, as_json: bool, **kwargs) -> None:
    """Build a TensorRT engine (sparse weights enabled for N:M models) with <out>.json and <out>.log.

    A Q/DQ ONNX (QuantizeLinear/DequantizeLinear nodes, found in the graph) builds strongly typed; the sidecar
    records the equivalent trtexec command line and the build log's sparse-layer counts."""
    from .sidecar import parse_shapes
    from .trt import EngineConfig, build_engine

    config = EngineConfig(sparse_weights=kwargs["sparse_weights"], profile_from_sidecar=kwargs["profile_from_sidecar"],
                          min_shapes=parse_shapes(kwargs["min_shapes"], "--min-shapes"),
                          opt_shapes=parse_shapes(kwargs["opt_shapes"], "--opt-shapes"),
                          max_shapes=parse_shapes(kwargs["max_shapes"], "--max-shapes"),
                          workspace_gib=kwargs["workspace_gib"], opt_level=kwargs["opt_level"],
                          timing_cache=kwargs["timing_cache"], strict_nans=kwargs["strict_nans"],
                          also_dense=kwargs["also_dense"], strongly_typed=kwargs["strongly_typed"])
    record = build_engine(onnx_path, out, config, force=force, progress=True)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    for rec in [record] + ([record["dense_twin"]] if record.get("dense_twin") else []):
        sp = rec["sparse"]
        sparse = (f"sparse: {sp['picked_count']} of {sp['eligible_count']} eligible layers picked a sparse kernel"
                  if sp["requested"] else "sparse weights off")
        click.echo(f"{rec['file']}: TensorRT {rec['tensorrt']}, {rec['gpu']['name']}, {rec['typing']}ly typed, "
                   f"flags {', '.join(rec['builder_flags']) or 'none'}, {rec['build_seconds']:.1f} s; {sparse}")
    quant = record.get("quantization") or {}
    if quant.get("qdq"):
        click.echo(f"Q/DQ graph ({', '.join(quant['types']) or 'types not stated'}; {quant['quantize_linear']} "
                   f"QuantizeLinear, {quant['dequantize_linear']} DequantizeLinear): strongly typed, no precision "
                   "flags")
    click.echo(f"profile from {record['profile_source']}")
    click.echo(f"the same build with trtexec: {record['trtexec']}")
    click.echo(f"wrote {out} (sidecar {out.name}.json, build log {out.name}.log)")


@cli.command()
@click.argument("model_or_run")
@click.option("--backend", default="torch,onnxruntime", show_default=True,
              help="comma list of torch, torch-compile, torch-sparse24, onnxruntime, tensorrt")
@click.option("--scope", type=click.Choice(["denoiser", "pipeline"]), default="denoiser", show_default=True)
@click.option("--steps", type=int, default=25, show_default=True, help="denoising steps (pipeline scope)")
@click.option("--batch", type=int, default=1, show_default=True,
              help="images (pipeline scope) or denoiser batch rows (denoiser scope)")
@click.option("--height", type=int, default=None, help="image pixels [model default]")
@click.option("--width", type=int, default=None, help="image pixels [model default]")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--iters", type=int, default=20, show_default=True)
@click.option("--reference", default=None, help="the dense model to compare with (ratios divide by it)")
@click.option("--onnx", "onnx_dir", type=click.Path(path_type=Path), default=None,
              help="export dir (or .onnx) of MODEL_OR_RUN for onnxruntime/tensorrt [export on the fly]")
@click.option("--reference-onnx", type=click.Path(path_type=Path), default=None, help="the same for --reference")
@click.option("--engine", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT engine of MODEL_OR_RUN [built on the fly]")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--threads", type=int, default=None,
              help="CPU threads for PyTorch and onnxruntime [PyTorch's default]; 1 is steadiest on a shared machine")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="bar chart (PNG)")
@FORCE
def bench(model_or_run: str, json_out: Path | None, plot: Path | None, force: bool, **kwargs) -> None:
    """Measure latency on every available backend, dense vs pruned."""
    from obsdiff.runs.loading import check_sizes

    from .bench import run_bench
    from .bench_config import BenchConfig
    from .report import check_outputs, format_bench, save_bench

    check_outputs([json_out, plot], force)
    check_sizes([model_or_run, kwargs["reference"]], kwargs["height"], kwargs["width"])
    config = BenchConfig(backends=kwargs["backend"], scope=kwargs["scope"], steps=kwargs["steps"],
                         batch=kwargs["batch"], height=kwargs["height"], width=kwargs["width"],
                         warmup=kwargs["warmup"], iters=kwargs["iters"], device=kwargs["device"],
                         dtype=kwargs["dtype"], threads=kwargs["threads"])
    name = Path(model_or_run).name if Path(model_or_run).exists() else model_or_run
    ref = kwargs["reference"]
    ref_name = (Path(ref).name if Path(ref).exists() else ref) if ref else None
    if ref_name == name:
        name, ref_name = "model", "dense"
    models = {name: model_or_run}
    onnx = {name: kwargs["onnx_dir"]} if kwargs["onnx_dir"] else {}
    if ref:
        models = {ref_name: ref, **models}
        if kwargs["reference_onnx"]:
            onnx[ref_name] = kwargs["reference_onnx"]
    engines = {name: kwargs["engine"]} if kwargs["engine"] else {}
    result = run_bench(models, config, reference=ref_name or name, onnx=onnx, engines=engines)
    click.echo(format_bench(result))
    for path in save_bench(result, json_out, plot, force=force):
        click.echo(f"wrote {path}")


def main() -> None:
    cli(prog_name="obsdiff-export")


if __name__ == "__main__":
    main()
