"""stage=embed: one forward pass per orientation -> head logits + pooled response_a / response_b vectors.

For each fold k, the base model with fold k's adapter scores the rows it never trained on (fold k) and every
test row. A forward hook on the chosen layer captures that layer's hidden states in the same pass that gives
the head's logits; the response spans are pooled there. With swap TTA the swapped pass gives the mirrored
features, averaged into the original orientation. Test features are averaged over the fold adapters.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, folds, inputs, modeling
from pipeline.data import PairData, swap_probabilities
from pipeline.errors import UserError
from pipeline.features import pair_vectors
from pipeline.formatting import EncodedPair, encode_frame
from pipeline.inference import PassOutput, forward_pass, softmax
from pipeline.stages.finetune import HOW_TO_FIX

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
TRAIN_FEATURES = "train_features.parquet"
TEST_FEATURES = "features.parquet"


def pooled_features(model, encoded: list[EncodedPair], swapped: list[EncodedPair] | None, pad_id: int,
                    cfg: DictConfig, on: torch.device, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Head probabilities of both orientations and response vectors, all in the original A/B orientation."""
    def one_pass(rows: list[EncodedPair]) -> PassOutput:
        return forward_pass(model, rows, pad_id, cfg.embed.batch_tokens, on, dtype, pool_layer=cfg.embed.layer,
                            pooling=cfg.embed.pooling, padding_side=cfg.embed.padding_side)

    first = one_pass(encoded)
    out = {"head": softmax(first.logits), "vec_a": first.vec_a, "vec_b": first.vec_b}
    if swapped is None:
        out["head_swapped"] = out["head"]
        return out
    second = one_pass(swapped)  # response_b sits in the A slot here
    out["head_swapped"] = swap_probabilities(softmax(second.logits))
    out["vec_a"] = (first.vec_a + second.vec_b) / 2
    out["vec_b"] = (first.vec_b + second.vec_a) / 2
    return out


def write_features(path: Path, ids: np.ndarray, fold: np.ndarray, feats: dict[str, np.ndarray],
                   cfg: DictConfig) -> None:
    vectors = pair_vectors(feats["vec_a"], feats["vec_b"], list(cfg.embed.vectors))
    artifacts.write_feature_table(
        path, {"id": ids.astype(str), "fold": fold},
        {"head": feats["head"], "head_swapped": feats["head_swapped"], **{f"vec_{k}": v for k, v in vectors.items()}},
        dtype=cfg.embed.storage_dtype)


def finetune_fold_states(ft_dir: Path, n_folds: int) -> list[dict]:
    states = [artifacts.read_state(ft_dir / f"fold_{k}") for k in range(n_folds)]
    missing = [k for k, s in enumerate(states) if not (s and s.get("done"))]
    if missing:
        raise UserError(f"finetune folds {missing} of {ft_dir.parent} are not finished; run stage=finetune first")
    return states


def embed_setup(cfg: DictConfig, ft_states: list[dict]) -> dict:
    return {"seed": int(cfg.seed), "finetune": [s["config_hash"] for s in ft_states],
            "config_hash": artifacts.config_hash(OmegaConf.to_container(cfg.embed, resolve=True))}


def test_dir(stage_dir: Path, test_path: Path, setup: dict) -> Path:
    """Test features live per test file (and embed setup), so scoring a new file never disturbs older ones."""
    return stage_dir / f"test_{artifacts.file_fingerprint(test_path)}_{artifacts.config_hash(setup)[:8]}"


def run(cfg: DictConfig) -> dict:
    modeling.validate(cfg.model)
    exp = artifacts.exp_dir(cfg)
    stage_dir = exp / "embed"
    train, test = inputs.load_train(cfg), inputs.load_test(cfg)
    fold_of = folds.load_or_create(exp, train.frame, cfg.cv.n_folds, cfg.seed)["fold"].to_numpy()
    ft_states = finetune_fold_states(exp / "finetune", cfg.cv.n_folds)
    setup = embed_setup(cfg, ft_states)
    artifacts.write_manifest(exp, cfg, "embed")
    missing = [k for k in range(cfg.cv.n_folds) if not artifacts.check_state(stage_dir / f"fold_{k}", setup, HOW_TO_FIX)]
    test_job = (test, test_dir(stage_dir, inputs.data_paths(cfg)[1], setup)) if test is not None else None
    if artifacts.is_main_process():
        extract(cfg, exp, ft_states, setup, (train, fold_of, missing), test_job)
        return combine(stage_dir, cfg, train.frame["id"].to_numpy().astype(str), test_job)
    return {}


