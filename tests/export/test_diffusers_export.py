"""`obsdiff-export diffusers`: a run as a diffusers folder that plain diffusers loads, without obsdiff."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from obsdiff.builtin import builtin_pipeline_dir
from obsdiff.export.cli import cli
from obsdiff.io import stored_dtype

PROMPT, SEED, STEPS, GUIDANCE = "the digit seven", 3, 4, 3.0

# Runs in a fresh interpreter where `import obsdiff` fails: only diffusers and its dependencies are usable.
PLAIN_DIFFUSERS = """
import sys
sys.modules["obsdiff"] = None
try:
    import obsdiff  # noqa: F401
    raise SystemExit("obsdiff is importable")
except ImportError:
    pass
import numpy as np
import torch
from diffusers import DiffusionPipeline

folder, out, prompt, seed, steps, guidance = sys.argv[1:7]
torch.set_num_threads(1)
pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)  # as obsdiff loads (--dtype fp32 on a CPU)
pipe.set_progress_bar_config(disable=True)
image = pipe(prompt=[prompt], generator=[torch.Generator().manual_seed(int(seed))], num_inference_steps=int(steps),
             guidance_scale=float(guidance), height=16, width=16, max_sequence_length=8, output_type="np").images
assert not any(name == "obsdiff" or name.startswith("obsdiff.") for name in sys.modules if sys.modules[name])
np.save(out, image)
print(type(pipe).__name__, type(pipe.transformer).__module__)
"""


def files(folder):
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """builtin:digits pruned 2:4 by magnitude (no calibration: seconds), saved as a run."""
    from obsdiff.config import PruneConfig
    from obsdiff.io import save_run
    from obsdiff.loading import load_pipeline
    from obsdiff.prune import prune_

    model = load_pipeline("builtin:digits")
    report = prune_(model, PruneConfig(method="magnitude", sparsity_type="2:4"), progress=False)
    return save_run(model, report.to_dict(), tmp_path_factory.mktemp("runs") / "digits-2of4")


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "digits-2of4-diffusers"
    r = CliRunner().invoke(cli, ["diffusers", str(digits_run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "transformer pruned" in r.output and "text_encoder copied" in r.output
    return out


def test_plain_diffusers_generates_the_same_image_as_obsdiff(exported, digits_run, tmp_path):
    from obsdiff.evaluate import generate
    from obsdiff.loading import load_pipeline

    npy = tmp_path / "plain.npy"
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(exported), str(npy), PROMPT, str(SEED),
                           str(STEPS), str(GUIDANCE)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "StableDiffusion3Pipeline diffusers.models." in proc.stdout  # the stock class, no custom code
    plain = np.load(npy)
    ours = generate(load_pipeline(str(digits_run)), [PROMPT], [SEED], STEPS, GUIDANCE, progress=False).images
    assert plain.shape == ours.shape == (1, 16, 16, 1)  # grey digits
    assert float(np.abs(plain - ours).max()) < 1e-6, float(np.abs(plain - ours).max())
    assert float(ours.std()) > 0.05  # an image, not a blank


def test_the_folder_is_the_base_pipeline_with_the_pruned_denoiser_and_nothing_else(exported, digits_run):
    from safetensors.torch import load_file

    base = builtin_pipeline_dir("digits")
    assert files(exported) == files(base)  # no obsdiff files, no missing component
    assert json.loads((exported / "model_index.json").read_text()) == json.loads(
        (base / "model_index.json").read_text())
    config = json.loads((exported / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel" and not any("obsdiff" in k for k in config)
    ours = load_file(exported / "transformer" / "diffusion_pytorch_model.safetensors")
    run = load_file(digits_run / "denoiser" / "diffusion_pytorch_model.safetensors")
    assert ours.keys() == run.keys() and all(torch.equal(ours[k], run[k]) for k in run)
    w = ours["transformer_blocks.0.ff.net.0.proj.weight"]
    assert int((w.reshape(-1, 4) == 0).sum(1).min()) == 2  # 2:4 along the input dimension


def test_link_dtype_and_no_overwrite(digits_run, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "bf16"
    r = CliRunner().invoke(cli, ["diffusers", str(digits_run), "--out", str(out), "--dtype", "bf16", "--link"])
    assert r.exit_code == 0, r.output
    assert "text_encoder converted" in r.output and "tokenizer linked" in r.output
    base = builtin_pipeline_dir("digits")
    parts = ("transformer", "vae", "text_encoder", "text_encoder_3")
    assert {c: stored_dtype(out / c) for c in parts} == dict.fromkeys(parts, "bf16")  # the base stores fp16
    pipe = DiffusionPipeline.from_pretrained(out, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder_3.dtype == torch.bfloat16
    vocab = next(f.relative_to(base) for f in (base / "tokenizer").iterdir() if f.is_file())
    assert (out / vocab).stat().st_ino == (base / vocab).stat().st_ino  # an unchanged file is linked, not copied
    r = CliRunner().invoke(cli, ["diffusers", str(digits_run), "--out", str(out)])
    assert r.exit_code == 2 and "already exists; pass --force" in r.output


def test_structured_runs_and_non_runs_are_refused_in_one_line(digits_run, tmp_path):
    import shutil

    structured = tmp_path / "structured"
    shutil.copytree(digits_run, structured)
    record = json.loads((structured / "obsdiff.json").read_text())
    record["shrink_plan"] = [{"op": "remove_heads"}]  # only its presence matters: refused before loading
    (structured / "obsdiff.json").write_text(json.dumps(record))
    r = CliRunner().invoke(cli, ["diffusers", str(structured), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "is a structured run" in r.output and "obsdiff.load_pipeline" in r.output and "onnx" in r.output
    r = CliRunner().invoke(cli, ["diffusers", str(tmp_path), "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "is not a run directory" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
