"""The embedded builtin:digits model: what ships, and that it clears its quality bar."""

import numpy as np
import pytest
import torch

from obsdiff.builtin import digits
from obsdiff.runs.loading import load_pipeline


@pytest.fixture(scope="module")
def loaded():
    return load_pipeline("builtin:digits")


def test_shipped_files_are_small_and_complete():
    files = [f for f in digits.DATA_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 20e6
    assert digits.CLASSIFIER_FILE.exists() and digits.REAL_TEST_FILE.exists()
    assert digits.load_meta()["classifier_test_accuracy"] >= 0.97


def test_architecture_is_a_real_sd3_pipeline(loaded):
    pipe = loaded.pipeline
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        assert getattr(pipe, name) is not None
    cfg = pipe.transformer.config
    assert cfg.num_layers >= 6 and cfg.num_attention_heads >= 8
    ff = pipe.transformer.transformer_blocks[0].ff.net
    assert ff[0].proj.out_features == 4 * cfg.num_attention_heads * cfg.attention_head_dim
    assert loaded.family.name == "sd3" and loaded.builtin == "digits"


def test_prompt_templates():
    assert not set(digits.TRAIN_TEMPLATES) & set(digits.EVAL_TEMPLATES)
    prompts, labels = digits.eval_prompts(30)
    assert labels[:10] == list(range(10))
    assert all(digits.digit_of_prompt(p) == y for p, y in zip(prompts, labels, strict=True))
    assert digits.digit_of_prompt("a cat") is None and digits.digit_of_prompt("7 or eight") is None


def test_tokenizers_cover_the_vocabulary(loaded):
    tok, tok3 = loaded.pipeline.tokenizer, loaded.pipeline.tokenizer_3
    for word in digits.vocabulary():
        assert len(tok(word).input_ids) == 3, word  # bos, the word, eos
        assert len(tok3(word).input_ids) == 2, word  # the word, eos


def test_classifier_on_real_held_out_digits():
    images, labels = digits.load_real_test()
    assert images.shape[1:] == (16, 16) and images.dtype == np.uint8
    with torch.no_grad():
        pred = digits.load_classifier()(digits.to_model_images(images)).argmax(1).numpy()
    assert (pred == labels).mean() >= 0.97


def test_dense_model_clears_the_bar_on_a_sample(loaded):
    from obsdiff.eval.evaluate import EvalConfig, evaluate

    report = evaluate(loaded, config=EvalConfig(num_images=40, seed=123), progress=False)
    m = report["metrics"]
    assert m["digit_accuracy"] >= 0.9, m
    assert m["digit_confidence"] >= 0.85, m
    assert 0 <= m["fd_real"] < 800  # small samples bias FD upwards: 200 real digits vs the test set give ~90
    assert report["generation"]["num_inference_steps"] == 20
