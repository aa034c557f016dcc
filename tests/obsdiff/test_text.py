from obsdiff.models.text import clip_tokenizer, clip_vocab_and_merges, t5_tokenizer

WORDS = ["a", "handwritten", "digit", "seven", "7", "the", "number", "sloppy", "sevens", "neat"]


def test_clip_tokenizer_gives_one_token_per_known_word():
    tok = clip_tokenizer(WORDS, max_length=8)
    ids = tok("a sloppy handwritten sevens").input_ids
    assert len(ids) == 4 + 2  # bos + four words + eos
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "sloppy</w>", "handwritten</w>", "sevens</w>"]
    padded = tok(["the number 7"], padding="max_length", max_length=8).input_ids[0]
    assert len(padded) == 8


def test_clip_unknown_word_falls_back_to_characters():
    vocab, _ = clip_vocab_and_merges(WORDS)
    tok = clip_tokenizer(WORDS, max_length=16)
    pieces = tok.convert_ids_to_tokens(tok("tan").input_ids[1:-1])
    assert all(p in vocab for p in pieces) and len(pieces) > 1


def test_t5_tokenizer_whole_words_and_roundtrip(tmp_path):
    tok = t5_tokenizer(WORDS, max_length=8)
    ids = tok("the number 7").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁the", "▁number", "▁7", "</s>"]
    tok.save_pretrained(tmp_path)
    from transformers import T5Tokenizer

    assert T5Tokenizer.from_pretrained(tmp_path)("the number 7").input_ids == ids
