"""`obsdiff`: prune, eval, generate, info. Thin commands over the public Python API."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import click

from obsdiff.cli_utils import Group, verbosity_params
from obsdiff.devices import DTYPE_CHOICES, device_option
from obsdiff.tables import format_table

DEVICE = click.option("--device", default="auto", show_default=True, callback=device_option,
                      help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N")
DTYPE = click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
                     help="model dtype; auto: bf16 on CUDA, fp32 on the CPU (Hessians are fp32 either way)")
FORCE = click.option("--force", is_flag=True, help="replace an existing output")
MODEL_HELP = ("a diffusers pipeline folder, a hub id ORG/NAME[@REV], builtin:digits (the embedded model) or a run "
              "written by obsdiff prune")


class LazyChoice(click.Choice):
    """A click.Choice over a registry (`module.attr`) imported on first use: the registries import torch, which
    `obsdiff --help` and the other commands' parsing should not wait for."""

    def __init__(self, module: str, attr: str):
        self.where = module, attr
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from importlib import import_module

        return tuple(getattr(import_module(self.where[0]), self.where[1]))

    @choices.setter
    def choices(self, _value) -> None:  # click.Choice.__init__ assigns; the registry is the only source
        pass
JSON = click.option("--json", "as_json", is_flag=True, help="print the result record as JSON on stdout")


@click.group(cls=Group, params=verbosity_params(),
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="obsdiff")
def cli() -> None:
    """One-shot OBS-Diff pruning of text-to-image diffusion denoisers.

    --model takes a diffusers pipeline folder, a hub id ORG/NAME[@REV], builtin:digits (the embedded model) or a
    run directory written by obsdiff prune.
    """
    # -v/-q (here or after the subcommand) set up logging in their callbacks (cli_utils.verbosity_params)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def info(as_json: bool) -> None:
    """Library versions, devices and whether sparse tensor cores are usable."""
    from obsdiff.info import environment_info

    env = environment_info()
    if as_json:
        click.echo(json.dumps(env, indent=2))
        return
    rows = [[k, v or "not installed"] for k, v in env["libraries"].items()]
    click.echo(format_table(["library", "version"], rows))
    click.echo()
    click.echo(format_table(["device", "detail"], [[d["name"], d["detail"]] for d in env["devices"]]))
    sparse = env["sparse_tensor_cores"]
    click.echo(f"\nsparse tensor cores (2:4): {'usable' if sparse['usable'] else 'not usable'} ({sparse['reason']})")
    if env["onnxruntime_providers"]:
        click.echo(f"onnxruntime providers: {', '.join(env['onnxruntime_providers'])}")
    click.echo(f"model families: {', '.join(f'{k} ({v})' for k, v in env['families'].items())}")
    click.echo(f"builtin models: {', '.join(env['builtin_models'])}")


@cli.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--prompt", required=True)
@click.option("--steps", type=click.IntRange(1), default=None, help="denoising steps [model default]")
@click.option("--guidance", type=float, default=None, help="classifier-free guidance scale [model default]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--height", type=click.IntRange(1), default=None)
@click.option("--width", type=click.IntRange(1), default=None)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="image file (.png)")
@FORCE
@DEVICE
@DTYPE
def generate(model, prompt, steps, guidance, seed, height, width, out, force, device, dtype) -> None:
    """Generate one image."""
    from PIL import Image

    from obsdiff.eval.evaluate import generate as run
    from obsdiff.runs.artifacts import check_writable, staged_file
    from obsdiff.runs.loading import check_sizes, load_pipeline

    check_writable(out, force)
    check_sizes([model], height, width)
    loaded = load_pipeline(model, device=device, dtype=dtype)
    result = run(loaded, [prompt], [seed], steps, guidance, batch_size=1, progress=False,
                 height=height, width=width)
    image = (result.images[0] * 255).round().clip(0, 255).astype("uint8")
    with staged_file(out, force=force) as tmp:
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(tmp, format="PNG")
    click.echo(f"wrote {out} ({image.shape[1]}x{image.shape[0]}, {result.seconds:.2f} s)")


