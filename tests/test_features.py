"""Stacker features: each response's statistics come from that response, and features mirror under A/B swap."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.features import PairInputs, TEXT_STATS, feature_frame, pair_vectors, text_inputs, text_stats


def test_text_stats_counts_markdown():
    stats = text_stats(["# Title\n- one\n- two\n1. three\n```py\nx\n```\n**bold** ok?", "second turn"])
    assert stats["turns"] == 2 and stats["headers"] == 1 and stats["list_items"] == 3
    assert stats["code_blocks"] == 1 and stats["bold"] == 1 and stats["questions"] == 1
    assert stats["chars"] == len("# Title\n- one\n- two\n1. three\n```py\nx\n```\n**bold** ok?\nsecond turn")


def test_each_side_uses_its_own_response():
    frame = pd.DataFrame({"prompt": [["p"]], "response_a": [["a a a"]], "response_b": [["b"]]})
    features = feature_frame(text_inputs(frame), [])
    assert features.loc[0, "a_words"] == 3 and features.loc[0, "b_words"] == 1
    assert features.loc[0, "diff_words"] == 2


def random_inputs(n=20, d=5, seed=0) -> PairInputs:
    rng = np.random.default_rng(seed)
    head = rng.dirichlet([1, 1, 1], n)
    return PairInputs(rng.integers(0, 50, (n, len(TEXT_STATS))).astype(float),
                      rng.integers(0, 50, (n, len(TEXT_STATS))).astype(float), rng.random(n) * 100,
                      head, rng.dirichlet([1, 1, 1], n), rng.normal(size=(n, d)), rng.normal(size=(n, d)))


def test_features_mirror_under_swap():
    pair = random_inputs()
    kinds = ["a", "b", "diff", "absdiff", "prod"]
    original = feature_frame(pair, kinds)
    swapped = feature_frame(pair.swapped(), kinds)
    assert list(original.columns) == list(swapped.columns)
    for column in original.columns:
        prefix = column.split("_")[0]
        if column.startswith(("a_", "vec_a_")):
            other = column.replace("a_", "b_", 1)
            np.testing.assert_allclose(swapped[column], original[other])
        elif column.startswith(("diff_", "logratio_", "vec_diff_")):
            np.testing.assert_allclose(swapped[column], -original[column])
        elif column.startswith(("head_", "head_other_", "head_mean_")):
            name = column.rsplit("_", 1)[1]
            mirror = {"a": "b", "b": "a", "tie": "tie"}[name]
            np.testing.assert_allclose(swapped[column], original[column.rsplit("_", 1)[0] + "_" + mirror])
        elif prefix in ("prompt",) or column.startswith(("vec_absdiff_", "vec_prod_")):
            np.testing.assert_allclose(swapped[column], original[column])
    # Swapping twice gives the original back.
    pd.testing.assert_frame_equal(feature_frame(pair.swapped().swapped(), kinds), original)


def test_pair_vectors():
    a, b = np.array([[1.0, -2.0]]), np.array([[3.0, 1.0]])
    out = pair_vectors(a, b, ["diff", "absdiff", "prod"])
    assert out["diff"].tolist() == [[-2.0, -3.0]]
    assert out["absdiff"].tolist() == [[2.0, 3.0]]
    assert out["prod"].tolist() == [[3.0, -2.0]]
