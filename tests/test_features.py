"""Stacker features: each response's statistics come from that response, and features mirror under A/B swap."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.feature_table import SPANS, VectorKey
from pipeline.stage_two.features import (TEXT_STATS, PairInputs, feature_frame, likelihood_frame, rule_matrix,
                                         similarity_frame, text_inputs, text_stats, vector_blocks)


def test_text_stats_counts_markdown():
    stats = text_stats(["# Title\n- one\n- two\n1. three\n```py\nx\n```\n**bold** ok?", "second turn"])
    assert stats["turns"] == 2 and stats["headers"] == 1 and stats["list_items"] == 3
    assert stats["code_blocks"] == 1 and stats["bold"] == 1 and stats["questions"] == 1
    assert stats["chars"] == len("# Title\n- one\n- two\n1. three\n```py\nx\n```\n**bold** ok?\nsecond turn")


def test_each_side_uses_its_own_response():
    frame = pd.DataFrame({"prompt": [["p"]], "response_a": [["a a a"]], "response_b": [["b"]]})
    features = feature_frame(text_inputs(frame))
    assert features.loc[0, "a_words"] == 3 and features.loc[0, "b_words"] == 1
    assert features.loc[0, "diff_words"] == 2


def random_inputs(n=20, d=5, seed=0) -> PairInputs:
    rng = np.random.default_rng(seed)
    head = rng.dirichlet([1, 1, 1], n)
    return PairInputs(stats_a=rng.integers(0, 50, (n, len(TEXT_STATS))).astype(float),
                      stats_b=rng.integers(0, 50, (n, len(TEXT_STATS))).astype(float), prompt_chars=rng.random(n) * 100,
                      head=head, head_other=rng.dirichlet([1, 1, 1], n), rules=rule_matrix(
                          [["x"], [""]] * (n // 2), [["x"], ["y z"]] * (n // 2)))


def assert_mirrors(original: pd.DataFrame, swapped: pd.DataFrame) -> None:
    """Every column of the swapped pair's features is the original's mirror (fails on a column it cannot place)."""
    assert list(original.columns) == list(swapped.columns)
    side = {"a": "b", "b": "a", "tie": "tie"}
    for column in original.columns:
        if column.startswith(("a_", "b_")):
            np.testing.assert_allclose(swapped[column], original[side[column[0]] + column[1:]])
        elif column.startswith(("diff_", "logratio_")):
            np.testing.assert_allclose(swapped[column], -original[column])
        elif column.startswith("head"):
            # The swapped pair's forward pass is this pair's swapped pass: head and head_other exchange, mirrored.
            stem, name = column.rsplit("_", 1)
            other = stem.replace("head_other", "HEAD").replace("head", "head_other").replace("HEAD", "head") \
                if "mean" not in stem else stem
            np.testing.assert_allclose(swapped[column], original[f"{other}_{side[name]}"])
        elif column in ("rule_a_empty", "rule_b_empty"):
            np.testing.assert_allclose(swapped[column], original[column.replace(column[5], side[column[5]], 1)])
        elif column in ("prompt_chars", "rule_identical", "rule_word_jaccard"):
            np.testing.assert_allclose(swapped[column], original[column])
        else:
            raise AssertionError(f"no mirror rule for column {column}")


def test_features_mirror_under_swap():
    pair = random_inputs()
    original, swapped = feature_frame(pair), feature_frame(pair.swapped())
    assert_mirrors(original, swapped)
    # Swapping twice gives the original back.
    pd.testing.assert_frame_equal(feature_frame(pair.swapped().swapped()), original)


def test_head_log_features_mirror_under_swap():
    from pipeline.stage_two.groups import group_frame

    pair = random_inputs()
    assert_mirrors(group_frame(pair, "head", {}, {}), group_frame(pair.swapped(), "head", {}, {}))


def test_pair_rules_and_their_mirror():
    rules = rule_matrix([["same"], [""], ["x y"]], [["same"], ["text"], ["y z"]])
    np.testing.assert_allclose(rules, [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1 / 3]])
    pair = PairInputs(rules=rules)
    frame, swapped = feature_frame(pair), feature_frame(pair.swapped())
    np.testing.assert_allclose(swapped["rule_a_empty"], frame["rule_b_empty"])  # row 1: b is now the empty one
    assert swapped.loc[1, "rule_b_empty"] == 1 and frame.loc[1, "rule_a_empty"] == 1
    np.testing.assert_allclose(swapped["rule_identical"], frame["rule_identical"])


def raw_vectors(n=8, d=4, seed=0, orientations=("fwd", "swp")) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{prefix}h050_{span}_{o}": rng.normal(size=(n, d)) for prefix in ("", "base_")
            for span in ("prompt", "a", "b", "verdict") for o in orientations}


def mirror(key: str, spans=SPANS) -> str:
    return str(VectorKey.parse(key, spans).mirrored())


def test_vector_key_mirrors_and_round_trips():
    assert mirror("h050_a_fwd") == "h050_b_swp"
    assert mirror("base_h100_verdict_swp") == "base_h100_verdict_fwd"
    assert mirror("h075_prompt_fwd") == "h075_prompt_swp"
    for key in ("h050_a_fwd", "base_h100_verdict_swp"):
        assert str(VectorKey.parse(key)) == key
    assert not VectorKey.is_vector("head") and not VectorKey.is_vector("h050_a") and not VectorKey.is_vector("a_fwd")


def test_vector_key_with_underscores_in_layer_and_span_names_still_mirrors():
    """A layer named `layer_10` and a span named `tool_call` beside `a` / `b`: parsing matches known spans, so a
    and b still swap (string splitting would have taken `10` as the layer and left a and b unswapped)."""
    spans = (*SPANS, "tool_call")
    assert mirror("layer_10_a_fwd", spans) == "layer_10_b_swp"
    assert mirror("base_layer_10_b_swp", spans) == "base_layer_10_a_fwd"
    key = VectorKey.parse("layer_10_tool_call_fwd", spans)
    assert (key.layer, key.span, key.orientation) == ("layer_10", "tool_call", "fwd")
    assert mirror("layer_10_tool_call_fwd", spans) == "layer_10_tool_call_swp"


def test_vector_blocks_mirror_under_swap():
    pair = PairInputs(vectors=raw_vectors())
    kinds = ["diff", "sum", "a", "b", "prompt", "verdict", "verdict_diff"]
    for prefix in ("", "base_"):
        original = vector_blocks(pair.vectors, ["h050"], kinds, ["fwd", "swp"], prefix)
        swapped = vector_blocks(pair.swapped().vectors, ["h050"], kinds, ["fwd", "swp"], prefix)
        np.testing.assert_allclose(swapped["h050_diff"], -original["h050_diff"])
        np.testing.assert_allclose(swapped["h050_verdict_diff"], -original["h050_verdict_diff"])
        np.testing.assert_allclose(swapped["h050_a"], original["h050_b"])
        for symmetric in ("sum", "prompt", "verdict"):
            np.testing.assert_allclose(swapped[f"h050_{symmetric}"], original[f"h050_{symmetric}"])


def test_vector_blocks_read_response_a_for_a():
    """A case that fails if a and b are mixed up: only response_a's vectors carry an offset."""
    vectors = raw_vectors()
    for o in ("fwd", "swp"):
        vectors[f"h050_a_{o}"] = vectors[f"h050_a_{o}"] * 0 + 5.0
        vectors[f"h050_b_{o}"] = vectors[f"h050_b_{o}"] * 0
    blocks = vector_blocks(vectors, ["h050"], ["diff", "a", "b"], ["fwd", "swp"])
    assert (blocks["h050_diff"] == 5).all() and (blocks["h050_a"] == 5).all() and (blocks["h050_b"] == 0).all()


