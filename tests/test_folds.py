"""Folds: grouped by prompt, stratified by label, seeded, persisted and checked on reuse."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import UserError
from pipeline.folds import assign_folds, load_or_create, prompt_groups


def synthetic(n=600, n_prompts=150, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(0, n_prompts, n)
    return pd.DataFrame({"id": [str(i) for i in range(n)], "prompt": [[f"prompt {p}"] for p in prompt_ids],
                         "label": rng.choice(3, n, p=[0.45, 0.4, 0.15])})


def test_identical_prompts_never_straddle_folds():
    data = synthetic()
    folds = assign_folds(data["label"].to_numpy(), prompt_groups(data["prompt"]), 5, seed=1)
    per_prompt = pd.DataFrame({"p": data["prompt"].map(tuple), "f": folds}).groupby("p")["f"].nunique()
    assert (per_prompt == 1).all()
    assert set(folds) == set(range(5))


def test_label_shares_are_balanced():
    data = synthetic(n=3000, n_prompts=1500)
    labels = data["label"].to_numpy()
    folds = assign_folds(labels, prompt_groups(data["prompt"]), 5, seed=2)
    overall = np.bincount(labels, minlength=3) / len(labels)
    for k in range(5):
        share = np.bincount(labels[folds == k], minlength=3) / (folds == k).sum()
        assert np.abs(share - overall).max() < 0.03


def test_deterministic_per_seed():
    data = synthetic()
    args = (data["label"].to_numpy(), prompt_groups(data["prompt"]), 4)
    assert (assign_folds(*args, seed=3) == assign_folds(*args, seed=3)).all()
    assert (assign_folds(*args, seed=3) != assign_folds(*args, seed=4)).any()


def test_too_few_prompts():
    data = synthetic(n=20, n_prompts=2)
    with pytest.raises(UserError, match="only 2 distinct groups"):
        assign_folds(data["label"].to_numpy(), prompt_groups(data["prompt"]), 3, seed=0)


def test_persisted_once_and_checked(tmp_path):
    data = synthetic()
    first = load_or_create(tmp_path, data, 5, seed=0)
    assert first.equals(load_or_create(tmp_path, data, 5, seed=0))
    assert list(pd.read_parquet(tmp_path / "folds.parquet").columns) == ["id", "fold"]
    # Folds made with another seed or grouping are never reused silently ...
    with pytest.raises(UserError, match=r"assigned with other settings \(seed: 0 -> 99"):
        load_or_create(tmp_path, data, 5, seed=99)
    with pytest.raises(UserError, match=r"group_by: 'prompt' -> 'source'"):
        load_or_create(tmp_path, data.assign(source="x"), 5, seed=0, group_by="source")
    # ... while a folds file from before the settings were recorded is still read.
    first.to_parquet(tmp_path / "folds.parquet", index=False)
    assert first.equals(load_or_create(tmp_path, data, 5, seed=99))
    with pytest.raises(UserError, match="other data or another cv.n_folds"):
        load_or_create(tmp_path, data, 4, seed=0)
    with pytest.raises(UserError, match="other data"):
        load_or_create(tmp_path, data.iloc[:-1], 5, seed=0)
