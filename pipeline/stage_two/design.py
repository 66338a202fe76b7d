"""Stage two's design matrices: the members' inputs read from the feature table, the PCA reductions fitted per
outer fold (unsupervised), and each member's columns in both A/B orientations."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from pipeline.feature_table import PassFeatures
from pipeline.stage_two.features import PairInputs, text_inputs, vector_blocks
from pipeline.stage_two.groups import group_frame
from pipeline.stage_two.members import Design


def stacker_inputs(frame: pd.DataFrame, features: PassFeatures) -> PairInputs:
    """Everything the members may read, for the rows of `frame`, from the embed stage's feature table."""
    return replace(text_inputs(frame), head=features.head, head_other=features.head_swapped,
                   vectors={**features.vectors, **features.likelihoods})


def head_prediction(pair: PairInputs) -> np.ndarray:
    return (pair.head + pair.head_other) / 2


def fit_reducers(pair: PairInputs, index: np.ndarray, vectors: dict, n_components: int, seed: int) -> dict[str, PCA]:
    """PCA per vector block, fitted on the training rows in both orientations (so a reduced diff still changes
    sign under a swap). Unsupervised: it never reads a label."""
    if n_components <= 0:
        return {}
    rows = lambda p: replace(p, vectors={k: v[index] for k, v in p.vectors.items()})  # noqa: E731
    original = vector_blocks(rows(pair).vectors, vectors["layers"], vectors["kinds"], vectors["orientations"],
                             vectors["prefix"])
    mirrored = vector_blocks(rows(pair.swapped()).vectors, vectors["layers"], vectors["kinds"],
                             vectors["orientations"], vectors["prefix"])
    reducers = {}
    for name, block in original.items():
        both = np.concatenate([block, mirrored[name]])
        pca = PCA(n_components=min(n_components, *both.shape), random_state=seed).fit(both)
        # C-ordered components: an export stores them so, and a matmul's last bit depends on the memory layout
        # (the solver can return a reversed view), so the model that scores here is the one an export rebuilds.
        pca.components_ = np.ascontiguousarray(pca.components_)
        reducers[name] = pca
    return reducers


def design(pair: PairInputs, groups: list[str], vectors: dict, reducers: dict[str, PCA]) -> Design:
    def build(p: PairInputs) -> pd.DataFrame:
        return pd.concat([group_frame(p, g, vectors, reducers) for g in groups], axis=1)

    original = build(pair)
    return Design(original.to_numpy(np.float64), build(pair.swapped()).to_numpy(np.float64), list(original.columns))