def test_single_orientation_stands_in_for_both_without_tta():
    pair = PairInputs(vectors=raw_vectors(orientations=("fwd",)))
    original = vector_blocks(pair.vectors, ["h050"], ["diff"], ["fwd"])
    swapped = vector_blocks(pair.swapped().vectors, ["h050"], ["diff"], ["fwd"])
    np.testing.assert_allclose(swapped["h050_diff"], -original["h050_diff"])


def test_similarity_summaries_mirror_and_name_their_side():
    pair = PairInputs(vectors=raw_vectors())
    original = similarity_frame(pair.vectors, ["h050"], ["fwd", "swp"])
    swapped = similarity_frame(pair.swapped().vectors, ["h050"], ["fwd", "swp"])
    np.testing.assert_allclose(swapped["h050_cos_pa"], original["h050_cos_pb"])
    np.testing.assert_allclose(swapped["h050_cos_pa_minus_pb"], -original["h050_cos_pa_minus_pb"])
    np.testing.assert_allclose(swapped["h050_norm_a"], original["h050_norm_b"])
    np.testing.assert_allclose(swapped["h050_cos_ab"], original["h050_cos_ab"])
    vectors = raw_vectors()
    for o in ("fwd", "swp"):
        vectors[f"h050_a_{o}"] = vectors[f"h050_prompt_{o}"].copy()  # response_a repeats the prompt's vector
    same = similarity_frame(vectors, ["h050"], ["fwd", "swp"])
    np.testing.assert_allclose(same["h050_cos_pa"], 1.0, atol=1e-6)
    assert (same["h050_cos_pb"] < 0.99).all()


