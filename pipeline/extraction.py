"""Feature extraction shared by the finetune stage (at the end of each fold, while the model is in memory) and the
embed stage (for what is missing): one forward pass per A/B orientation gives the head's probabilities and the
pooled vectors of every captured layer.

Feature table columns (embed/fold_k/train.parquet, embed/train_features.parquet, test feature files):
- `head`: head probabilities of the original pass; `head_swapped`: of the swapped pass, mirrored back into the
  original A/B orientation (equal to `head` without swap TTA).
- `{layer}_{span}_{orientation}`: layer = `h050` (half depth) ... `h100` (the head's input), span = prompt / a /
  b / verdict (a and b name response_a and response_b, whatever slot they sat in), orientation = fwd (prompt|A|B)
  or swp (prompt|B|A, only with swap TTA; there response_a sees response_b).
- `base_...`: the same vectors from the base model with the adapter disabled (embed.base_vectors).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from pipeline import artifacts, setups
from pipeline.data import swap_probabilities
from pipeline.errors import UserError
from pipeline.formatting import EncodedPair
from pipeline.inference import forward_pass, softmax

TRAIN_FEATURES = "train_features.parquet"
TEST_FEATURES = "features.parquet"
MANIFEST = "manifest.json"
STORAGE_DTYPES = ("float16", "float32")
POOLINGS = ("mean", "last")


def validate(embed_cfg: DictConfig) -> None:
    """Fail before any model loads on embed settings that cannot work."""
    if embed_cfg.storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"embed.storage_dtype={embed_cfg.storage_dtype}: use one of {', '.join(STORAGE_DTYPES)}")
    if embed_cfg.pooling not in POOLINGS:
        raise UserError(f"embed.pooling={embed_cfg.pooling}: use one of {', '.join(POOLINGS)}")
    layers = list(embed_cfg.layers)
    bad = [f for f in layers if not isinstance(f, (int, float)) or not 0 < float(f) <= 1]
    if not layers or bad:
        raise UserError(f"embed.layers={layers}: give fractions of the model's depth in (0, 1], e.g. [0.5, 1.0] "
                        "(1.0 = the final norm the head reads)")
    if int(embed_cfg.batch_tokens) < 1:
        raise UserError(f"embed.batch_tokens={embed_cfg.batch_tokens}: must be a positive token budget")


def is_current(fold_dir: Path, setup: dict) -> bool:
    """True when the fold's features are finished and were made with exactly `setup`."""
    state = artifacts.read_state(fold_dir)
    return bool(state and state.get("done") and all(state.get(k) == v for k, v in setup.items()))


def test_dir(stage_dir: Path, test_path: Path, setup: dict) -> Path:
    """Test features live per test file (and embed setup), so scoring a new file never disturbs older ones."""
    return stage_dir / f"test_{artifacts.file_fingerprint(test_path)}_{artifacts.config_hash(setup)[:8]}"


def _orient(vectors: dict[str, np.ndarray], orientation: str) -> dict[str, np.ndarray]:
    """Pass vectors keyed by slot -> keyed by response identity. In the swapped pass slot A holds response_b."""
    out = {}
    for key, matrix in vectors.items():
        layer, span = key.rsplit("_", 1)
        if orientation == "swp" and span in ("a", "b"):
            span = "b" if span == "a" else "a"
        out[f"{layer}_{span}_{orientation}"] = matrix
    return out


