import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from obsdiff.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_info_lists_versions_devices_and_sparse_support():
    r = run("info")
    assert r.exit_code == 0, r.output
    for word in ("torch", "diffusers", "onnxruntime", "tensorrt", "cpu", "sparse tensor cores", "sd3"):
        assert word in r.output
    env = json.loads(run("info", "--json").output)
    usable = env["sparse_tensor_cores"]["usable"]
    if not torch.cuda.is_available():  # a CPU machine can never use them, and says why
        assert usable is False and env["sparse_tensor_cores"]["reason"] == "no CUDA GPU visible to PyTorch"
    else:
        assert usable == (torch.cuda.get_device_capability(0) >= (8, 0))
    assert env["libraries"]["torch"]


@pytest.mark.parametrize("model", ["org/some-model", "/no/such/dir", "builtin:nope", "."])
def test_bad_model_is_one_line_and_exit_2(model, tmp_path):
    r = run("generate", "--model", model, "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not (tmp_path / "x.png").exists()


def test_prune_help_lists_the_method_options():
    text = "".join(run("prune", "--help").output.split())
    for option in ("--sparsity-type", "--timestep-weighting", "--groups", "--percdamp", "--no-compensate", "--blocks"):
        assert option in text


def test_generate_writes_one_image_and_respects_force(tiny_sd3_dir, tmp_path):
    out = tmp_path / "img.png"
    args = ["generate", "--model", str(tiny_sd3_dir), "--prompt", "a red cat", "--steps", "2",
            "--height", "16", "--width", "16", "--out", str(out)]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (16, 16)
    before = out.read_bytes()
    r = run(*args)
    assert r.exit_code == 2 and "--force" in r.output
    assert out.read_bytes() == before
    assert run(*args, "--force", "--seed", "3").exit_code == 0
    assert out.read_bytes() != before  # another seed, another image, written in place
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]  # no temporary files left behind


def test_eval_against_itself_has_zero_drift(tiny_sd3_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\na photo of a cat\n")
    out = tmp_path / "eval"
    r = run("eval", str(tiny_sd3_dir), "--reference", str(tiny_sd3_dir), "--num-images", "4", "--steps", "2",
            "--batch-size", "3", "--prompts", str(prompts), "--out", str(out))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    assert m["latent_rel_mse_vs_reference"] == pytest.approx(0.0, abs=1e-10)
    assert m["psnr_vs_reference"] == pytest.approx(100.0)
    assert report["prompts"] == ["a red cat", "a photo of a cat"] * 2
    assert "digit_accuracy" not in m  # only for builtin:digits
    assert (out / "grid.png").exists() and (out / "grid_reference.png").exists()


def test_eval_bad_inputs(tiny_sd3_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    r = run("eval", str(tiny_sd3_dir), "--prompts", str(empty), "--out", str(tmp_path / "e"))
    assert r.exit_code == 2 and "empty" in r.output
    r = run("eval", "--out", str(tmp_path / "e"))
    assert r.exit_code == 2 and "exactly one" in r.output
    (tmp_path / "exists").mkdir()
    r = run("eval", str(tiny_sd3_dir), "--num-images", "2", "--out", str(tmp_path / "exists"))
    assert r.exit_code == 2 and "already exists" in r.output
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("builder", ["tiny_flux", "tiny_sdxl"])
def test_eval_decodes_every_family(builder, tmp_path):
    """Flux returns packed latents: evaluation must unpack them before the VAE."""
    import tests.conftest as c

    model = tmp_path / "model"
    getattr(c, builder)().save_pretrained(model)
    out = tmp_path / "eval"
    r = run("eval", str(model), "--reference", str(model), "--num-images", "2", "--steps", "2", "--height", "32",
            "--width", "32", "--out", str(out))
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["latent_rel_mse_vs_reference"] == pytest.approx(0.0, abs=1e-10)
    assert Image.open(out / "grid.png").size[0] > 32


@pytest.fixture
def root_level():
    """The root logger's level, restored afterwards (the -v/-q callbacks set it)."""
    import logging

    before = logging.getLogger().level
    yield lambda: logging.getLogger().level
    logging.getLogger().setLevel(before)


@pytest.mark.parametrize("args, level", [
    (["info"], 30), (["-v", "info"], 20), (["info", "-v"], 20), (["-v", "info", "-v"], 10),
    (["-q", "info"], 40), (["info", "--quiet"], 40), (["-v", "info", "-q"], 30),
])
def test_verbosity_before_or_after_the_subcommand(args, level, root_level):
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert root_level() == level


def test_export_cli_takes_verbosity_after_every_subcommand(tmp_path, root_level):
    from obsdiff.engines.cli import cli as export_cli

    for name, command in export_cli.commands.items():
        opts = {o for p in command.params for o in p.opts}
        assert {"-v", "--verbose", "-q", "--quiet"} <= opts, name
    r = CliRunner().invoke(export_cli, ["triton", str(tmp_path / "none"), "--out", str(tmp_path / "repo"), "-q"])
    assert r.exit_code == 2 and r.output.startswith("error: ")  # no such export directory
    assert root_level() == 40


def test_method_and_weighting_are_choices_from_the_registries():
    from obsdiff.solver.hessian import WEIGHTINGS
    from obsdiff.solver.methods import METHODS

    text = "".join(run("prune", "--help").output.split())
    assert f"[{'|'.join(METHODS)}]" in text and f"[{'|'.join(WEIGHTINGS)}]" in text
    r = run("prune", "--model", "builtin:digits", "--method", "optimal", "--out", "x")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "'optimal' is not one of 'obs-diff', 'sparsegpt', 'wanda', 'magnitude'" in r.output


@pytest.mark.parametrize("command", [["prune"], ["eval"], ["generate"]])
def test_device_and_dtype_default_to_auto(command):
    text = " ".join(run(*command, "--help").output.split())
    assert "--device TEXT auto (CUDA when available, else the CPU), cpu, cuda or cuda:N [default: auto]" in text
    assert "--dtype [auto|fp32|fp16|bf16]" in text and "bf16 on CUDA, fp32 on the CPU" in text


def test_export_onnx_device_defaults_to_auto():
    from obsdiff.engines.cli import cli as export_cli

    text = " ".join(CliRunner().invoke(export_cli, ["onnx", "--help"]).output.split())
    assert "--device TEXT where the model runs while exporting: auto" in text and "[default: auto]" in text


@pytest.mark.parametrize("device, message", [
    ("gpu0", "--device 'gpu0' is not a device name; use auto, cpu, cuda or cuda:N"),
    ("meta", "--device 'meta' holds no data"),
])
def test_bad_device_is_refused_before_loading(device, message, tmp_path):
    r = run("generate", "--model", "builtin:digits", "--prompt", "x", "--out", str(tmp_path / "x.png"),
            "--device", device)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert r.output.startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_prune_records_and_prints_the_device_and_dtype_used(tiny_sd3_dir, tmp_path):
    import torch

    expected = ("cuda", "bf16") if torch.cuda.is_available() else ("cpu", "fp32")
    out = tmp_path / "run"
    r = run("prune", "--model", str(tiny_sd3_dir), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out))
    assert r.exit_code == 0, r.output
    record = json.loads((out / "obsdiff.json").read_text())
    assert (record["device"], record["dtype"]) == expected
    assert "| device, model dtype " in r.output and f"{expected[0]}, {expected[1]}" in r.output
    r = run("prune", "--model", str(tiny_sd3_dir), "--method", "magnitude", "--sparsity", "0.5", "--dtype", "fp16",
            "--device", "cpu", "--out", str(tmp_path / "fp16"))
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "fp16" / "obsdiff.json").read_text())["dtype"] == "fp16"


