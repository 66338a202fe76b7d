"""Stack and predict stages: OOF coverage, baselines, submission format, a stacker that can beat the prior."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.data import LABEL_COLUMNS
from pipeline.features import PairInputs
from pipeline.scoring import logloss, prior_probs
from pipeline.stages import predict, stack
from conftest import compose_cfg


def test_oof_and_metrics(tiny_experiment):
    cfg, exp, metrics = tiny_experiment
    oof = pd.read_parquet(exp / "stack" / "oof.parquet")
    folds = pd.read_parquet(exp / "folds.parquet")
    assert oof["id"].is_unique and set(oof["id"]) == set(folds["id"])
    np.testing.assert_allclose(oof[list(LABEL_COLUMNS)].sum(axis=1), 1, rtol=1e-6)
    st = metrics["stack"]
    assert set(st["baselines"]) == {"prior", "length", "head"}
    assert len(st["per_fold"]) == cfg.cv.n_folds and 0 < st["oof_logloss"] < 5
    assert (exp / "stack" / "report.md").read_text().count("| stacker |") == 1
    assert (exp / "stack" / "reliability.png").stat().st_size > 1000
    assert (exp / "stack" / "feature_importance.png").stat().st_size > 1000


def check_submission(path, ids):
    sub = pd.read_csv(path, dtype={"id": str})
    assert list(sub.columns) == ["id", *LABEL_COLUMNS]
    assert list(sub["id"]) == list(ids)
    np.testing.assert_allclose(sub[list(LABEL_COLUMNS)].sum(axis=1), 1, atol=1e-6)
    assert (sub[list(LABEL_COLUMNS)] > 0).all().all()


def test_submission_in_test_order(tiny_experiment):
    cfg, exp, _ = tiny_experiment
    test = pd.read_csv(next((exp.parent / "demo_data").glob("demo_test_*.csv")), dtype={"id": str})
    check_submission(exp / "submission.csv", test["id"])


def test_predict_scores_a_new_test_file(tiny_experiment, tmp_path):
    cfg, exp, _ = tiny_experiment
    test = pd.read_csv(next((exp.parent / "demo_data").glob("demo_test_*.csv")))
    new = test.iloc[::-1].head(7).copy()
    new["id"] = [f"new-{i}" for i in range(len(new))]
    new.to_csv(tmp_path / "new_test.csv", index=False)
    cfg = compose_cfg([*_overrides(cfg), f"data.test={tmp_path / 'new_test.csv'}", "stage=predict"])
    metrics = predict.run(cfg)
    assert metrics["n_rows"] == 7
    check_submission(metrics["submission"], new["id"])


def _overrides(cfg):
    from conftest import TINY_OVERRIDES

    return [*TINY_OVERRIDES, f"paths.output_dir={cfg.paths.output_dir}",
            f"paths.model_cache_dir={cfg.paths.model_cache_dir}", f"exp_name={cfg.exp_name}"]


def test_stacker_beats_prior_on_informative_features():
    rng = np.random.default_rng(0)
    n, d = 900, 6
    labels = rng.choice(3, n, p=[0.4, 0.4, 0.2])
    quality = np.where(labels == 0, 1.0, np.where(labels == 1, -1.0, 0.0))
    vec_a = rng.normal(size=(n, d))
    vec_b = rng.normal(size=(n, d))
    vec_a[:, 0] += quality  # response_a's vector carries the signal
    vec_b[:, 0] -= quality
    pair = PairInputs(vec_a=vec_a, vec_b=vec_b)
    fold_of = np.arange(n) % 3
    cfg = compose_cfg(["stack.pca_components=0", "stack.num_boost_round=300", "stack.early_stopping_rounds=30"])
    result = stack.cross_validate(pair, labels, fold_of, cfg, ["a", "b", "diff"])
    prior = logloss(labels, prior_probs(labels, n))
    assert logloss(labels, result.oof) < prior - 0.15
    # Noise features must not beat the prior by much.
    noise = stack.cross_validate(PairInputs(vec_a=rng.normal(size=(n, d)), vec_b=rng.normal(size=(n, d))),
                                 labels, fold_of, cfg, ["a", "b", "diff"])
    assert logloss(labels, noise.oof) > prior - 0.03
