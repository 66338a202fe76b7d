"""Prompt building: fair per-segment budgets, truncation sides, exact response spans."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.formatting import MARKERS, allocate_budget, assemble, encode_pairs, segment_text, truncate


def char_tokenize(texts):
    """One token per character: makes spans easy to check by decoding."""
    return [[ord(c) for c in t] for t in texts]


def decode(ids):
    return "".join(map(chr, ids))


def encode_one(prompt, a, b, max_length=400, fraction=0.3, side="left"):
    return encode_pairs(char_tokenize, [[prompt]], [[a]], [[b]], max_length, fraction, side)[0]


FIXED = sum(len(m) for m in MARKERS)


def test_allocate_budget_water_fills():
    assert allocate_budget([10, 10, 10], 100, [None] * 3) == [10, 10, 10]
    assert allocate_budget([5, 1000, 1000], 95, [None] * 3) == [5, 45, 45]
    assert allocate_budget([1000, 1000, 1000], 90, [20, None, None]) == [20, 35, 35]
    assert allocate_budget([0, 7, 1000], 20, [None] * 3) == [0, 7, 13]
    assert sum(allocate_budget([50, 50, 50], 100, [None] * 3)) == 100
    assert allocate_budget([3, 3, 3], 2, [None] * 3) == [1, 1, 0]


def test_one_long_response_cannot_starve_the_other():
    enc = encode_one("Q?", "x" * 5000, "short answer", max_length=FIXED + 200)
    assert decode(enc.input_ids[slice(*enc.span_b)]) == "short answer"
    assert enc.span_a[1] - enc.span_a[0] == 200 - 2 - len("short answer")
    assert len(enc.input_ids) == FIXED + 200
    assert enc.n_truncated == 5000 - (enc.span_a[1] - enc.span_a[0])


@pytest.mark.parametrize("side, kept", [("left", "6789"), ("right", "0123")])
def test_truncation_side(side, kept):
    assert decode(truncate(char_tokenize(["0123456789"])[0], 4, side)) == kept
    enc = encode_one("p", "0123456789", "0123456789", max_length=FIXED + 9, side=side)
    assert decode(enc.input_ids[slice(*enc.span_a)]) == kept


def test_spans_cover_exactly_the_responses_and_sequence_ends_with_marker():
    enc = encode_one("What?", "first", "second")
    assert decode(enc.input_ids[slice(*enc.span_a)]) == "first"
    assert decode(enc.input_ids[slice(*enc.span_b)]) == "second"
    assert decode(enc.input_ids).endswith(MARKERS[-1])
    assert decode(enc.input_ids[: enc.span_a[0]]).endswith(MARKERS[1])
    assert decode(enc.input_ids[: enc.span_b[0]]).endswith(MARKERS[2])


def test_multi_turn_and_empty_response():
    assert segment_text(["one"]) == "one"
    assert segment_text(["one", "two"]) == "[turn 1] one\n[turn 2] two"
    enc = encode_one("p", "", "b")
    assert enc.span_a[0] == enc.span_a[1]
    assert decode(enc.input_ids[slice(*enc.span_b)]) == "b"


def test_prompt_is_capped_but_uses_leftover():
    enc = encode_one("~" * 1000, "a", "b", max_length=FIXED + 100, fraction=0.3)
    assert enc.input_ids.count(ord("~")) == 30
    enc = encode_one("~" * 10, "a", "b", max_length=FIXED + 100, fraction=0.3)
    assert enc.input_ids.count(ord("~")) == 10


def test_max_length_too_small_is_a_user_error():
    with pytest.raises(UserError, match="model.max_length"):
        assemble(char_tokenize(list(MARKERS)), [1], [2], [3], FIXED + 1, 0.3, "left")
    with pytest.raises(UserError, match="truncation_side"):
        assemble(char_tokenize(list(MARKERS)), [1], [2], [3], FIXED + 10, 0.3, "middle")


def test_a_bos_prefix_starts_the_pair_and_the_spans_stay_exact():
    """With a BOS (Llama-3, Gemma) the pair starts with it, the budget counts it (the pair still fits
    max_length), and every span still decodes to exactly its text."""
    bos = [1]
    plain = encode_pairs(char_tokenize, [["p" * 50]], [["a" * 80]], [["b" * 80]], FIXED + 60, 0.3, "left")[0]
    with_bos = encode_pairs(char_tokenize, [["p" * 50]], [["a" * 80]], [["b" * 80]], FIXED + 60, 0.3, "left",
                            prefix_ids=bos)[0]
    assert with_bos.input_ids[0] == 1 and plain.input_ids[0] != 1
    assert len(with_bos.input_ids) == len(plain.input_ids) == FIXED + 60
    assert with_bos.n_truncated == plain.n_truncated + 1
    for enc in (plain, with_bos):
        assert set(decode(enc.input_ids[slice(*enc.span_a)])) == {"a"}
        assert set(decode(enc.input_ids[slice(*enc.span_b)])) == {"b"}
        assert set(decode(enc.input_ids[slice(*enc.span_prompt)])) == {"p"}
    short = encode_pairs(char_tokenize, [["p"]], [["xyz"]], [["b"]], 400, 0.3, "left", prefix_ids=bos)[0]
    assert decode(short.input_ids[slice(*short.span_a)]) == "xyz" and short.span_prompt[0] == 1 + len(MARKERS[0])


@pytest.mark.parametrize("family, adds_bos", [("llama", False), ("llama3", True), ("gemma2", True), ("qwen2", False)])
def test_bos_comes_from_what_the_tokenizer_adds(family, adds_bos, tmp_path):
    """The prefix is asked of the tokenizer (no family table): a tokenizer that adds a BOS by default gets it at
    the start of every pair, one that adds none gets nothing; response spans decode to the response either way."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from pipeline.formatting import leading_special_ids
    from pipeline.llm.tiny import build_tiny

    build_tiny(tmp_path, OmegaConf.create({"family": family, "hidden_size": 16, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "num_key_value_heads": 1,
                                           "intermediate_size": 32}))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    lead = leading_special_ids(tokenizer)
    assert lead == ([tokenizer.bos_token_id] if adds_bos else [])
    tokenize = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    enc = encode_pairs(tokenize, [["Hi?"]], [["Sure, here it is."]], [["No."]], 400, 0.3, "left", lead)[0]
    assert (enc.input_ids[0] == tokenizer.bos_token_id) == adds_bos
    assert tokenizer.decode(enc.input_ids[slice(*enc.span_a)]) == "Sure, here it is."
    assert tokenizer.decode(enc.input_ids[slice(*enc.span_b)]) == "No."