def ensure_test_features(cfg: DictConfig, exp: Path, test: PairData, test_path: Path) -> dict[str, np.ndarray]:
    """Test features for `test` (every fold adapter, averaged), extracting only what is missing; in test order."""
    ft_states = finetune_fold_states(exp / "finetune", cfg.cv.n_folds)
    setup = embed_setup(cfg, ft_states)
    folder = test_dir(exp / "embed", test_path, setup)
    if not (folder / TEST_FEATURES).exists():
        extract(cfg, exp, ft_states, setup, None, (test, folder))
        average_test(folder, test, cfg, ft_states)
    scalars, matrices = artifacts.read_feature_table(folder / TEST_FEATURES)
    order = pd.Series(np.arange(len(scalars)), index=scalars["id"].astype(str)).loc[test.frame["id"]].to_numpy()
    return {name: m[order] for name, m in matrices.items()}


def extract(cfg: DictConfig, exp: Path, ft_states: list[dict], setup: dict, train_job: tuple | None,
            test_job: tuple | None) -> None:
    """Run the missing passes: each fold's adapter is loaded once for its OOF rows (train_job: data, folds, folds
    still to do) and the test rows (test_job: data, folder)."""
    ft_dir, stage_dir = exp / "finetune", exp / "embed"
    n_folds = cfg.cv.n_folds
    train_missing = set(train_job[2]) if train_job else set()
    test_missing = {k for k in range(n_folds) if not (test_job[1] / f"fold_{k}.parquet").exists()} if test_job \
        else set()
    if not (train_missing or test_missing):
        return
    on = modeling.device()
    dtype = modeling.compute_dtype(cfg.model.precision, on)
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    tta = bool(cfg.finetune.swap_tta)

    def encoded(frame: pd.DataFrame) -> tuple[list[EncodedPair], list[EncodedPair] | None]:
        return (encode_frame(tokenizer, frame, cfg.model),
                encode_frame(tokenizer, frame, cfg.model, swap=True) if tta else None)

    if train_missing:
        train, fold_of, _ = train_job
        train_enc, train_swp = encoded(train.frame)
    if test_missing:
        test, test_folder = test_job
        test_enc, test_swp = encoded(test.frame)
    pick = lambda rows, index: None if rows is None else [rows[i] for i in index]  # noqa: E731
    for k in sorted(train_missing | test_missing):
        fold_dir = stage_dir / f"fold_{k}"
        start = time.perf_counter()
        adapter = ft_dir / f"fold_{k}" / "adapter"
        model = modeling.load_with_adapter(source, cfg.model, tokenizer, adapter, dtype, on)
        if k in train_missing:
            artifacts.write_json(fold_dir / artifacts.STATE_FILE, {"done": False, **setup})
            held_out = np.flatnonzero(fold_of == k)
            feats = pooled_features(model, pick(train_enc, held_out), pick(train_swp, held_out),
                                    tokenizer.pad_token_id, cfg, on, dtype)
            write_features(fold_dir / "train.parquet", train.frame["id"].to_numpy()[held_out], fold_of[held_out],
                           feats, cfg)
            artifacts.mark_done(fold_dir, {**setup, "fold": k, "adapter": str(adapter),
                                           "adapter_train_folds": ft_states[k]["train_folds"], "scored_fold": k,
                                           "n_train_rows": int(len(held_out)),
                                           "seconds": round(time.perf_counter() - start, 2)})
        if k in test_missing:
            feats = pooled_features(model, test_enc, test_swp, tokenizer.pad_token_id, cfg, on, dtype)
            write_features(test_folder / f"fold_{k}.parquet", test.frame["id"].to_numpy(),
                           np.full(len(test_enc), -1), feats, cfg)
        log.info("embed fold %d: %.1f s", k, time.perf_counter() - start)
        del model


