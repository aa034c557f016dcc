"""`--clip-model`: CLIP score and CLIP-feature Frechet distance from a local (tiny, random) checkpoint."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from obsdiff.cli import cli
from obsdiff.eval.evaluate import clip_score
from tests.conftest import WORDS


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from obsdiff.models.text import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer(WORDS, max_length=16)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=8,
    )
    path = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


def test_clip_score_formula():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [0.0, -1.0]])  # cosines 1 and -1; negatives count as 0
    assert clip_score(a, b) == pytest.approx(50.0)


def test_eval_with_clip_model(tiny_sd3_dir, tiny_clip_dir, tmp_path):
    out = tmp_path / "eval"
    r = CliRunner().invoke(cli, ["eval", str(tiny_sd3_dir), "--reference", str(tiny_sd3_dir), "--num-images", "4",
                                 "--steps", "2", "--clip-model", str(tiny_clip_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert 0 <= m["clip_score"] <= 100 and m["clip_score"] == pytest.approx(m["reference_clip_score"])
    assert m["fd_reference"] == pytest.approx(0.0, abs=1e-6)


def test_bad_clip_model_path(tiny_sd3_dir, tmp_path):
    r = CliRunner().invoke(cli, ["eval", str(tiny_sd3_dir), "--num-images", "2", "--steps", "1",
                                 "--clip-model", str(tmp_path), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "could not load a CLIP model" in r.output and not (tmp_path / "e").exists()