def pass_features(model, encoded: list[EncodedPair], swapped: list[EncodedPair] | None, pad_id: int,
                  embed_cfg: DictConfig, on: torch.device, dtype: torch.dtype, desc: str = "") -> dict[str, np.ndarray]:
    """Head probabilities and pooled vectors of both orientations (see the module docstring for the keys)."""
    model.eval()  # dropout off: held-out rows are scored as a deployed model would score them

    def one_pass(rows: list[EncodedPair], name: str):
        return forward_pass(model, rows, pad_id, int(embed_cfg.batch_tokens), on, dtype,
                            layers=list(embed_cfg.layers), pooling=embed_cfg.pooling,
                            padding_side=embed_cfg.padding_side, desc=f"{desc} {name}".strip())

    orientations = [("fwd", encoded)] + ([("swp", swapped)] if swapped is not None else [])
    out: dict[str, np.ndarray] = {}
    for orientation, rows in orientations:
        result = one_pass(rows, orientation)
        probs = softmax(result.logits)
        out["head" if orientation == "fwd" else "head_swapped"] = probs if orientation == "fwd" else \
            swap_probabilities(probs)
        out.update(_orient(result.vectors, orientation))
    out.setdefault("head_swapped", out["head"])
    if embed_cfg.base_vectors and hasattr(model, "disable_adapter"):
        with model.disable_adapter():  # the same base weights without LoRA: does fine-tuning help the vectors?
            for orientation, rows in orientations:
                result = one_pass(rows, f"base {orientation}")
                out.update({f"base_{k}": v for k, v in _orient(result.vectors, orientation).items()})
    return out


def head_probabilities(feats: dict[str, np.ndarray]) -> np.ndarray:
    """The head's prediction: both orientations averaged (swap TTA), or the single pass."""
    return (feats["head"] + feats["head_swapped"]) / 2


def write_features(path: Path, ids: np.ndarray, fold: np.ndarray, feats: dict[str, np.ndarray],
                   storage_dtype: str) -> None:
    artifacts.write_feature_table(path, {"id": np.asarray(ids).astype(str), "fold": np.asarray(fold)}, feats,
                                  dtype=storage_dtype)


def write_train_fold(stage_dir: Path, k: int, ids: np.ndarray, feats: dict[str, np.ndarray], setup: dict,
                     adapter: Path, adapter_train_folds: list[int], storage_dtype: str, seconds: float) -> None:
    """One fold's OOF features and its done-marker (what the leak check reads)."""
    fold_dir = stage_dir / f"fold_{k}"
    write_features(fold_dir / "train.parquet", ids, np.full(len(ids), k), feats, storage_dtype)
    artifacts.mark_done(fold_dir, {**setup, "fold": k, "adapter": str(adapter),
                                   "adapter_train_folds": adapter_train_folds, "scored_fold": k,
                                   "n_train_rows": int(len(ids)), "seconds": round(seconds, 2)})


def leaking_rows(ids: np.ndarray, feature_fold: np.ndarray, assigned_fold: dict[str, int], manifest: dict) -> list[str]:
    """Ids whose features came from an adapter trained on them, or whose fold disagrees with folds.parquet."""
    trained_on = {entry["scored_fold"]: set(entry["adapter_train_folds"]) for entry in manifest["train"].values()}
    bad = []
    for row_id, fold in zip(ids, feature_fold):
        fold = int(fold)
        if assigned_fold.get(str(row_id)) != fold or fold not in trained_on or fold in trained_on[fold]:
            bad.append(str(row_id))
    return bad


def read_in_order(path: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A feature table's matrices with rows in the order of `ids` (every id must be there)."""
    if not path.exists():
        raise UserError(f"{path} not found; run stage=embed first")
    scalars, matrices = artifacts.read_feature_table(path)
    index = pd.Series(np.arange(len(scalars)), index=scalars["id"].astype(str))
    missing = [i for i in ids if i not in index.index]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} rows (first id {missing[0]}); re-run stage=embed")
    order = index.loc[list(ids)].to_numpy()
    return {name: m[order] for name, m in matrices.items()}


def finetune_fold_states(exp: Path, cfg: DictConfig) -> list[dict]:
    """Every fold's finetune state; refuses when a fold is not finished, or was trained on another train file or
    with other model / formatting / fine-tune settings than this command line's (which would be recorded as what
    made the features)."""
    states = [artifacts.read_state(exp / "finetune" / f"fold_{k}") for k in range(cfg.cv.n_folds)]
    missing = [k for k, s in enumerate(states) if not (s and s.get("done"))]
    if missing:
        raise UserError(f"finetune folds {missing} of {exp} are not finished; run stage=finetune first")
    expected = setups.finetune_setup(cfg)
    if states[0].get("data") != expected["data"]:
        raise UserError(f"data.train differs from the file the adapters of {exp} were trained on (content "
                        f"{states[0].get('data')} vs {expected['data']}); use that file, or a new exp_name")
    changed = [key for key in ("seed", "extra", "config_hash") if states[0].get(key) != expected[key]]
    if changed:
        raise UserError(f"the adapters of {exp} were trained with other settings ({', '.join(changed)} differ from "
                        "this command line's model / finetune / data.extra / seed); drop those overrides, or use a "
                        "new exp_name to train with them")
    return states


