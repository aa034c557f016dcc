"""`obsdiff report` and the plots at the end of `obsdiff prune`: per-layer errors and structures kept per block."""

import json
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from obsdiff.cli import cli
from obsdiff.errors import MissingDependencyError, ModelLoadError, OutputExistsError
from obsdiff.eval.plots import block_of, kept_structures, layer_errors, short_block, write_run_plots

FAST = ["--num-prompts", "2", "--steps", "2", "--batch-size", "2", "--groups", "1"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("name, block, label", [
    ("transformer_blocks.3.attn.to_out.0", "transformer_blocks.3", "3"),
    ("single_transformer_blocks.12.proj_out", "single_transformer_blocks.12", "single 12"),
    ("down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2", "down_blocks.1.attentions.0.transformer_blocks.1",
     "down 1.0.1"),
    ("mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0", "mid 0.0"),
    ("proj_out", "proj_out", "proj_out"),
])
def test_block_of_every_family(name, block, label):
    assert block_of(name) == block
    assert short_block(block) == label


def layer(name, mask, obs):
    return {"name": name, "error_no_compensation": mask, "error": obs}


def fake_run(path, layers, structures=()):
    path.mkdir()
    record = {"base_model": "builtin:digits", "denoiser_file": "denoiser/x.safetensors", "sparsity": 0.5,
              "prune": {"method": "obs-diff", "sparsity_type": "2:4", "compensate": True},
              "layers": layers, "structures": list(structures)}
    (path / "obsdiff.json").write_text(json.dumps(record))
    return path


def test_layer_errors_leave_out_skipped_layers():
    data = layer_errors([layer("transformer_blocks.0.attn.to_q", 0.1, 0.01),
                         layer("transformer_blocks.0.attn.to_k", None, None),
                         layer("transformer_blocks.1.ff.net.2", 0.2, 0.03)])
    assert data["names"] == ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2"]
    assert data["blocks"] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert data["mask_only"] == [0.1, 0.2] and data["compensated"] == [0.01, 0.03]


def test_kept_structures_per_block_and_kind():
    structures = [
        {"name": "transformer_blocks.0.attn", "kind": "heads", "count": 8, "kept": 6},
        {"name": "transformer_blocks.0.ff", "kind": "ffn", "count": 512, "kept": 256},
        {"name": "transformer_blocks.0.ff_context", "kind": "ffn", "count": 512, "kept": 128},
        {"name": "transformer_blocks.1.attn", "kind": "heads", "count": 8, "kept": 4},
        {"name": "transformer_blocks.1.ff", "kind": "ffn", "count": 512, "kept": 384},
    ]
    blocks, kept = kept_structures(structures)
    assert blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    assert kept == {"attn heads": [0.75, 0.5], "ff neurons": [0.5, 0.75], "ff_context neurons": [0.25, None]}


def test_groups_that_lost_nothing_count_as_kept_with_the_allocation():
    """`structures` holds only groups that lost something; the sensitivity allocation names the others."""
    structures = [{"name": "transformer_blocks.0.attn", "kind": "heads", "count": 8, "kept": 4},
                  {"name": "transformer_blocks.1.ff", "kind": "ffn", "count": 512, "kept": 256}]
    removed = {"transformer_blocks.0.attn": 4, "transformer_blocks.0.ff": 0, "transformer_blocks.1.attn": 0,
               "transformer_blocks.1.ff": 256}
    blocks, kept = kept_structures(structures, removed)
    assert blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    assert kept == {"attn heads": [0.5, 1.0], "ff neurons": [1.0, 0.5]}
    assert kept_structures(structures)[1] == {"attn heads": [0.5, None], "ff neurons": [None, 0.5]}


def test_report_writes_pngs_and_refuses_to_overwrite(tmp_path):
    layers = [layer(f"transformer_blocks.{b}.attn.to_{x}", 0.1 * (b + 1), 0.01 * (b + 1)) for b in range(3)
              for x in "qkv"]
    structures = [{"name": f"transformer_blocks.{b}.attn", "kind": "heads", "count": 4, "kept": 4 - b}
                  for b in range(3)]
    path = fake_run(tmp_path / "run", layers, structures)
    r = run("report", path)
    assert r.exit_code == 0, r.output
    assert r.output.split() == ["wrote", str(path / "layer_errors.png"), "wrote", str(path / "structures.png")]
    for name in ("layer_errors.png", "structures.png"):
        with Image.open(path / name) as image:
            assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 300
    before = (path / "layer_errors.png").read_bytes()
    r = run("report", path)
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output
    assert (path / "layer_errors.png").read_bytes() == before
    assert run("report", path, "--force").exit_code == 0
    assert sorted(p.name for p in path.iterdir()) == ["layer_errors.png", "obsdiff.json", "structures.png"]


def test_unstructured_run_has_no_structures_plot_and_out_elsewhere(tmp_path):
    path = fake_run(tmp_path / "run", [layer("transformer_blocks.0.ff.net.2", 0.1, 0.01)])
    written = write_run_plots(path, tmp_path / "plots")
    assert written == [tmp_path / "plots" / "layer_errors.png"] and written[0].is_file()
    assert not (path / "layer_errors.png").exists()


def test_report_errors_are_one_line(tmp_path, monkeypatch):
    r = run("report", tmp_path)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "has no obsdiff.json" in r.output
    with pytest.raises(ModelLoadError, match="has no obsdiff.json"):
        write_run_plots(tmp_path)
    path = fake_run(tmp_path / "run", [layer("transformer_blocks.0.ff.net.2", 0.1, 0.01)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match="pip install matplotlib"):
        write_run_plots(path)
    r = run("report", path)
    assert r.exit_code == 2 and r.output.strip().startswith("error: plots need matplotlib")
    assert sorted(p.name for p in path.iterdir()) == ["obsdiff.json"]  # nothing half-written


def test_existing_plot_is_refused_before_drawing(tmp_path):
    path = fake_run(tmp_path / "run", [layer("transformer_blocks.0.ff.net.2", 0.1, 0.01)])
    (path / "layer_errors.png").write_text("mine")
    with pytest.raises(OutputExistsError, match="layer_errors.png already exists"):
        write_run_plots(path)
    assert (path / "layer_errors.png").read_text() == "mine"


def test_prune_draws_plots_and_prints_json(tiny_sd3_dir, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["prune", "--model", str(tiny_sd3_dir), "--sparsity", "0.5", *FAST,
                                 "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output + r.stderr
    record = json.loads(r.stdout)  # stdout is the JSON record alone
    assert record == json.loads((out / "obsdiff.json").read_text())
    assert record["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (out / "layer_errors.png").is_file() and not (out / "structures.png").exists()


def crash(*args):
    raise RuntimeError("font cache unwritable")


@pytest.mark.parametrize("fault, message", [("no matplotlib", "pip install matplotlib"),
                                            ("plot crashes", "font cache unwritable")])
def test_prune_succeeds_when_plots_fail(fault, message, tiny_sd3_dir, tmp_path, monkeypatch, caplog):
    if fault == "no matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    else:
        monkeypatch.setattr("obsdiff.eval.plots.plot_layer_errors", crash)
    out = tmp_path / "run"
    r = run("prune", "--model", tiny_sd3_dir, "--sparsity", "0.5", *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["denoiser", "obsdiff.json"]  # no PNG, no staged leftovers
    assert any("no plots" in m and message in m for m in caplog.messages)
