"""Offline text stacks for small pipelines: tokenizers built from a word list, tiny encoders from configs.

Real checkpoints cannot be downloaded here, so small pipelines (the embedded `builtin:digits` model and
the tiny random models of the tests) get CLIP and T5 tokenizers whose vocabulary is built in memory from
the words they must cover. Every listed word becomes one token, so prompts tokenize the same way on
every machine and the text length stays short.
"""

from __future__ import annotations

from dataclasses import dataclass

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-pair vocabulary in which every word of `words` is a single token.

    Single characters (with and without the end-of-word marker) are in the vocabulary too, so an
    unknown word still tokenizes, character by character, instead of failing.
    """
    vocab: dict[str, int] = {CLIP_BOS: 0, CLIP_EOS: 1}
    words = sorted({w.lower() for w in words if w})
    for ch in sorted({c for w in words for c in w}):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        # Left-to-right merges; every intermediate piece is in the vocabulary, so whatever order the
        # ranks impose, the result is made of known tokens (whole words in practice).
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return vocab, merges


def t5_vocab(words: list[str]) -> list[tuple[str, float]]:
    """A unigram vocabulary (piece, log-probability) where each word is one `▁word` piece."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = sorted({w.lower() for w in words if w})
    chars = sorted({c for w in words for c in w})
    return specials + [("▁" + w, -1.0) for w in words] + [("▁", -5.0)] + [(c, -10.0) for c in chars]


def clip_tokenizer(words: list[str], max_length: int):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(words: list[str], max_length: int):
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocab(words), extra_ids=0, model_max_length=max_length)


@dataclass(frozen=True)
class TextStackConfig:
    """Widths of the three text encoders of an SD3-style pipeline (two CLIP, one T5)."""

    clip_hidden: tuple[int, int] = (32, 32)
    clip_projection: tuple[int, int] = (32, 32)
    clip_layers: int = 2
    clip_heads: int = 4
    t5_d_model: int = 64
    t5_layers: int = 2
    t5_heads: int = 4
    max_length: int = 8
    # None: d_model // heads and 2 * d_model. Wide-output encoders (T5 d_model 4096 for real-size denoisers)
    # set them small so the encoder stays cheap while its output width matches.
    t5_d_kv: int | None = None
    t5_d_ff: int | None = None

    @property
    def pooled_dim(self) -> int:
        return sum(self.clip_projection)

    @property
    def joint_dim(self) -> int:
        return self.t5_d_model


def clip_text_encoder(vocab_size: int, hidden: int, projection: int, cfg: TextStackConfig, seed: int,
                      with_projection: bool = True):
    """A tiny CLIP text encoder: `CLIPTextModelWithProjection` (SD3, SDXL's second) or `CLIPTextModel`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=cfg.clip_layers,
        num_attention_heads=cfg.clip_heads,
        max_position_embeddings=cfg.max_length,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_text_encoder(vocab_size: int, cfg: TextStackConfig, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=cfg.t5_d_model,
        d_kv=cfg.t5_d_kv or cfg.t5_d_model // cfg.t5_heads,
        d_ff=cfg.t5_d_ff or cfg.t5_d_model * 2,
        num_layers=cfg.t5_layers,
        num_heads=cfg.t5_heads,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def build_text_stack(words: list[str], cfg: TextStackConfig = TextStackConfig(), seed: int = 0) -> dict:
    """Tokenizers and frozen random encoders as the keyword arguments of `StableDiffusion3Pipeline`."""
    tok = clip_tokenizer(words, cfg.max_length)
    tok_2 = clip_tokenizer(words, cfg.max_length)
    tok_3 = t5_tokenizer(words, cfg.max_length)
    return {
        "tokenizer": tok,
        "tokenizer_2": tok_2,
        "tokenizer_3": tok_3,
        "text_encoder": clip_text_encoder(len(tok), cfg.clip_hidden[0], cfg.clip_projection[0], cfg, seed + 1),
        "text_encoder_2": clip_text_encoder(len(tok_2), cfg.clip_hidden[1], cfg.clip_projection[1], cfg, seed + 2),
        "text_encoder_3": t5_text_encoder(len(tok_3), cfg, seed + 3),
    }
