"""Stacker features (pure): text statistics, head probabilities and pooled response vectors.

Every feature has a mirror under an A/B swap: `a_*` and `b_*` exchange, differences change sign, symmetric
ones stay. `PairInputs.swapped()` builds the inputs of the swapped pair, so symmetric augmentation and the
mirroring tests use the same code as training.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.data import swap_probabilities

VECTOR_KINDS = ("a", "b", "diff", "absdiff", "prod")
TEXT_STATS = ("chars", "words", "turns", "newlines", "headers", "code_blocks", "list_items", "bold", "questions")
_HEADER = re.compile(r"^\s{0,3}#{1,6}\s", re.MULTILINE)
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+", re.MULTILINE)


def text_stats(turns: Sequence[str]) -> dict[str, float]:
    """Cheap statistics of one response (all turns)."""
    text = "\n".join(turns)
    return {
        "chars": len(text),
        "words": len(text.split()),
        "turns": len(turns),
        "newlines": text.count("\n"),
        "headers": len(_HEADER.findall(text)),
        "code_blocks": text.count("```") // 2,
        "list_items": len(_LIST_ITEM.findall(text)),
        "bold": text.count("**") // 2,
        "questions": text.count("?"),
    }


def stats_matrix(responses: Sequence[Sequence[str]]) -> np.ndarray:
    """(n, len(TEXT_STATS)) statistics for one response column."""
    return np.array([[s[k] for k in TEXT_STATS] for s in map(text_stats, responses)], dtype=np.float64)


def pair_vectors(a: np.ndarray, b: np.ndarray, kinds: Sequence[str]) -> dict[str, np.ndarray]:
    """Vector features of a pair from the two responses' vectors."""
    table = {"a": lambda: a, "b": lambda: b, "diff": lambda: a - b, "absdiff": lambda: np.abs(a - b),
             "prod": lambda: a * b}
    unknown = [k for k in kinds if k not in table]
    if unknown:
        raise ValueError(f"unknown vector kind(s) {unknown}; choose from {VECTOR_KINDS}")
    return {k: table[k]() for k in kinds}


@dataclass
class PairInputs:
    """Per-row inputs of the stacker in one A/B orientation. Any part may be None (feature group off)."""

    stats_a: np.ndarray | None = None       # (n, len(TEXT_STATS))
    stats_b: np.ndarray | None = None
    prompt_chars: np.ndarray | None = None  # (n,)
    head: np.ndarray | None = None          # (n, 3) head probabilities, this orientation's pass
    head_other: np.ndarray | None = None    # (n, 3) the other orientation's pass, mirrored into this one
    vec_a: np.ndarray | None = None         # (n, d) response vectors (after any reduction)
    vec_b: np.ndarray | None = None

    def swapped(self) -> "PairInputs":
        """The same pairs with response_a and response_b exchanged."""
        mirror = lambda p: None if p is None else swap_probabilities(p)  # noqa: E731
        return PairInputs(self.stats_b, self.stats_a, self.prompt_chars, mirror(self.head), mirror(self.head_other),
                          self.vec_b, self.vec_a)


def feature_frame(inputs: PairInputs, vector_kinds: Sequence[str]) -> pd.DataFrame:
    """The stacker's feature matrix, with named columns."""
    columns: dict[str, np.ndarray] = {}
    if inputs.stats_a is not None:
        for j, name in enumerate(TEXT_STATS):
            a, b = inputs.stats_a[:, j], inputs.stats_b[:, j]
            columns[f"a_{name}"] = a
            columns[f"b_{name}"] = b
            columns[f"diff_{name}"] = a - b
            columns[f"logratio_{name}"] = np.log1p(a) - np.log1p(b)
        columns["prompt_chars"] = inputs.prompt_chars
    if inputs.head is not None:
        both = (inputs.head + inputs.head_other) / 2
        for j, name in enumerate(("a", "b", "tie")):
            columns[f"head_{name}"] = inputs.head[:, j]
            columns[f"head_other_{name}"] = inputs.head_other[:, j]
            columns[f"head_mean_{name}"] = both[:, j]
    if inputs.vec_a is not None:
        for kind, matrix in pair_vectors(inputs.vec_a, inputs.vec_b, vector_kinds).items():
            for j in range(matrix.shape[1]):
                columns[f"vec_{kind}_{j}"] = matrix[:, j]
    return pd.DataFrame(columns)


def text_inputs(frame: pd.DataFrame) -> PairInputs:
    """Text-statistics part of the inputs from tidy rows (see pipeline.data)."""
    return PairInputs(stats_a=stats_matrix(frame["response_a"]), stats_b=stats_matrix(frame["response_b"]),
                      prompt_chars=np.array([len("\n".join(t)) for t in frame["prompt"]], dtype=np.float64))
