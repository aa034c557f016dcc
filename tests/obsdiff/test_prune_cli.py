"""`obsdiff prune` from the command line: a real run, reloading it, and one-line errors for bad input."""

import json

import pytest
import torch
from click.testing import CliRunner

from obsdiff.cli import cli

FAST = ["--num-prompts", "4", "--steps", "3", "--batch-size", "2", "--groups", "2", "--guidance", "2.0"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def pruned_run(tiny_sd3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r24"
    r = run("prune", "--model", tiny_sd3_dir, "--sparsity-type", "2:4", *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_run_directory_contents(pruned_run, tiny_sd3_dir):
    record = json.loads((pruned_run / "obsdiff.json").read_text())
    assert record["base_model"] == str(tiny_sd3_dir.resolve())
    assert record["prune"]["method"] == "obs-diff" and record["calib"]["timestep_weighting"] == "log_decrease"
    from safetensors.torch import load_file

    state = load_file(str(pruned_run / "denoiser" / "diffusion_pytorch_model.safetensors"))
    layers = {layer["name"]: layer for layer in record["layers"]}
    assert len(layers) == 21  # 12 linears in block 0, 9 in the context_pre_only last block
    for name, layer in layers.items():
        w = state[f"{name}.weight"]
        assert layer["shape"] == list(w.shape) and layer["skipped"] is None, name
        assert layer["sparsity"] == 0.5 == float((w == 0).float().mean()), name  # 2:4: exactly half
        assert 0 < layer["error"] <= layer["error_no_compensation"] and layer["percdamp"] == 0.01, name
        assert layer["seconds"] >= layer["solve_seconds"] + layer["error_seconds"] - 1e-9 > 0, name
    groups = record["groups"]
    assert [g["index"] for g in groups] == [0, 1] and all(g["calib_calls"] == 2 * 3 for g in groups)
    units = [u for g in groups for u in g["units"]]
    assert sorted(n for u in units for n in u) == sorted(layers)  # every layer in exactly one group
    for g in groups:  # one fp32 Hessian per unit (its linears share the input)
        assert g["hessian_bytes"] == sum(4 * state[f"{u[0]}.weight"].shape[1] ** 2 for u in g["units"])
        assert g["calib_seconds"] > 0
        assert g["prune_seconds"] >= sum(layers[n]["seconds"] for u in g["units"] for n in u)
    assert record["peak_hessian_bytes"] == max(g["hessian_bytes"] for g in groups)
    # the stages are nested in the total, and the calibration split accounts for all calibration time
    stages = record["encode_seconds"] + sum(g["calib_seconds"] + g["prune_seconds"] for g in groups)
    assert 0 < stages <= record["total_seconds"]
    calibration = record["calibration"]
    assert calibration["mode"] == "rerun" and calibration["pipeline_runs"] == 2
    assert calibration["forward_seconds"] + calibration["hessian_seconds"] == pytest.approx(
        sum(g["calib_seconds"] for g in groups), rel=1e-6)
    assert record["versions"]["torch"] == torch.__version__


def test_generate_and_eval_take_a_run(pruned_run, tiny_sd3_dir, tmp_path):
    from PIL import Image

    r = run("generate", "--model", pruned_run, "--prompt", "a red cat", "--steps", "2", "--out", tmp_path / "x.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "x.png") as image:  # 8x8 latents through a VAE that doubles them
        assert image.size == (16, 16) and image.mode == "RGB"
    r = run("eval", pruned_run, "--reference", tiny_sd3_dir, "--num-images", "2", "--steps", "2")
    assert r.exit_code == 0, r.output
    record = json.loads((pruned_run / "eval" / "metrics.json").read_text())
    metrics = record["metrics"]
    assert metrics["num_images"] == 2 and record["seeds"] == [0, 1] and len(record["prompts"]) == 2
    # the pruned model differs from its base, but 2:4 OBS keeps it close (measured: 0.002, 38 dB)
    assert 0 < metrics["latent_rel_mse_vs_reference"] < 0.05 and metrics["psnr_vs_reference"] > 25


def test_corrupt_run_weights_are_refused(pruned_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pruned_run, broken)
    weights = broken / "denoiser" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = run("generate", "--model", broken, "--prompt", "x", "--out", tmp_path / "x.png")
    assert r.exit_code == 2 and "does not match the hash" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "outside (0, 1)"),
        (["--sparsity", "0"], "outside (0, 1)"),
        ([], "--sparsity is required"),
        (["--sparsity-type", "2:4", "--sparsity", "0.3"], "contradicts"),
        (["--sparsity-type", "4:4"], "0 < N < M"),
        (["--sparsity-type", "4:2"], "0 < N < M"),
        (["--sparsity-type", "zigzag"], "N:M pattern"),
        (["--method", "optimal", "--sparsity", "0.5"], "'optimal' is not one of 'obs-diff'"),
        (["--sparsity", "0.5", "--timestep-weighting", "cosine"], "'cosine' is not one of 'log_decrease'"),
        (["--sparsity", "0.5", "--blocks", "0:99"], "outside the model, which has 2 blocks"),
        (["--sparsity", "0.5", "--blocks", "3:1"], "is empty"),
        (["--sparsity", "0.5", "--blocks", "a-b"], "START:END"),
        (["--sparsity-type", "3:7", "--block-size", "7"], "not a multiple of M=7"),
        (["--sparsity", "0.5", "--groups", "0"], "at least 1"),
        (["--sparsity-type", "structured", "--head-ratio", "1.0", "--ffn-ratio", "0.2"], "at least one head"),
        (["--sparsity-type", "structured"], "needs --sparsity, or both"),
        (["--sparsity-type", "structured", "--sparsity", "0.3", "--method", "wanda"], "no structured variant"),
        (["--sparsity", "0.5", "--head-ratio", "0.3"], "structured only"),
        (["--sparsity-type", "structured", "--head-ratio", "0.1", "--ffn-ratio", "0"], "remove no structure"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_sd3_dir, tmp_path, args, message):
    out = tmp_path / "run"
    r = run("prune", "--model", tiny_sd3_dir, *FAST, *args, "--out", out)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_empty_prompts_file_and_existing_out(tiny_sd3_dir, tmp_path):
    empty = tmp_path / "p.txt"
    empty.write_text("\n  \n")
    r = run("prune", "--model", tiny_sd3_dir, "--sparsity", "0.5", "--prompts", empty, "--out", tmp_path / "r")
    assert r.exit_code == 2 and "empty" in r.output and not (tmp_path / "r").exists()
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    r = run("prune", "--model", tiny_sd3_dir, "--sparsity", "0.5", "--out", tmp_path / "exists")
    assert r.exit_code == 2 and "--force" in r.output
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"


def test_skip_indivisible_records_skipped_layers(tiny_sd3_dir, tmp_path):
    out = tmp_path / "r"
    r = run("prune", "--model", tiny_sd3_dir, "--sparsity-type", "3:7", "--block-size", "7",
            "--skip-indivisible", *FAST, "--out", out)
    # every tiny layer has width 16 or 64: nothing divisible by 7, so nothing is left to prune
    assert r.exit_code == 2 and "no prunable layers" in r.output


def test_a_bad_calibration_size_is_refused_before_anything_is_staged(tiny_sd3_dir, pruned_run, tmp_path):
    """For a pipeline folder and for a run (judged by its base's configs), with and without --dry-run."""
    for model, extra in [(tiny_sd3_dir, []), (pruned_run, []), (tiny_sd3_dir, ["--dry-run"])]:
        r = run("prune", "--model", model, "--sparsity", "0.5", "--height", "17", "--width", "16", *extra,
                "--out", tmp_path / "r")
        assert r.exit_code == 2, r.output
        assert r.output == ("error: --height 17 is not a multiple of 4, which "
                            f"{model} needs (VAE factor 2 x patch size 2); use 16 or 20\n")
        assert list(tmp_path.iterdir()) == []
    r = run("generate", "--model", pruned_run, "--prompt", "x", "--width", "68", "--out", tmp_path / "x.png")
    assert r.exit_code == 2 and "--width 68 is larger than 64" in r.output, r.output