def extract_missing(cfg: DictConfig, exp: Path, ft_states: list[dict], setup: dict,
                    train_job: tuple | None, test_job: tuple | None) -> None:
    """Run the passes still missing. The base model is loaded once; each fold's adapter is swapped on it and
    scores its OOF rows (train_job: data, fold per row, folds to do) and the test rows (test_job: data, folder)."""
    from pipeline import modeling
    from pipeline.formatting import encode_frame

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
    tta = bool(cfg.embed.swap_tta)

    def encoded(frame: pd.DataFrame) -> tuple[list[EncodedPair], list[EncodedPair] | None]:
        return (encode_frame(tokenizer, frame, cfg.model),
                encode_frame(tokenizer, frame, cfg.model, swap=True) if tta else None)

    def pick(rows: list[EncodedPair] | None, index: np.ndarray) -> list[EncodedPair] | None:
        return None if rows is None else [rows[i] for i in index]

    if train_missing:
        train, fold_of, _ = train_job
        train_enc, train_swp = encoded(train.frame)
    if test_missing:
        test, test_folder = test_job
        test_enc, test_swp = encoded(test.frame)
    model = modeling.load_classifier(source, cfg.model, tokenizer, dtype, on)
    for k in sorted(train_missing | test_missing):
        start = time.perf_counter()
        adapter = exp / "finetune" / f"fold_{k}" / "adapter"
        model = modeling.attach_adapter(model, adapter, f"fold_{k}")
        if k in train_missing:
            fold_dir = exp / "embed" / f"fold_{k}"
            artifacts.write_json(fold_dir / artifacts.STATE_FILE, {"done": False, **setup})
            held_out = np.flatnonzero(fold_of == k)
            feats = pass_features(model, pick(train_enc, held_out), pick(train_swp, held_out),
                                  tokenizer.pad_token_id, cfg.embed, on, dtype, desc=f"embed fold {k}")
            write_train_fold(exp / "embed", k, train.frame["id"].to_numpy()[held_out], feats, setup, adapter,
                             ft_states[k]["train_folds"], cfg.embed.storage_dtype, time.perf_counter() - start)
        if k in test_missing:
            feats = pass_features(model, test_enc, test_swp, tokenizer.pad_token_id, cfg.embed, on, dtype,
                                  desc=f"embed fold {k} test")
            write_features(test_folder / f"fold_{k}.parquet", test.frame["id"].to_numpy(),
                           np.full(len(test_enc), -1), feats, cfg.embed.storage_dtype)


def combine_train(stage_dir: Path, cfg: DictConfig, train_ids: np.ndarray, labels: np.ndarray) -> int | None:
    """Gather the folds' OOF features into train_features.parquet in data order, with the manifest the leak
    check reads. Returns the vectors' width."""
    n_folds = cfg.cv.n_folds
    states = [artifacts.read_state(stage_dir / f"fold_{k}") for k in range(n_folds)]
    parts = [artifacts.read_feature_table(stage_dir / f"fold_{k}" / "train.parquet") for k in range(n_folds)]
    scalars = pd.concat([p[0] for p in parts], ignore_index=True)
    order = pd.Series(np.arange(len(scalars)), index=scalars["id"].astype(str)).loc[train_ids].to_numpy()
    matrices = {name: np.concatenate([p[1][name] for p in parts])[order] for name in parts[0][1]}
    artifacts.write_feature_table(stage_dir / TRAIN_FEATURES, {"id": np.asarray(train_ids).astype(str),
                                                               "fold": scalars["fold"].to_numpy()[order],
                                                               "label": np.asarray(labels)},
                                  matrices, dtype=cfg.embed.storage_dtype)
    artifacts.write_json(stage_dir / MANIFEST, {
        "train": {f"fold_{k}": {key: s[key] for key in ("adapter", "adapter_train_folds", "scored_fold",
                                                        "n_train_rows")} for k, s in enumerate(states)},
        "setup": {key: states[0][key] for key in ("seed", "finetune", "data", "config_hash")},
        "layers": [float(f) for f in cfg.embed.layers], "pooling": cfg.embed.pooling,
        "swap_tta": bool(cfg.embed.swap_tta), "base_vectors": bool(cfg.embed.base_vectors),
        "columns": sorted(matrices)})
    widths = [m.shape[1] for name, m in matrices.items() if not name.startswith("head")]
    return widths[0] if widths else None


