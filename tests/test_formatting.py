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