@cli.command(name="eval")
@click.argument("target", required=False)
@click.option("--model", help=f"{MODEL_HELP} (instead of TARGET)")
@click.option("--reference", help="the dense model to compare against (same seeds and prompts)")
@click.option("--num-images", type=click.IntRange(2), default=200, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=None, help="denoising steps [model default]")
@click.option("--guidance", type=float, default=None, help="guidance scale [model default]")
@click.option("--seed", type=int, default=0, show_default=True, help="image i uses seed SEED+i")
@click.option("--batch-size", type=click.IntRange(1), default=50, show_default=True)
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="text file, one prompt per line [held-out digit prompts / a generic list]")
@click.option("--clip-model", type=click.Path(path_type=Path),
              help="CLIP checkpoint for clip_score: a local folder or a hub id in the hub cache")
@click.option("--standard-metrics", is_flag=True,
              help="also torchmetrics' CLIPScore and, with --reference, FID (pip install 'obsdiff[metrics]')")
@click.option("--inception-weights", type=click.Path(dir_okay=False, path_type=Path),
              help="FID Inception weights (torch-fidelity's .pth) [the torch hub cache]")
@click.option("--height", type=click.IntRange(1), default=None, help="image pixels [model default]")
@click.option("--width", type=click.IntRange(1), default=None, help="image pixels [model default]")
@click.option("--sheet-prompts", type=click.IntRange(1), default=40, show_default=True,
              help="prompts shown on sheet.png (every image is written to images/)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="output directory (metrics.json, sheet.png, images/) [RUN/eval for a run directory]")
@JSON
@FORCE
@DEVICE
@DTYPE
def eval_cmd(target, model, reference, num_images, steps, guidance, seed, batch_size, prompts_file, clip_model,
             standard_metrics, inception_weights, height, width, sheet_prompts, out, as_json, force, device,
             dtype) -> None:
    """Measure image quality of a model, optionally against a reference model.

    Writes metrics.json, sheet.png (reference and pruned image side by side for each prompt) and every image
    (images/ref_XXXX.png, images/pruned_XXXX.png).
    """
    from obsdiff.calibration.prompts import read_prompts
    from obsdiff.errors import ConfigError
    from obsdiff.eval.evaluate import EvalConfig, evaluate, save_report
    from obsdiff.runs.artifacts import check_writable

    if (target is None) == (model is None):
        raise ConfigError("give the model either as an argument or with --model (exactly one)")
    prompts = tuple(read_prompts(prompts_file)) if prompts_file else None
    config = EvalConfig(num_images=num_images, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                        prompts=prompts, clip_model=str(clip_model) if clip_model else None, height=height,
                        width=width, standard_metrics=standard_metrics,
                        inception_weights=str(inception_weights) if inception_weights else None)
    target = target or model
    if out is None:
        from obsdiff.runs.io import is_run_dir

        if not is_run_dir(target):
            raise ConfigError("--out is required unless the model is a run directory (then RUN/eval)")
        out = Path(target) / "eval"
    check_writable(out, force)
    from obsdiff.runs.loading import check_sizes  # the configs only: no weights load here

    check_sizes([target, reference], height, width)
    report = evaluate(target, reference, config, device=device, dtype=dtype)
    save_report(report, out, force=force, sheet_cells=sheet_prompts)
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=2, default=str))
        return
    m = report["metrics"]
    keys = ["digit_accuracy", "digit_confidence", "fd_real", "psnr_vs_reference", "latent_rel_mse_vs_reference",
            "fd_reference", "clip_score", "torchmetrics_clip_score", "torchmetrics_fid_vs_reference",
            "seconds_per_image"]
    click.echo(format_table(["metric", "value"], [[k, m[k]] for k in keys if k in m]))
    click.echo(f"wrote {out}/metrics.json, {out}/sheet.png and {out}/images/")


@cli.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--method", type=LazyChoice("obsdiff.solver.methods", "METHODS"), default="obs-diff", show_default=True,
              help="OBS-Diff or a baseline (obsdiff.solver.methods)")
@click.option("--sparsity", type=float, default=None, help="fraction of weights to remove, in (0, 1)")
@click.option("--sparsity-type", default="unstructured", show_default=True,
              help="unstructured, 2:4, 4:8 (any N:M), structured (heads and FFN neurons, physically removed) or "
                   "none (with --quant)")