def average_test(folder: Path, test, cfg: DictConfig, ft_states: list[dict]) -> None:
    """Mean over the fold adapters of the test rows' head probabilities and vectors, with a manifest."""
    n_folds = cfg.cv.n_folds
    tests = [artifacts.read_feature_table(folder / f"fold_{k}.parquet")[1] for k in range(n_folds)]
    averaged = {name: np.mean([t[name] for t in tests], axis=0) for name in tests[0]}
    write_features(folder / TEST_FEATURES, test.frame["id"].to_numpy(), np.full(len(test.frame), -1), averaged,
                   cfg.embed.storage_dtype)
    artifacts.write_json(folder / MANIFEST, {
        "file": test.source, "n_rows": int(len(test.frame)),
        "adapters": [str(Path(cfg.paths.exp_dir) / "finetune" / f"fold_{k}" / "adapter") for k in range(n_folds)],
        "adapter_configs": [s["config_hash"] for s in ft_states],
        "aggregation": f"mean over the {n_folds} fold adapters of head probabilities and vectors"})


def ensure_test_features(cfg: DictConfig, exp: Path, test, test_path: Path) -> Path:
    """The averaged test feature file for `test`, extracting only the folds still missing."""
    ft_states = finetune_fold_states(exp, cfg)
    setup = setups.embed_setup(cfg, ft_states[0])
    folder = test_dir(exp / "embed", test_path, setup)
    if not (folder / TEST_FEATURES).exists():
        extract_missing(cfg, exp, ft_states, setup, None, (test, folder))
        average_test(folder, test, cfg, ft_states)
    return folder / TEST_FEATURES


@dataclass
class OOFFeatures:
    """An experiment's out-of-fold features as plain arrays, rows in train-file order."""

    ids: np.ndarray                  # (n,) str
    folds: np.ndarray                # (n,) the experiment's fold of each row
    labels: np.ndarray               # (n,) 0 = a wins, 1 = b wins, 2 = tie
    head: np.ndarray                 # (n, 3) head probabilities, swap TTA averaged
    vectors: dict[str, np.ndarray]   # "{layer}_{span}_{orientation}" -> (n, hidden), see the module docstring

    def frame(self) -> pd.DataFrame:
        """One DataFrame: id, fold, label, head_a/head_b/head_tie and one column per vector dimension."""
        columns = {"id": self.ids, "fold": self.folds, "label": self.labels,
                   **{f"head_{c}": self.head[:, j] for j, c in enumerate(("a", "b", "tie"))}}
        for name, matrix in self.vectors.items():
            columns.update({f"{name}_{j}": matrix[:, j] for j in range(matrix.shape[1])})
        return pd.DataFrame(columns)


def load_oof_features(exp: str | Path) -> OOFFeatures:
    """The vectors for your own model: every row's OOF features (from the adapter that never trained on it) with
    the experiment's folds and labels, so any classifier can be fitted on exactly our folds.

        from pipeline.extraction import load_oof_features
        oof = load_oof_features("outputs/shared_ties")
        for k in np.unique(oof.folds): train, valid = oof.folds != k, oof.folds == k ...
    """
    path = Path(exp) / "embed" / TRAIN_FEATURES
    if not path.exists():
        raise UserError(f"{path} not found; run stage=embed (or stage=all) for this experiment first")
    scalars, matrices = artifacts.read_feature_table(path)
    head = (matrices.pop("head") + matrices.pop("head_swapped")) / 2
    return OOFFeatures(scalars["id"].astype(str).to_numpy(), scalars["fold"].to_numpy(),
                       scalars["label"].to_numpy(), head, matrices)
