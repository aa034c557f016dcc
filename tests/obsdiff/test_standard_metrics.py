"""`obsdiff eval --standard-metrics`: torchmetrics' CLIPScore and FID (the `metrics` extra).

CI does not install the extra: there the error paths run, and the torchmetrics tests skip. Never downloads.
"""

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from obsdiff.cli import cli
from obsdiff.errors import ConfigError, MissingDependencyError, ModelLoadError
from obsdiff.eval.evaluate import EvalConfig, clip_features, clip_score, evaluate, load_clip
from obsdiff.eval.standard_metrics import INCEPTION_FILE, inception_weights, require_fidelity, standard_metrics
from tests.obsdiff.test_clip_score import tiny_clip_dir  # noqa: F401  (a fixture)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_missing_torchmetrics_is_one_line_before_generating(tiny_sd3_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import fails as if not installed
    out = tmp_path / "eval"
    r = run("eval", tiny_sd3_dir, "--reference", tiny_sd3_dir, "--num-images", "2", "--steps", "1",
            "--standard-metrics", "--out", out)
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "error: --standard-metrics needs torchmetrics, which is not installed; pip install 'obsdiff[metrics]'"]
    assert not out.exists()


def test_missing_torch_fidelity_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(MissingDependencyError, match=r"FID needs torch_fidelity, .*obsdiff\[metrics\]"):
        require_fidelity()


def test_torchvision_for_another_torch_is_one_line(monkeypatch):
    def broken_import(name):
        raise RuntimeError("operator torchvision::nms does not exist\nmore")

    monkeypatch.setattr("importlib.import_module", broken_import)
    with pytest.raises(MissingDependencyError, match="torch_fidelity does not import with this torch .*"
                                                     "torchvision::nms does not exist; install the torchvision"):
        require_fidelity()


def test_inception_weights_from_the_hub_cache_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'hub' / 'checkpoints' / INCEPTION_FILE} does not exist"):
        inception_weights(None)
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert inception_weights(None) == cached
    assert inception_weights(str(cached)) == cached
    with pytest.raises(ModelLoadError, match="--inception-weights 'nope.pth' is not a file"):
        inception_weights("nope.pth")


def test_inception_weights_need_the_flag():
    with pytest.raises(ConfigError, match="--inception-weights 'w.pth' is used only with --standard-metrics"):
        EvalConfig(inception_weights="w.pth")


def test_clip_hub_id_not_cached_is_one_line():
    with pytest.raises(ModelLoadError, match="'obsdiff-test/no-such-clip' is not in the hub cache; download it once"):
        load_clip("obsdiff-test/no-such-clip")


class MeanColour(torch.nn.Module):
    """A stand-in for Inception in FID tests: per-channel means of uint8 images."""

    num_features = 3

    def forward(self, x):
        return x.float().mean(dim=(2, 3))


def test_torchmetrics_clip_score_equals_ours(tiny_clip_dir):  # noqa: F811
    pytest.importorskip("torchmetrics", reason="the metrics extra is not installed")
    clip = load_clip(str(tiny_clip_dir))
    images = np.random.default_rng(0).random((6, 16, 16, 3), dtype=np.float32)
    prompts = ["a red cat", "a photo of a cat", "digit seven"] * 2
    metrics = standard_metrics(clip, with_reference=True, fid_features=MeanColour())
    ours = clip_score(*clip_features(images, prompts, clip))
    assert metrics.clip(images, prompts) == pytest.approx(ours, rel=1e-4)
    assert metrics.fid_vs(images, images) == pytest.approx(0.0, abs=1e-3)
    assert metrics.fid_vs(images, 1 - images) > 1.0


def test_eval_reports_standard_metrics(tiny_sd3_dir, tiny_clip_dir):  # noqa: F811
    pytest.importorskip("torchmetrics", reason="the metrics extra is not installed")
    config = EvalConfig(num_images=4, steps=2, clip_model=str(tiny_clip_dir), standard_metrics=True)
    m = evaluate(str(tiny_sd3_dir), str(tiny_sd3_dir), config, progress=False, fid_features=MeanColour())["metrics"]
    assert m["torchmetrics_clip_score"] == pytest.approx(m["clip_score"], rel=1e-4)
    assert m["torchmetrics_clip_score"] == pytest.approx(m["reference_torchmetrics_clip_score"])
    assert m["torchmetrics_fid_vs_reference"] == pytest.approx(0.0, abs=1e-3)  # the model against itself
