"""`obsdiff-export`: onnx, build-engine, bench, triton. Thin commands over `obsdiff.export` / `obsdiff.engines`."""

from __future__ import annotations

from pathlib import Path

import click

from obsdiff.cli_utils import Group, not_implemented, setup_logging

FORCE = click.option("--force", is_flag=True, help="replace an existing output")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option("-v", "--verbose", count=True, help="more log output (-vv for debug)")
@click.version_option(package_name="obsdiff")
def cli(verbose: int) -> None:
    """Export pruned denoisers to ONNX and TensorRT, and measure their latency."""
    setup_logging(verbose)


@cli.command()
@click.argument("model_or_run")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--component", type=click.Choice(["transformer", "vae-decoder", "text-encoders", "all"]),
              default="transformer", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--batch", default="1:2:8", show_default=True, help="dynamic batch MIN:OPT:MAX")
@click.option("--height", default=None, help="latent-pixel height MIN:OPT:MAX [model default]")
@click.option("--width", default=None, help="latent-pixel width MIN:OPT:MAX [model default]")
@click.option("--text-len", default=None, help="text tokens MIN:OPT:MAX [model default]")
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo", show_default=True)
@click.option("--linear-as-gemm", is_flag=True, help="export transformer linears as Gemm with named weights")
@FORCE
def onnx(**kwargs) -> None:
    """Export a model or pruned run to ONNX, with parity and N:M checks."""
    not_implemented("obsdiff-export onnx", "the ONNX export issue")


@cli.command(name="build-engine")
@click.argument("onnx_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="engine file (.plan)")
@click.option("--sparse-weights/--no-sparse-weights", default=None, help="[on for N:M-pruned models]")
@click.option("--profile-from-sidecar", is_flag=True, default=True, help="shape profile from the export sidecar")
@click.option("--min-shapes", default=None)
@click.option("--opt-shapes", default=None)
@click.option("--max-shapes", default=None)
@click.option("--workspace-gib", type=float, default=8.0, show_default=True)
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--strict-nans", is_flag=True)
@click.option("--also-dense", is_flag=True, help="also build the dense twin for comparison")
@FORCE
def build_engine(**kwargs) -> None:
    """Build a TensorRT engine (sparse weights enabled for N:M models)."""
    not_implemented("obsdiff-export build-engine", "the TensorRT engine issue")


@cli.command()
@click.argument("model_or_run")
@click.option("--backend", default="torch,onnxruntime", show_default=True,
              help="comma list of torch, torch-compile, torch-sparse24, onnxruntime, tensorrt")
@click.option("--scope", type=click.Choice(["denoiser", "pipeline"]), default="denoiser", show_default=True)
@click.option("--steps", type=int, default=25, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--iters", type=int, default=20, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None)
def bench(**kwargs) -> None:
    """Measure latency on every available backend, dense vs pruned."""
    not_implemented("obsdiff-export bench", "the TensorRT engines and benchmarks issue")


@cli.command()
@click.argument("export_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="model repository")
@FORCE
def triton(**kwargs) -> None:
    """Write a Triton Inference Server model repository for exported components."""
    not_implemented("obsdiff-export triton", "the ONNX export issue")


def main() -> None:
    cli(prog_name="obsdiff-export")


if __name__ == "__main__":
    main()
