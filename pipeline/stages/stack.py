"""stage=stack: LightGBM stacker on the embed stage's features, scored out-of-fold on the persisted folds.

Per fold k: fit the vector reduction (PCA) on the training folds only, train LightGBM with early stopping on fold
k, predict fold k (OOF) and the test rows. Baselines run on the same folds in the same run: class prior,
length-feature LightGBM and the fine-tuned head alone. Boosters and reductions are saved so stage=predict can
score new test files.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, fields, replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from sklearn.decomposition import PCA

from pipeline import artifacts, folds, inputs, report
from pipeline.data import LABEL_COLUMNS, swap_label, swap_probabilities
from pipeline.errors import UserError
from pipeline.features import VECTOR_KINDS, PairInputs, feature_frame, text_inputs
from pipeline.scoring import accuracy, fold_prior, logloss
from pipeline.stages import embed as embed_stage

log = logging.getLogger(__name__)
SUBMISSION = "submission.csv"


@dataclass
class CVResult:
    oof: np.ndarray                  # (n_train, 3)
    per_fold: list[float]
    best_iterations: list[int]
    importance: pd.Series            # mean gain per feature
    models: list[tuple]              # per fold: (booster, reducer)


def take(pair: PairInputs, index: np.ndarray) -> PairInputs:
    return PairInputs(**{f.name: (None if getattr(pair, f.name) is None else getattr(pair, f.name)[index])
                         for f in fields(PairInputs)})


def fit_reducer(pair: PairInputs, n_components: int, seed: int) -> PCA | None:
    """PCA fitted on the training rows' response vectors (a and b together, so the A/B mirror is preserved)."""
    if pair.vec_a is None or n_components <= 0:
        return None
    stacked = np.concatenate([pair.vec_a, pair.vec_b])
    return PCA(n_components=min(n_components, *stacked.shape), random_state=seed).fit(stacked)


def reduce(pair: PairInputs, reducer: PCA | None) -> PairInputs:
    if reducer is None or pair.vec_a is None:
        return pair
    return replace(pair, vec_a=reducer.transform(pair.vec_a), vec_b=reducer.transform(pair.vec_b))


def design(pair: PairInputs, labels: np.ndarray | None, symmetric: bool, kinds: list[str]):
    """Feature frame (and labels); with `symmetric`, the swapped copies are appended with swapped labels."""
    frame = feature_frame(pair, kinds)
    if not symmetric:
        return frame, labels
    frame = pd.concat([frame, feature_frame(pair.swapped(), kinds)], ignore_index=True)
    if labels is None:
        return frame, None
    return frame, np.concatenate([labels, [swap_label(y) for y in labels]])


def predict(booster: lgb.Booster, reducer: PCA | None, pair: PairInputs, symmetric: bool,
            kinds: list[str]) -> np.ndarray:
    """Probabilities; with `symmetric`, averaged with the mirrored prediction on the swapped pair."""
    pair = reduce(pair, reducer)
    probs = booster.predict(feature_frame(pair, kinds), num_iteration=booster.best_iteration)
    if symmetric:
        probs = (probs + swap_probabilities(booster.predict(feature_frame(pair.swapped(), kinds),
                                                            num_iteration=booster.best_iteration))) / 2
    return probs


def cross_validate(train: PairInputs, labels: np.ndarray, fold_of: np.ndarray, cfg: DictConfig,
                   kinds: list[str]) -> CVResult:
    params = {**OmegaConf.to_container(cfg.stack.lgbm, resolve=True), "seed": int(cfg.seed)}
    n_folds = int(fold_of.max()) + 1
    oof = np.zeros((len(labels), 3))
    per_fold, best, importances, models = [], [], [], []
    for k in range(n_folds):
        tr, va = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        reducer = fit_reducer(take(train, tr), cfg.stack.pca_components, int(cfg.seed))
        x_tr, y_tr = design(reduce(take(train, tr), reducer), labels[tr], cfg.stack.symmetric, kinds)
        x_va, y_va = design(reduce(take(train, va), reducer), labels[va], cfg.stack.symmetric, kinds)
        booster = lgb.train(params, lgb.Dataset(x_tr, y_tr), num_boost_round=cfg.stack.num_boost_round,
                            valid_sets=[lgb.Dataset(x_va, y_va)],
                            callbacks=[lgb.early_stopping(cfg.stack.early_stopping_rounds, verbose=False)])
        oof[va] = predict(booster, reducer, take(train, va), cfg.stack.symmetric, kinds)
        per_fold.append(logloss(labels[va], oof[va]))
        best.append(int(booster.best_iteration))
        importances.append(pd.Series(booster.feature_importance("gain"), index=booster.feature_name()))
        models.append((booster, reducer))
    return CVResult(oof, per_fold, best,
                    pd.concat(importances, axis=1).mean(axis=1).sort_values(ascending=False), models)


def score_with_models(models: list[tuple], pair: PairInputs, symmetric: bool, kinds: list[str]) -> np.ndarray:
    """Test probabilities: the mean over the fold models."""
    return np.mean([predict(booster, reducer, pair, symmetric, kinds) for booster, reducer in models], axis=0)


def vector_kinds(matrices: dict[str, np.ndarray]) -> list[str]:
    return [k for k in VECTOR_KINDS if f"vec_{k}" in matrices]


def stacker_inputs(frame: pd.DataFrame, matrices: dict[str, np.ndarray], stack_cfg: DictConfig) -> PairInputs:
    """The stacker's inputs for rows of `frame`, from the embed stage's feature table."""
    use = stack_cfg.features
    pair = text_inputs(frame) if use.text else PairInputs()
    if use.head:
        pair = replace(pair, head=matrices["head"], head_other=matrices["head_swapped"])
    if use.embeddings:
        pair = replace(pair, vec_a=matrices["vec_a"], vec_b=matrices["vec_b"])
    return pair


