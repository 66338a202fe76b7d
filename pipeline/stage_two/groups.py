"""Stage two's feature groups: each a name, the inputs it reads and the columns it builds (pure, given the fitted
vector reducers). A member names the groups it reads (`stack.members.<name>.groups`); a new group is one class here
registered in GROUPS.

What a group reads (`reads`) is checked against what the embed settings make before anything runs
(`StackSpec.check_inputs`): `text` and `head` always exist, `vectors` and `likelihoods` are the pooled vectors
and the LM's span likelihoods of the model `stack.vectors.source` names (embed.base_vectors for the base model's,
embed.lm_features for likelihoods).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pandas as pd

from pipeline.errors import UserError
from pipeline.stage_two.features import PairInputs, feature_frame, likelihood_frame, similarity_frame, vector_blocks

if TYPE_CHECKING:
    from sklearn.decomposition import PCA

EPS = 1e-7
INPUTS = ("text", "head", "vectors", "likelihoods")  # what a group may read (see the module docstring)


class FeatureGroup:
    """One feature group: `frame` gives its columns for a set of pairs, A/B-mirrored by construction."""

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]]
    reduced: ClassVar[bool] = False  # reads the vector blocks a fold's PCA reduces (fitted only when some group is)

    def frame(self, pair: PairInputs, vectors: dict, reducers: dict[str, PCA]) -> pd.DataFrame:
        raise NotImplementedError


class TextGroup(FeatureGroup):
    """Length and markup statistics of both responses and the prompt's length."""

    name, reads = "text", ("text",)

    def frame(self, pair: PairInputs, vectors: dict, reducers: dict[str, PCA]) -> pd.DataFrame:
        return feature_frame(PairInputs(stats_a=pair.stats_a, stats_b=pair.stats_b, prompt_chars=pair.prompt_chars))


class RulesGroup(FeatureGroup):
    """Pair rules: empty responses, identical responses, word overlap."""

    name, reads = "rules", ("text",)

    def frame(self, pair: PairInputs, vectors: dict, reducers: dict[str, PCA]) -> pd.DataFrame:
        return feature_frame(PairInputs(rules=pair.rules))


class HeadGroup(FeatureGroup):
    """The head's log-probabilities of each orientation and of their mean."""

    name, reads = "head", ("head",)

    def frame(self, pair: PairInputs, vectors: dict, reducers: dict[str, PCA]) -> pd.DataFrame:
        both = (pair.head + pair.head_other) / 2
        columns = {}
        for j, side in enumerate(("a", "b", "tie")):
            columns[f"head_log_{side}"] = np.log(np.clip(pair.head[:, j], EPS, 1))
            columns[f"head_other_log_{side}"] = np.log(np.clip(pair.head_other[:, j], EPS, 1))
            columns[f"head_mean_log_{side}"] = np.log(np.clip(both[:, j], EPS, 1))
        return pd.DataFrame(columns)


class SummaryGroup(FeatureGroup):
    """Cosine similarities between the span vectors, per layer."""

    name, reads = "summary", ("vectors",)

    def frame(self, pair: PairInputs, vectors: dict, reducers: dict[str, PCA]) -> pd.DataFrame:
        return similarity_frame(pair.vectors, vectors["layers"], vectors["orientations"], vectors["prefix"])


class LikelihoodGroup(FeatureGroup):
    """The LM's mean token log-likelihood and entropy of each span."""

    name, reads = "likelihood", ("likelihoods",)

    def frame(self, pair: PairInputs, vectors: dict, reducers: dict[str, PCA]) -> pd.DataFrame:
        try:
            return likelihood_frame(pair.vectors, vectors["orientations"], vectors["prefix"])
        except KeyError:
            raise UserError("the stack group `likelihood` reads the LM's span likelihoods (of the model "
                            "stack.vectors.source names), which the embed features lack; run stage=embed with "
                            "embed.lm_features=true") from None


class VectorsGroup(FeatureGroup):
    """The vector blocks (`stack.vectors.kinds`), each reduced by its fold's PCA when one was fitted."""

    name, reads, reduced = "vectors", ("vectors",), True

    def frame(self, pair: PairInputs, vectors: dict, reducers: dict[str, PCA]) -> pd.DataFrame:
        blocks = vector_blocks(pair.vectors, vectors["layers"], vectors["kinds"], vectors["orientations"],
                               vectors["prefix"])
        parts = []
        for name, block in blocks.items():
            reduced = reducers[name].transform(block) if name in reducers else block
            parts.append(pd.DataFrame(reduced, columns=[f"{name}_{j}" for j in range(reduced.shape[1])]))
        return pd.concat(parts, axis=1)


GROUPS: dict[str, FeatureGroup] = {g.name: g for g in (TextGroup(), RulesGroup(), HeadGroup(), SummaryGroup(),
                                                          VectorsGroup(), LikelihoodGroup())}


def group_frame(pair: PairInputs, group: str, vectors: dict, reducers: dict[str, PCA]) -> pd.DataFrame:
    """One feature group's columns (pure given fitted reducers)."""
    if group not in GROUPS:
        raise UserError(f"unknown stack feature group {group!r}; choose from {', '.join(GROUPS)}")
    return GROUPS[group].frame(pair, vectors, reducers)