def average_test(folder: Path, test: PairData, cfg: DictConfig, ft_states: list[dict]) -> None:
    """Mean over the fold adapters of the test rows' head probabilities and vectors, with a manifest."""
    n_folds = cfg.cv.n_folds
    tests = [artifacts.read_feature_table(folder / f"fold_{k}.parquet")[1] for k in range(n_folds)]
    averaged = {name: np.mean([t[name] for t in tests], axis=0) for name in tests[0]}
    artifacts.write_feature_table(folder / TEST_FEATURES, {"id": test.frame["id"].to_numpy().astype(str),
                                                           "fold": np.full(len(test.frame), -1)},
                                  averaged, dtype=cfg.embed.storage_dtype)
    artifacts.write_json(folder / MANIFEST, {
        "file": test.source, "n_rows": int(len(test.frame)),
        "adapters": [str(Path(cfg.paths.exp_dir) / "finetune" / f"fold_{k}" / "adapter") for k in range(n_folds)],
        "adapter_configs": [s["config_hash"] for s in ft_states],
        "aggregation": f"mean over the {n_folds} fold adapters of head probabilities and response vectors"})


def combine(stage_dir: Path, cfg: DictConfig, train_ids: np.ndarray, test_job: tuple | None) -> dict:
    """Gather fold outputs: OOF train features in data order (+ manifest), test features averaged over folds."""
    n_folds = cfg.cv.n_folds
    states = [artifacts.read_state(stage_dir / f"fold_{k}") for k in range(n_folds)]
    parts = [artifacts.read_feature_table(stage_dir / f"fold_{k}" / "train.parquet") for k in range(n_folds)]
    scalars = pd.concat([p[0] for p in parts], ignore_index=True)
    order = pd.Series(np.arange(len(scalars)), index=scalars["id"].astype(str)).loc[train_ids].to_numpy()
    matrices = {name: np.concatenate([p[1][name] for p in parts])[order] for name in parts[0][1]}
    artifacts.write_feature_table(stage_dir / TRAIN_FEATURES,
                                  {"id": train_ids, "fold": scalars["fold"].to_numpy()[order]}, matrices,
                                  dtype=cfg.embed.storage_dtype)
    artifacts.write_json(stage_dir / MANIFEST, {
        "train": {f"fold_{k}": {key: s[key] for key in ("adapter", "adapter_train_folds", "scored_fold",
                                                        "n_train_rows")} for k, s in enumerate(states)},
        "layer": cfg.embed.layer, "pooling": cfg.embed.pooling, "vectors": list(cfg.embed.vectors),
        "swap_tta": bool(cfg.finetune.swap_tta)})
    n_test = 0
    if test_job is not None:
        test, folder = test_job
        average_test(folder, test, cfg, [artifacts.read_state(Path(cfg.paths.exp_dir) / "finetune" / f"fold_{k}")
                                         for k in range(n_folds)])
        n_test = len(test.frame)
    width = matrices["vec_a"].shape[1] if "vec_a" in matrices else None
    metrics = {"n_train_rows": int(len(train_ids)), "n_test_rows": n_test, "hidden_size": width,
               "seconds": round(sum(s.get("seconds", 0.0) for s in states), 2)}
    print(f"embed: {metrics['n_train_rows']} OOF rows, {n_test} test rows, vectors of width {width}")
    return metrics


def leaking_rows(ids: np.ndarray, feature_fold: np.ndarray, assigned_fold: dict[str, int], manifest: dict) -> list[str]:
    """Ids whose features came from an adapter trained on them, or whose fold disagrees with folds.parquet."""
    trained_on = {entry["scored_fold"]: set(entry["adapter_train_folds"]) for entry in manifest["train"].values()}
    bad = []
    for row_id, fold in zip(ids, feature_fold):
        fold = int(fold)
        if assigned_fold.get(str(row_id)) != fold or fold not in trained_on or fold in trained_on[fold]:
            bad.append(str(row_id))
    return bad