@click.option("--head-ratio", type=float, default=None, help="structured: fraction of heads per block [--sparsity]")
@click.option("--ffn-ratio", type=float, default=None, help="structured: fraction of FFN neurons [--sparsity]")
@click.option("--structure-cost", type=click.Choice(["exact", "diag"]), default="exact", show_default=True,
              help="structured: exact block OBS cost, or the reference diagonal approximation")
@click.option("--joint-scoring", type=click.Choice(["sum", "rrf"]), default="sum", show_default=True,
              help="structured MMDiT heads: sum both streams' costs, or reference reciprocal-rank fusion")
@click.option("--ffn-per-round", type=int, default=64, show_default=True,
              help="structured: FFN neurons removed per greedy round")
@click.option("--allocation", type=click.Choice(["uniform", "sensitivity"]), default="uniform", show_default=True,
              help="structured: same ratio in every block, or per-block counts from OBS cost curves "
                   "(same parameter budget)")
@click.option("--quant", type=LazyChoice("obsdiff.solver.quant", "SCHEMES"), default=None,
              help="also quantize: w8a8, fp8 (E4M3), w4a16 (groups of 128), w8a16; --sparsity-type none: only that")
@click.option("--quant-method", type=click.Choice(["obs", "rtn"]), default="obs", show_default=True,
              help="obs: mask and quantize each column in one OBS sweep; rtn: round to nearest after pruning")
@click.option("--quant-group-size", type=int, default=None, help="w4a16: inputs per weight scale [128]")
@click.option("--quant-clip", type=click.Choice(["search", "absmax"]), default="search", show_default=True,
              help="weight scales: the clipping with the least rounding error, or the plain absmax")
@click.option("--act-steps", type=click.Choice(["max", "mean", "percentile"]), default="max", show_default=True,
              help="how the per-denoising-step activation maxima become one static range")
@click.option("--act-percentile", type=float, default=99.0, show_default=True, help="for --act-steps percentile")
@click.option("--smoothquant", type=float, default=None, metavar="ALPHA",
              help="SmoothQuant migration strength in [0, 1] (e.g. 0.5): activation outliers move into the weights")
@click.option("--output-quant", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="INT8 output quantizers (for TensorRT's sparse INT8 tactics); auto: N:M + INT8 layers")
@click.option("--prompts", default="builtin", show_default=True, help="calibration prompts: FILE or builtin")
@click.option("--num-prompts", type=int, default=None, help="calibration prompts [100; 64 for builtin:digits]")
@click.option("--steps", type=int, default=None, help="calibration denoising steps [25; 20 for builtin:digits]")
@click.option("--guidance", type=float, default=None, help="guidance scale [7.0; 3.0 for builtin:digits]")
@click.option("--batch-size", type=int, default=None, help="prompts per pipeline call [4; 16 for builtin:digits]")
@click.option("--groups", type=int, default=None, help="sequential calibration groups [4; cached mode: one per block]")
@click.option("--calibration-mode", type=click.Choice(["rerun", "cached"]), default="rerun", show_default=True,
              help="rerun: every group re-runs the pipeline (the paper's method); cached: one run caches block "
                   "inputs and groups propagate them block by block (faster, dense trajectory; SD3/Flux)")
@click.option("--cache-device", default=None, help="cached mode: where block inputs are kept, e.g. cpu [model device]")
@click.option("--cache-spill", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="cached mode: keep block inputs in a memory-mapped file in OUT.partial when they do not fit")
@click.option("--hessian-device", default=None, help="where Hessians accumulate: cpu keeps them off the accelerator")
@click.option("--timestep-weighting", type=LazyChoice("obsdiff.solver.hessian", "WEIGHTINGS"), default="log_decrease",
              show_default=True, help="weights of the denoising steps in the Hessians (sparsegpt, wanda: uniform)")
@click.option("--blocks", default=None, help="block range START:END to prune (END exclusive) [all]")
@click.option("--percdamp", type=float, default=0.01, show_default=True, help="Hessian damping, x mean(diag H)")
@click.option("--block-size", type=int, default=128, show_default=True, help="OBS lazy-update column block")
@click.option("--no-compensate", is_flag=True, help="prune without OBS weight updates (ablation)")
@click.option("--skip-indivisible", is_flag=True, help="N:M: skip layers whose width is not a multiple of M")
@click.option("--max-tokens", type=int, default=None, help="subsample at most this many tokens per call")
@click.option("--height", type=int, default=None, help="calibration image pixels [model default]")
@click.option("--width", type=int, default=None, help="calibration image pixels [model default]")
@click.option("--solver-precision", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True,
              help="precision of Hessians and the OBS solver")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-memory", type=click.FloatRange(min=0, min_open=True), default=None, metavar="GIB",
              help="memory budget on the model's device: choose the calibration groups so every group fits, "
                   "or refuse before loading")