@pytest.mark.parametrize("command", ["generate", "eval", "prune"])
def test_model_help_names_every_accepted_form(command):
    text = " ".join(run(command, "--help").output.split())
    forms = ("diffusers pipeline folder", "hub id ORG/NAME[@REV]", "builtin:digits", "run written by obsdiff prune")
    for form in forms:
        assert form in text, text


@pytest.mark.parametrize("builder, multiple, limit", [("tiny_sd3", 4, 64), ("tiny_flux", 4, None),
                                                      ("tiny_sdxl", 8, None)])
def test_image_size_rule_is_what_the_pipeline_does(builder, multiple, limit, tmp_path):
    """The rule read from config files matches the pipeline: a valid size comes back as asked; one off the
    multiple is refused by diffusers or comes back another size; one past SD3's position table is refused."""
    import tests.conftest as c
    from obsdiff.runs.loading import image_size_rule

    pipe = getattr(c, builder)()
    pipe.save_pretrained(tmp_path / "model")
    rule = image_size_rule(str(tmp_path / "model"))
    assert (rule.multiple, rule.limit) == (multiple, limit)

    def size(height: int, width: int) -> tuple[int, int] | None:
        try:
            out = pipe("a cat", height=height, width=width, num_inference_steps=1, output_type="np")
        except ValueError:
            return None
        return out.images.shape[1:3]

    assert size(2 * multiple, 3 * multiple) == (2 * multiple, 3 * multiple)
    assert size(2 * multiple + multiple // 2, 2 * multiple) in (None, (2 * multiple, 2 * multiple))
    if limit is not None:
        assert size(limit, multiple) == (limit, multiple)
        assert size(limit + multiple, multiple) is None


def test_a_bad_size_is_refused_from_the_configs_before_loading(tiny_sd3_dir, tmp_path):
    """No weights are read (the model here has none) and nothing is written: one line with the nearest sizes."""
    import shutil

    model = tmp_path / "no-weights"
    shutil.copytree(tiny_sd3_dir, model)
    for weights in model.rglob("*.safetensors"):
        weights.unlink()
    for args, message in [(["--height", "18"], "--height 18 is not a multiple of 4, which"),
                          (["--width", "3"], "--width 3 is not a multiple of 4, which"),
                          (["--height", "65"], "--height 65 is larger than 64, the largest size")]:
        r = run("generate", "--model", str(model), "--prompt", "x", *args, "--out", str(tmp_path / "x.png"))
        assert r.exit_code == 2, r.output
        assert r.output.count("\n") == 1 and r.output.startswith(f"error: {message}"), r.output
    r = run("generate", "--model", str(model), "--prompt", "x", "--height", "18", "--out", str(tmp_path / "x.png"))
    assert r.output.rstrip().endswith("use 16 or 20")
    r = run("eval", str(model), "--reference", str(tiny_sd3_dir), "--width", "70", "--out", str(tmp_path / "e"))
    assert r.exit_code == 2 and "use 64 or less, a multiple of 4" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-weights"]
