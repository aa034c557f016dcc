"""`obsdiff-export` export commands (onnx, triton): thin commands over `obsdiff.export`.

`obsdiff.export` never imports `obsdiff.engines`; the engine commands (build-engine, bench) join this group in
`obsdiff.engines.cli`, whose `main` is the `obsdiff-export` entry point.
"""

from __future__ import annotations

from pathlib import Path

import click

from obsdiff.cli_utils import Group, verbosity_params
from obsdiff.devices import device_option

FORCE = click.option("--force", is_flag=True, help="replace an existing output")


class OpsetType(click.ParamType):
    """An ONNX opset number or `auto` (the lowest the precision needs)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or auto", param, ctx)


@click.group(cls=Group, params=verbosity_params(),
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="obsdiff")
def cli() -> None:
    """Export pruned denoisers to ONNX and TensorRT, and measure their latency."""
    # -v/-q (here or after the subcommand) set up logging in their callbacks (cli_utils.verbosity_params)


@cli.command()
@click.argument("model_or_run")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--component", default="transformer", show_default=True,
              help="transformer (the denoiser, also for UNets), vae-decoder, text-encoders or all")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="exported precision; auto: the one TensorRT's diffusion demo builds the model in (fp16 for "
                   "SD3-Medium and SDXL, bf16 for SD3.5 and Flux). Timesteps and position ids stay fp32")
@click.option("--component-dtype", multiple=True, metavar="COMPONENT=DTYPE",
              help="force one component's precision, e.g. vae-decoder=fp16 (kept fp32 by default when fp16 is asked)")
@click.option("--opset", type=OpsetType(), default="auto", show_default=True,
              help="ONNX opset; auto: the lowest the precision needs (18, 22 for bf16) and its quantized layers need "
                   "(19 for fp8, 21 for int4 or per-group scales)")
@click.option("--batch", default=None,
              help="denoiser batch rows MIN:OPT:MAX (VAE and text encoders: images) [TensorRT demo: 1:1:4 images, "
                   "x2 rows with classifier-free guidance]")
@click.option("--height", default=None,
              help="latent-pixel height MIN:OPT:MAX [TensorRT demo: 32:128:170, within what the model takes]")
@click.option("--width", default=None, help="latent-pixel width MIN:OPT:MAX [as --height]")
@click.option("--text-len", default=None, help="text tokens MIN:OPT:MAX [the pipeline's length, fixed]")
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo", show_default=True)
@click.option("--linear-as-gemm", is_flag=True, help="export transformer linears as Gemm with named weights")
@click.option("--external-data", is_flag=True, help="weights in <component>.onnx.data [only above 2 GB]")
@click.option("--no-output-quant", is_flag=True,
              help="quantized models: no QuantizeLinear/DequantizeLinear on layer outputs (TensorRT needs them to "
                   "pick sparse INT8 tactics)")
@click.option("--device", default="auto", show_default=True, callback=device_option,
              help="where the model runs while exporting: auto (CUDA when available, else the CPU), cpu, cuda:N")
@click.option("--json", "as_json", is_flag=True, help="print the export record as JSON on stdout")
@FORCE
def onnx(model_or_run: str, out: Path, force: bool, as_json: bool, **kwargs) -> None:
    """Export a model or pruned run to ONNX, with parity and N:M checks."""
    from obsdiff.tables import format_table

    from .config import ExportConfig
    from .onnx_export import export_onnx
    from .qdq import describe

    config = ExportConfig(component=kwargs["component"], dtype=kwargs["dtype"], opset=kwargs["opset"],
                          batch=kwargs["batch"], height=kwargs["height"], width=kwargs["width"],
                          text_len=kwargs["text_len"], exporter=kwargs["exporter"],
                          linear_as_gemm=kwargs["linear_as_gemm"], external_data=kwargs["external_data"],
                          component_dtypes=tuple(kwargs["component_dtype"]), device=kwargs["device"],
                          output_quant=not kwargs["no_output_quant"])
    report = export_onnx(model_or_run, out, config, force=force)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2, default=str))
        return
    rows = []
    for name, c in report["components"].items():
        failed_or_run = {k: v for k, v in c["checks"].items() if v != "skipped"}
        rows.append([name, c["file"], c["bytes"] / 2**20, c["dtype"], c["export_seconds"],
                     ", ".join(f"{k} {v}" for k, v in failed_or_run.items())])
    click.echo(format_table(["component", "file", "MiB", "dtype", "export s", "checks"], rows))
    for name, c in report["components"].items():
        if c.get("quantization"):
            click.echo(f"{name}: {describe(c['quantization'])}")
    for line in choice_lines(report["choices"]):
        click.echo(line)
    click.echo(f"wrote {out} (sidecars: <component>.json; serve with obsdiff-export triton {out} --out REPO)")


def choice_lines(choices: dict) -> list[str]:
    """What the export chose for precision, opset and profile, and why (`auto` and default values only)."""
    lines = []
    for key in ("dtype", "opset"):
        c = choices[key]
        if c["requested"] == "auto":
            lines.append(f"{key} {c['value']}: {c['why']}")
    prof = choices["profile"]
    defaulted = [k for k in prof["ranges"] if k not in prof["given"]]
    if defaulted:
        ranges = ", ".join(f"{k} {':'.join(map(str, prof['ranges'][k]))}" for k in defaulted)
        lines.append(f"profile {ranges}: {prof['source']}")
    lines += [f"  {k}: {note}" for k, note in prof["notes"].items()]
    return lines


@cli.command()
@click.argument("export_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="model repository")
@click.option("--engine", "engines", multiple=True, metavar="COMPONENT=PATH",
              help="serve COMPONENT with this TensorRT engine (from anywhere; its .json sidecar next to it) "
                   "[<component>.plan in EXPORT_DIR when present]")
@FORCE
def triton(export_dir: Path, out: Path, engines: tuple[str, ...], force: bool) -> None:
    """Write a Triton Inference Server model repository for exported components."""
    from .triton import parse_engine_options, write_triton_repository

    models = write_triton_repository(export_dir, out, force=force, engines=parse_engine_options(engines))
    for m in models:
        click.echo(f"{m['name']}: {m['platform']}, max_batch_size {m['max_batch_size']}, config checked by "
                   f"{m['validated_by']}")
    click.echo(f"wrote {out} (tritonserver --model-repository {out})")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="diffusers pipeline folder")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="convert the denoiser and every component stored in another precision [as stored]")
@click.option("--link", is_flag=True, help="hard-link (or symlink) unchanged components instead of copying them")
@FORCE
def diffusers(run: Path, out: Path, dtype: str | None, link: bool, force: bool) -> None:
    """Write a run as a diffusers pipeline folder that loads without obsdiff (structured: trust_remote_code=True)."""
    from .diffusers_export import export_diffusers

    record = export_diffusers(run, out, dtype=dtype, link=link, force=force)
    click.echo(", ".join(f"{name} {how}" for name, how in record["components"].items()))
    stored = ", ".join(sorted(set(record["stored"].values())))
    click.echo(f"weights stored in {stored}; every component loads in {record['plain_dtype']} without a dtype "
               "argument (torch_dtype=torch.float16 or bfloat16 loads all in that one)")
    click.echo(f"wrote {out} ({record['load']})")


def main() -> None:
    cli(prog_name="obsdiff-export")


if __name__ == "__main__":
    main()
