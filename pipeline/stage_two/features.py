"""Stacker features (pure): text statistics, pair rules, head probabilities and blocks of the pooled vectors.

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
from pipeline.feature_table import BASE_PREFIX, LM_LAYER, LM_STATS, VectorKey

RULES = ("identical", "a_empty", "b_empty", "word_jaccard")
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


def rule_matrix(responses_a: Sequence[Sequence[str]], responses_b: Sequence[Sequence[str]]) -> np.ndarray:
    """Pair rules top teams hand-coded, as features the stacker can learn: identical responses (-> tie), an empty
    response (-> the other wins), and the word overlap of the two. Columns: identical, a_empty, b_empty,
    word_jaccard."""
    rows = []
    for a, b in zip(responses_a, responses_b):
        text_a, text_b = "\n".join(a).strip(), "\n".join(b).strip()
        words_a, words_b = set(text_a.lower().split()), set(text_b.lower().split())
        union = words_a | words_b
        rows.append([float(text_a == text_b), float(text_a == ""), float(text_b == ""),
                     len(words_a & words_b) / len(union) if union else 1.0])
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


@dataclass
class PairInputs:
    """Per-row inputs of the stacker in one A/B orientation. Any part may be None (feature group off)."""

    stats_a: np.ndarray | None = None       # (n, len(TEXT_STATS))
    stats_b: np.ndarray | None = None
    prompt_chars: np.ndarray | None = None  # (n,)
    head: np.ndarray | None = None          # (n, 3) head probabilities, this orientation's pass
    head_other: np.ndarray | None = None    # (n, 3) the other orientation's pass, mirrored into this one
    rules: np.ndarray | None = None         # (n, 4) see rule_matrix
    vectors: dict[str, np.ndarray] | None = None  # raw embed vectors "{layer}_{span}_{orientation}" (extraction)

    def take(self, index: np.ndarray) -> "PairInputs":
        """The inputs of rows `index` only."""
        part = lambda m: None if m is None else m[index]  # noqa: E731
        return PairInputs(part(self.stats_a), part(self.stats_b), part(self.prompt_chars), part(self.head),
                          part(self.head_other), part(self.rules),
                          None if self.vectors is None else {key: m[index] for key, m in self.vectors.items()})

    def swapped(self) -> "PairInputs":
        """The same pairs with response_a and response_b exchanged."""
        mirror = lambda p: None if p is None else swap_probabilities(p)  # noqa: E731
        rules = None if self.rules is None else self.rules[:, [0, 2, 1, 3]]
        vectors = None
        if self.vectors is not None:
            def mirrored(key: str) -> np.ndarray:
                other = VectorKey.parse(key).mirrored()
                # Without swap TTA there is no swapped pass: the one orientation stands in for both.
                return self.vectors.get(str(other), self.vectors.get(str(other.oriented("fwd"))))
            vectors = {key: mirrored(key) for key in self.vectors}
        return PairInputs(self.stats_b, self.stats_a, self.prompt_chars, mirror(self.head_other), mirror(self.head),
                          rules, vectors)


def feature_frame(inputs: PairInputs) -> pd.DataFrame:
    """Named columns of the text and rule parts that are set (the head group: stacking's head frame; the vector
    groups: vector_blocks, similarity_frame)."""
    columns: dict[str, np.ndarray] = {}
    if inputs.stats_a is not None:
        for j, name in enumerate(TEXT_STATS):
            a, b = inputs.stats_a[:, j], inputs.stats_b[:, j]
            columns[f"a_{name}"] = a
            columns[f"b_{name}"] = b
            columns[f"diff_{name}"] = a - b
            columns[f"logratio_{name}"] = np.log1p(a) - np.log1p(b)
        columns["prompt_chars"] = inputs.prompt_chars
    if inputs.rules is not None:
        for j, name in enumerate(RULES):
            columns[f"rule_{name}"] = inputs.rules[:, j]
    return pd.DataFrame(columns)


def text_inputs(frame: pd.DataFrame) -> PairInputs:
    """Text-statistics part of the inputs from tidy rows (see pipeline.data)."""
    return PairInputs(stats_a=stats_matrix(frame["response_a"]), stats_b=stats_matrix(frame["response_b"]),
                      prompt_chars=np.array([len("\n".join(t)) for t in frame["prompt"]], dtype=np.float64),
                      rules=rule_matrix(frame["response_a"], frame["response_b"]))


def _orientation_mean(vectors: dict[str, np.ndarray], layer: str, span: str, orientations: Sequence[str],
                      prefix: str = "") -> np.ndarray:
    keys = [str(VectorKey(layer, span, o, base=prefix == BASE_PREFIX)) for o in orientations]
    present = [vectors[k] for k in keys if k in vectors]
    if not present:
        raise KeyError(f"no vectors {', '.join(keys)} in the embed features")
    return np.mean(present, axis=0)


VECTOR_BLOCKS = ("diff", "sum", "a", "b", "prompt", "verdict", "verdict_diff")


def vector_blocks(vectors: dict[str, np.ndarray], layers: Sequence[str], kinds: Sequence[str],
                  orientations: Sequence[str], prefix: str = "") -> dict[str, np.ndarray]:
    """Raw vector blocks per layer before any reduction, e.g. `h050_diff`: response_a minus response_b (averaged
    over the chosen orientations), `sum`, `a`, `b`, `prompt`, and `verdict` (the last token, which sees the whole
    pair), and `verdict_diff`: the verdict vector of the forward pass minus the swapped pass's. Under an A/B swap
    (PairInputs.swapped) diff and verdict_diff change sign, a and b exchange, the rest stay."""
    unknown = [k for k in kinds if k not in VECTOR_BLOCKS]
    if unknown:
        raise ValueError(f"unknown vector block(s) {unknown}; choose from {VECTOR_BLOCKS}")
    blocks = {}
    for layer in layers:
        span = {name: (lambda name=name: _orientation_mean(vectors, layer, name, orientations, prefix))
                for name in ("a", "b", "prompt", "verdict")}
        for kind in kinds:
            if kind == "diff":
                blocks[f"{layer}_diff"] = span["a"]() - span["b"]()
            elif kind == "sum":
                blocks[f"{layer}_sum"] = span["a"]() + span["b"]()
            elif kind == "verdict_diff":
                blocks[f"{layer}_verdict_diff"] = (_orientation_mean(vectors, layer, "verdict", ["fwd"], prefix) -
                                                   _orientation_mean(vectors, layer, "verdict", ["swp"], prefix))
            else:
                blocks[f"{layer}_{kind}"] = span[kind]()
    return blocks


def _cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * y).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-8)


def similarity_frame(vectors: dict[str, np.ndarray], layers: Sequence[str], orientations: Sequence[str],
                     prefix: str = "") -> pd.DataFrame:
    """Compact per-layer summaries of the vectors: prompt-response and a-b cosine similarities and norms (a few
    columns instead of hundreds)."""
    columns = {}
    for layer in layers:
        a, b, p = (_orientation_mean(vectors, layer, s, orientations, prefix) for s in ("a", "b", "prompt"))
        cos_pa, cos_pb = _cosine(p, a), _cosine(p, b)
        norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        columns.update({f"{layer}_cos_pa": cos_pa, f"{layer}_cos_pb": cos_pb, f"{layer}_cos_pa_minus_pb": cos_pa - cos_pb,
                        f"{layer}_cos_ab": _cosine(a, b), f"{layer}_norm_a": norm_a, f"{layer}_norm_b": norm_b,
                        f"{layer}_norm_a_minus_b": norm_a - norm_b})
    return pd.DataFrame(columns)


def likelihood_frame(vectors: dict[str, np.ndarray], orientations: Sequence[str], prefix: str = "") -> pd.DataFrame:
    """The LM's own view of the pair (the fine-tuned model's, or the base model's with prefix `base_`): each
    response's mean token log-likelihood and entropy (averaged over the chosen orientations: in prompt|A|B response_b
    is read after response_a), their A-B differences, and the prompt's. Under an A/B swap a and b exchange, the
    differences change sign and the prompt's stay."""
    a, b, prompt = (_orientation_mean(vectors, LM_LAYER, span, orientations, prefix) for span in ("a", "b", "prompt"))
    columns = {}
    for j, stat in enumerate(LM_STATS):
        name = f"{prefix}lm_{stat}"
        columns.update({f"{name}_a": a[:, j], f"{name}_b": b[:, j], f"{name}_a_minus_b": a[:, j] - b[:, j],
                        f"{name}_prompt": prompt[:, j]})
    return pd.DataFrame(columns)
