"""Cross-validation folds: stratified by label, grouped by prompt, seeded, assigned once and persisted."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline import artifacts, dist, locks
from pipeline.errors import UserError
from pipeline.layout import Layout


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
        raise UserError(f"cv.n_folds={n_folds} but the data has only {n_groups} distinct groups; lower cv.n_folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(labels), -1, dtype=np.int64)
    try:
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            folds[held_out] = fold
    except ValueError as exc:  # e.g. a class with fewer rows than folds
        raise UserError(f"cannot split the train file into cv.n_folds={n_folds} folds ({exc}); add rows or lower "
                        "cv.n_folds") from None
    empty = sorted(set(range(n_folds)) - set(folds.tolist()))
    if empty:
        raise UserError(f"cv.n_folds={n_folds}: folds {empty} got no rows with these groups; lower cv.n_folds")
    return folds


def group_keys(frame: pd.DataFrame, group_by: str) -> np.ndarray:
    """Group key per row: identical prompts (`prompt`), or equal values of any column of the input file (e.g.
    `source`, so a whole source can be held out)."""
    if group_by == "prompt":
        return prompt_groups(frame["prompt"])
    if group_by not in frame.columns:
        extra = [c for c in frame.columns if c not in ("id", "prompt", "response_a", "response_b", "label")]
        raise UserError(f"cv.group_by={group_by}: the train file has no column {group_by!r} "
                        f"(use prompt{', or one of ' + ', '.join(extra) if extra else ''})")
    return pd.factorize(frame[group_by].astype(str))[0]


FOLD_SETTINGS_KEY = b"pipeline.folds"  # parquet metadata: the settings the folds were assigned with


def write_folds(path: Path, folds: pd.DataFrame, settings: dict) -> None:
    """folds.parquet (id, fold) with the settings that assigned them in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(folds, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           FOLD_SETTINGS_KEY: json.dumps(settings).encode()})
    with artifacts.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def recorded_settings(path: Path) -> dict | None:
    """The settings folds.parquet was assigned with (None for files from before they were recorded)."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(FOLD_SETTINGS_KEY)
        return json.loads(raw) if raw else None
    except Exception:  # a damaged file is reported by the read that follows
        return None


def load_or_create(exp: Path, frame: pd.DataFrame, n_folds: int, seed: int, group_by: str = "prompt") -> pd.DataFrame:
    """Return (id, fold) for `frame`, creating `folds.parquet` on first use and checking it afterwards (under the
    shared-files lock: parallel fold jobs must not assign folds twice)."""
    with locks.shared_files(exp):
        return _load_or_create(exp, frame, n_folds, seed, group_by)


def _load_or_create(exp: Path, frame: pd.DataFrame, n_folds: int, seed: int, group_by: str) -> pd.DataFrame:
    path = Layout(exp).folds
    settings = {"n_folds": int(n_folds), "seed": int(seed), "group_by": str(group_by)}
    if path.exists():
        folds = artifacts.read_parquet(path, "delete it: folds are re-assigned from cv.n_folds and seed, but every "
                                             "finished stage of this experiment then no longer matches")
        if not {"id", "fold"} <= set(folds.columns):
            raise UserError(f"{path} lacks its id/fold columns; delete the experiment folder (or use a new exp_name)")
        folds["id"] = folds["id"].astype(str)
        if set(folds["id"]) != set(frame["id"]) or folds["fold"].nunique() != n_folds:
            raise UserError(
                f"{path} was made for other data or another cv.n_folds "
                f"({len(folds)} rows, {folds['fold'].nunique()} folds; now {len(frame)} rows, {n_folds} folds); "
                "use a new exp_name or delete the experiment folder")
        recorded = recorded_settings(path)
        changed = [f"{key}: {recorded[key]!r} -> {value!r}" for key, value in settings.items()
                   if recorded is not None and recorded.get(key) != value]
        if changed:
            raise UserError(f"{path} was assigned with other settings ({', '.join(changed)}; seed, cv.n_folds and "
                            "cv.group_by are fixed for an experiment); drop that override or use a new exp_name")
        return folds.set_index("id").loc[frame["id"]].reset_index()
    fold = assign_folds(frame["label"].to_numpy(), group_keys(frame, group_by), n_folds, seed)
    folds = pd.DataFrame({"id": frame["id"].astype(str).to_numpy(), "fold": fold})
    if dist.is_main_process():
        write_folds(path, folds, settings)
    return folds


def inner_splits(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group-aware inner folds of a training set (as many as it has groups, at most n_splits)."""
    n_splits = min(n_splits, len(np.unique(groups)))
    if n_splits < 2:
        raise UserError("a training set holds a single group, so nothing can be chosen on an inner split; "
                        "use more folds or another cv.group_by")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y, groups)]


def check_inner_splits(labels: np.ndarray, groups: np.ndarray, fold_of: np.ndarray, inner_folds: int,
                       seed: int) -> None:
    """Refuse, before any fine-tune, folds whose training sets stage two cannot split into inner folds (e.g.
    cv.group_by=source with one source holding most rows)."""
    for k in np.unique(fold_of):
        train = fold_of != k
        try:
            inner_splits(labels[train], groups[train], inner_folds, seed)
        except (UserError, ValueError) as exc:
            raise UserError(f"stage two cannot choose anything for fold {int(k)}: its training set "
                            f"({int(train.sum())} rows, {len(np.unique(groups[train]))} groups) cannot be split "
                            f"into stack.inner_folds={inner_folds} inner folds ({exc}); lower stack.inner_folds, raise "
                            "cv.n_folds or use another cv.group_by") from None