@click.option("--dry-run", is_flag=True, help="print the memory plan (per group and device) and exit; loads no weights")
@click.option("--world-size", type=click.IntRange(1), default=None,
              help="with --dry-run: plan one rank of a torchrun job of this many processes [torchrun's, else 1]")
@click.option("--resume", is_flag=True, help="continue an interrupted prune from its last finished group (OUT.partial)")
@click.option("--save-dtype", type=click.Choice(["base", "fp32", "fp16", "bf16"]), default="base", show_default=True,
              help="dtype of the saved weights (base: the base model's own)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="run directory")
@JSON
@FORCE
@DEVICE
@DTYPE
def prune(model, method, sparsity, sparsity_type, head_ratio, ffn_ratio, structure_cost, joint_scoring,
          ffn_per_round, allocation, quant, quant_method, quant_group_size, quant_clip, act_steps, act_percentile,
          smoothquant, output_quant, prompts, num_prompts, steps, guidance, batch_size, groups,
          calibration_mode, cache_device, cache_spill, hessian_device, timestep_weighting, blocks, percdamp,
          block_size, no_compensate, skip_indivisible, max_tokens, height, width, solver_precision, seed, max_memory,
          dry_run, world_size, resume, save_dtype, out, as_json, force, device, dtype) -> None:
    """Prune a denoiser with OBS-Diff (or a baseline) and save a run directory.

    Finished calibration groups are kept in OUT.partial until the run is saved: after a crash, Ctrl-C or a
    kill, the same command with --resume continues where it stopped.
    """
    from obsdiff.config import CalibConfig, PruneConfig, QuantConfig
    from obsdiff.job import PruneInterrupted, run_prune

    with rank_zero_reports(alike=True):  # every rank parses the same options
        if quant is None and (quant_group_size is not None or smoothquant is not None):
            raise click.UsageError("--quant-group-size and --smoothquant apply with --quant only; add --quant SCHEME")
        qcfg = None if quant is None else QuantConfig(
            scheme=quant, method=quant_method, group_size=quant_group_size, clip=quant_clip, act_steps=act_steps,
            act_percentile=act_percentile, smoothquant=smoothquant, output_quant=output_quant)
        pcfg = PruneConfig(quant=qcfg, method=method, sparsity=sparsity, sparsity_type=sparsity_type, percdamp=percdamp,
                           block_size=block_size, compensate=not no_compensate, blocks=parse_span(blocks),
                           on_indivisible="skip" if skip_indivisible else "error", compute_dtype=solver_precision,
                           head_ratio=head_ratio, ffn_ratio=ffn_ratio, structure_cost=structure_cost,
                           joint_scoring=joint_scoring, ffn_per_round=ffn_per_round, allocation=allocation)
        ccfg = CalibConfig(prompts=prompts, num_prompts=num_prompts, steps=steps, guidance=guidance,
                           batch_size=batch_size, groups=groups, timestep_weighting=timestep_weighting, seed=seed,
                           max_tokens=max_tokens, height=height, width=width, mode=calibration_mode,
                           cache_device=cache_device, cache_spill=cache_spill, hessian_device=hessian_device)
    with rank_zero_reports():
        try:
            result = run_prune(model, pcfg, ccfg, out, resume=resume, force=force, max_memory=max_memory,
                               dry_run=dry_run, save_dtype=None if save_dtype == "base" else save_dtype,
                               device=device, dtype=dtype, world_size=world_size, on_plan=echo_plan)
        except PruneInterrupted as exc:  # the library says resume=True; the command's word is --resume
            exc.args = (f"interrupted; {exc.done} finished groups are kept in {exc.path}: run the same command "
                        "with --resume to continue",)
            raise
    if not result.is_main:  # rank 0 alone prints
        return
    if dry_run:
        from obsdiff.planning.planner import describe

        click.echo(describe(result.plan))
        return
    if as_json:
        from obsdiff.runs.io import read_run

        click.echo(json.dumps(read_run(out).to_dict(), indent=2))
        return
    click.echo(format_table(["prune", "value"], summary_rows(result)))
    for warning in result.report.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {out} (evaluate: obsdiff eval {out} --reference {model})")


def echo_plan(plan) -> None:
    """The plan in one line on stderr, before the load."""
    click.echo(f"plan: {len(plan.groups)} calibration groups, predicted peak "
               + ", ".join(f"{n / 2**30:.1f} GiB on {d}" for d, n in sorted(plan.peak.items()))
               + (f" per rank ({plan.world_size} ranks)" if plan.world_size > 1 else "")
               + " (--dry-run shows the groups)", err=True)


def summary_rows(result) -> list[list]:
    """The table `obsdiff prune` prints: what was pruned, how well, in what memory and time."""
    report, plan, measured = result.report, result.plan, result.measured
    done = report.pruned_layers
    errs = [r.error for r in done if r.error is not None]
    errs0 = [r.error_no_compensation for r in done if r.error_no_compensation is not None]
    return [["device, model dtype", f"{report.device}, {report.dtype}"],
            ["layers pruned", len(done)], ["layers skipped", len(report.layers) - len(done)],
            ["sparsity (pruned layers)", report.sparsity],
            *([["quantized layers, scheme", f"{len(report.quantized)}, "
                f"{report.prune['quant']['scheme']} ({report.prune['quant']['method']})"]]
              if report.prune.get("quant") else []),
            ["mean rel. error, mask only", sum(errs0) / len(errs0) if errs0 else None],
            ["mean rel. error, after OBS", sum(errs) / len(errs) if errs else None],
            ["calibration groups", len(report.groups)],
            *([["ranks, MiB communicated", f"{report.distributed['world_size']}, "
                f"{report.distributed['bytes_communicated'] / 2**20:.1f}"]] if report.distributed else []),
            *([["cached block inputs (MiB)", report.calibration["cache_bytes"] / 2**20]]
              if report.calibration.get("mode") == "cached" else []),
            *([["parameters, pruned / dense", report.model_stats["parameter_ratio"]],
               ["FLOPs per forward, pruned / dense", report.model_stats["flop_ratio"]]] if report.model_stats else []),
            ["peak Hessian memory (MiB)", report.peak_hessian_bytes / 2**20],
            *[[f"peak memory on {d} (GiB), planned / measured",
               f"{plan.peak.get(d, 0) / 2**30:.2f} / {n / 2**30:.2f}"] for d, n in sorted(measured.items())],
            ["total seconds", report.total_seconds]]


@contextlib.contextmanager
def rank_zero_reports(alike: bool = False) -> Iterator[None]:
    """Under torchrun every rank runs the command: a failure every rank meets is printed once, by rank 0, and
    another rank exits with its code, printing nothing. Such failures are what the library marks
    (`job.reported_by_rank_zero`) and, with `alike`, any error of a block that fails alike on every rank (it
    reads the options only)."""
    from obsdiff.errors import ObsdiffError
    from obsdiff.job import reported_by_rank_zero
    from obsdiff.pruning.distributed import launched_by_torchrun

    try:
        yield
    except click.exceptions.Exit:
        raise
    except BaseException as exc:
        other_rank = launched_by_torchrun() and os.environ["RANK"] != "0"
        if not (reported_by_rank_zero(exc) or (alike and other_rank and isinstance(exc, ObsdiffError))):
            raise
        code = getattr(exc, "exit_code", 130 if isinstance(exc, KeyboardInterrupt) else 2)
        raise click.exceptions.Exit(code) from None


@cli.command()
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for the PNG files [RUN]")
@FORCE
def report(run, out, force) -> None:
    """Plot a run's report next to its obsdiff.json: per-layer error (layer_errors.png) and, for structured runs,
    the heads and FFN neurons kept per block (structures.png)."""
    from obsdiff.eval.plots import write_run_plots

    for path in write_run_plots(run, out, force=force):
        click.echo(f"wrote {path}")


def parse_span(text: str | None) -> tuple[int, int] | None:
    from obsdiff.errors import ConfigError

    if text is None:
        return None
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--blocks {text!r} must look like START:END, e.g. 0:24") from None
    return start, end


def main() -> None:
    cli(prog_name="obsdiff")


if __name__ == "__main__":
    main()