def lm_columns(orientations=("fwd", "swp"), prefixes=("", "base_"), seed=1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{p}lm_{span}_{o}": rng.normal(size=(12, 2)) for p in prefixes for span in ("prompt", "a", "b")
            for o in orientations}


def test_likelihood_features_mirror_under_swap():
    """Each response's log-likelihood and entropy exchange with the other's, A-B differences change sign and the
    prompt's stay, for the fine-tuned and the base model's columns alike."""
    pair = PairInputs(vectors={**raw_vectors(), **lm_columns()})
    for prefix in ("", "base_"):
        original = likelihood_frame(pair.vectors, ["fwd", "swp"], prefix)
        swapped = likelihood_frame(pair.swapped().vectors, ["fwd", "swp"], prefix)
        assert list(original.columns) == list(swapped.columns) and len(original.columns) == 2 * 4
        assert all(c.startswith(f"{prefix}lm_") for c in original.columns)
        for column in original.columns:
            if column.endswith("_a_minus_b"):
                np.testing.assert_allclose(swapped[column], -original[column])
            elif column.endswith(("_a", "_b")):
                np.testing.assert_allclose(swapped[column], original[column[:-1] + {"a": "b", "b": "a"}[column[-1]]])
            else:
                assert column.endswith("_prompt")
                np.testing.assert_allclose(swapped[column], original[column])


def test_likelihood_features_read_response_a_for_a():
    vectors = lm_columns(prefixes=("",))
    for o in ("fwd", "swp"):
        vectors[f"lm_a_{o}"][:] = [-1.0, 2.0]
        vectors[f"lm_b_{o}"][:] = [-3.0, 0.5]
    frame = likelihood_frame(vectors, ["fwd", "swp"])
    assert (frame["lm_loglik_a"] == -1).all() and (frame["lm_loglik_a_minus_b"] == 2).all()
    assert (frame["lm_entropy_b"] == 0.5).all()


def test_likelihood_columns_are_not_a_vector_layer():
    """`lm_*` columns parse as vector keys (so they mirror) but never feed the vectors / summary groups."""
    from pipeline.stage_two.spec import available_layers

    assert available_layers({**raw_vectors(), **lm_columns()}) == ["h050"]
    assert available_layers({**raw_vectors(), **lm_columns()}, base=True) == ["h050"]
