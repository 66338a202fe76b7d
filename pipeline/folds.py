"""Cross-validation folds: stratified by label, grouped by prompt, seeded, assigned once and persisted."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline import artifacts
from pipeline.errors import UserError

FOLDS_FILE = "folds.parquet"


def prompt_groups(prompts: pd.Series) -> np.ndarray:
    """Group key per row: identical prompts (all turns) share a key."""
    keys = ["\x1f".join(turns) for turns in prompts]
    return np.asarray([int(hashlib.md5(k.encode("utf-8")).hexdigest()[:12], 16) for k in keys])


def assign_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row; rows sharing a group share a fold, label shares are balanced across folds."""
    n_groups = len(np.unique(groups))
    if n_folds < 2:
        raise UserError(f"cv.n_folds={n_folds}: need at least 2 folds")
    if n_groups < n_folds:
        raise UserError(f"cv.n_folds={n_folds} but the data has only {n_groups} distinct prompts; lower cv.n_folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(labels), -1, dtype=np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[held_out] = fold
    return folds


def load_or_create(exp: Path, frame: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """Return (id, fold) for `frame`, creating `folds.parquet` on first use and checking it afterwards."""
    path = exp / FOLDS_FILE
    if path.exists():
        folds = pd.read_parquet(path)
        folds["id"] = folds["id"].astype(str)
        if set(folds["id"]) != set(frame["id"]) or folds["fold"].nunique() != n_folds:
            raise UserError(
                f"{path} was made for other data or another cv.n_folds "
                f"({len(folds)} rows, {folds['fold'].nunique()} folds; now {len(frame)} rows, {n_folds} folds); "
                "use a new exp_name or delete the experiment folder")
        return folds.set_index("id").loc[frame["id"]].reset_index()
    fold = assign_folds(frame["label"].to_numpy(), prompt_groups(frame["prompt"]), n_folds, seed)
    folds = pd.DataFrame({"id": frame["id"].astype(str).to_numpy(), "fold": fold})
    if artifacts.is_main_process():
        artifacts.write_parquet(path, folds)
    return folds