def load_train_features(exp: Path, frame: pd.DataFrame, fold_frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """OOF embed features in data order, after the leak check against folds.parquet and the manifest."""
    stage_dir = exp / "embed"
    path = stage_dir / embed_stage.TRAIN_FEATURES
    if not path.exists():
        raise UserError(f"{path} not found; run stage=embed first")
    scalars, matrices = artifacts.read_feature_table(path)
    ids = scalars["id"].astype(str).to_numpy()
    if set(ids) != set(frame["id"]):
        raise UserError(f"{path} holds other rows than data.train ({len(ids)} vs {len(frame)}); re-run stage=embed")
    manifest = artifacts.read_json(stage_dir / embed_stage.MANIFEST)
    assigned = dict(zip(fold_frame["id"], fold_frame["fold"].astype(int)))
    leaks = embed_stage.leaking_rows(ids, scalars["fold"].to_numpy(), assigned, manifest)
    if leaks:
        raise UserError(f"{path}: {len(leaks)} rows (first id {leaks[0]}) were scored by an adapter trained on them "
                        "or on another fold layout; delete the embed folder and re-run stage=embed")
    order = pd.Series(np.arange(len(ids)), index=ids).loc[frame["id"]].to_numpy()
    return {name: m[order] for name, m in matrices.items()}


def results_dir(cfg: DictConfig, exp: Path) -> Path:
    """`stack/` in the experiment; under a Hydra multirun, each job's own folder so no job overwrites another."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir) / "stack"
    return exp / "stack"


def run(cfg: DictConfig) -> dict:
    exp = artifacts.exp_dir(cfg)
    out = results_dir(cfg, exp)
    train, test = inputs.load_train(cfg), inputs.load_test(cfg)
    frame = train.frame
    fold_frame = folds.load_or_create(exp, frame, cfg.cv.n_folds, cfg.seed)
    fold_of = fold_frame["fold"].to_numpy()
    labels = frame["label"].to_numpy()
    matrices = load_train_features(exp, frame, fold_frame)
    kinds = vector_kinds(matrices)
    single_run = out == exp / "stack"
    artifacts.write_manifest(exp if single_run else out.parent, cfg, "stack")

    stacker = cross_validate(stacker_inputs(frame, matrices, cfg.stack), labels, fold_of, cfg, kinds)
    length = cross_validate(text_inputs(frame), labels, fold_of, cfg, kinds)
    head_oof = (matrices["head"] + matrices["head_swapped"]) / 2 if cfg.finetune.swap_tta else matrices["head"]
    prior = fold_prior(labels, fold_of)

    metrics = {
        "oof_logloss": logloss(labels, stacker.oof),
        "accuracy": accuracy(labels, stacker.oof),
        "per_fold": stacker.per_fold,
        "best_iterations": stacker.best_iterations,
        "n_features": int(len(stacker.importance)),
        "baselines": {"prior": logloss(labels, prior), "length": logloss(labels, length.oof),
                      "head": logloss(labels, head_oof)},
        "baseline_accuracy": {"prior": accuracy(labels, prior), "length": accuracy(labels, length.oof),
                              "head": accuracy(labels, head_oof)},
        "results_dir": str(out),
    }
    metrics["gain_over_best_baseline"] = min(metrics["baselines"].values()) - metrics["oof_logloss"]
    save(out, cfg, frame, fold_of, stacker)
    if test is not None:
        test_probs = score_with_models(stacker.models, stacker_inputs(
            test.frame, embed_stage.ensure_test_features(cfg, exp, test, inputs.data_paths(cfg)[1]), cfg.stack),
            cfg.stack.symmetric, kinds)
        write_submission(exp / SUBMISSION if single_run else out / SUBMISSION, test.frame["id"].to_numpy(),
                         test_probs)
    report.write(out, metrics, stacker.importance, labels, {"stacker": stacker.oof, "head": head_oof,
                                                           "length": length.oof})
    print(report.table(metrics))
    if single_run:
        artifacts.update_metrics(exp, "stack", metrics)
    else:
        artifacts.write_json(out / artifacts.METRICS_FILE, {"stack": metrics})
    return metrics


def save(out: Path, cfg: DictConfig, frame: pd.DataFrame, fold_of: np.ndarray, result: CVResult) -> None:
    """OOF probabilities, per-fold boosters and reducers (what stage=predict needs)."""
    artifacts.write_parquet(out / "oof.parquet", pd.DataFrame(
        {"id": frame["id"].to_numpy(), "fold": fold_of, **dict(zip(LABEL_COLUMNS, result.oof.T))}))
    for k, (booster, reducer) in enumerate(result.models):
        with artifacts.atomic_path(out / f"fold_{k}" / "booster.txt") as tmp:
            booster.save_model(str(tmp))
        with artifacts.atomic_path(out / f"fold_{k}" / "reducer.pkl") as tmp:
            tmp.write_bytes(pickle.dumps(reducer))
    artifacts.write_json(out / "model.json", {"stack": OmegaConf.to_container(cfg.stack, resolve=True),
                                              "n_folds": len(result.models)})


def write_submission(path: Path, ids: np.ndarray, probs: np.ndarray) -> None:
    """Kaggle submission: id + three probabilities, rows in test order, each row summing to 1."""
    probs = np.clip(probs, 1e-7, 1.0)
    probs = probs / probs.sum(axis=1, keepdims=True)
    with artifacts.atomic_path(path) as tmp:
        pd.DataFrame({"id": ids, **dict(zip(LABEL_COLUMNS, probs.T))}).to_csv(tmp, index=False)
