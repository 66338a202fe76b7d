"""Resolve which train / test files a run uses and load them (shared by every stage)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from pipeline import demo_data
from pipeline.data import PairData, load_pairs, shared_pairs
from pipeline.errors import UserError


@dataclass(frozen=True)
class DataPaths:
    train: Path
    test: Path | None


def data_paths(cfg: DictConfig) -> DataPaths:
    """The train and test files. Without data.train the generated demo data is used, with its demo test file
    unless data.test says otherwise."""
    test = Path(cfg.data.test) if cfg.data.test is not None else None
    if cfg.data.train is not None:
        return DataPaths(Path(cfg.data.train), test)
    demo = cfg.data.demo
    demo_train, demo_test = demo_data.ensure_demo_files(cfg.paths.demo_dir, demo.n_train, demo.n_test, demo.seed)
    return DataPaths(demo_train, test or demo_test)


def load_extra(cfg: DictConfig, train: PairData) -> PairData | None:
    """`data.extra`: labelled rows that only ever join the fine-tune's training sets (never scored, never in a
    CV metric). A row of data.train among them (same id, or the same prompt and responses under another id, in
    either A/B order) would be trained on by the adapter that scores it, so it is refused."""
    if cfg.data.extra is None:
        return None
    extra = load_pairs(Path(cfg.data.extra), with_labels=True)
    refuse_train_rows(cfg.data.extra, extra, train, "extra", "they would leak into the out-of-fold scores")
    return extra


def refuse_train_rows(path, rows: PairData, train: PairData, what: str, why: str) -> None:
    """Rows that only ever join the fine-tune's training sets may not be rows of data.train: not by id, nor as the
    same pair under another id (prompt and responses, in either A/B order)."""
    shared = set(rows.frame["id"]) & set(train.frame["id"])
    if shared:
        raise UserError(f"{path}: {len(shared)} ids also in data.train (first {sorted(shared)[0]}); {what} rows must "
                        "be other rows")
    copies = shared_pairs(rows.frame, train.frame)
    if copies:
        raise UserError(f"{path}: {len(copies)} rows are pairs of data.train under other ids (same prompt and "
                        f"responses, in either A/B order; first ids {', '.join(copies[:3])}); remove them: {why}")



@dataclass
class Unlabeled:
    """`data.unlabeled`: rows a teacher labels for each fold (pseudo-labels); `in_test`: ids of those that are also
    rows of data.test (same id, or the same pair in either A/B order)."""

    path: Path
    data: PairData
    in_test: list[str]


def load_unlabeled(cfg: DictConfig, train: PairData, test: PairData | None) -> Unlabeled | None:
    """`data.unlabeled`: rows without labels that only ever join the fine-tune's training sets, with a teacher's
    probabilities as their target. A row of data.train among them (same id, or the same pair under another id, in
    either A/B order) would be trained on by the adapter that scores it, so it is refused. A row of data.test is
    allowed (transductive pseudo-labelling is the user's choice) and reported."""
    if cfg.data.unlabeled is None:
        return None
    path = Path(cfg.data.unlabeled)
    rows = load_pairs(path, with_labels=False)
    refuse_train_rows(path, rows, train, "unlabeled", "the fold that scores such a row would have trained on it")
    in_test = []
    if test is not None:
        same_id = set(rows.frame["id"]) & set(test.frame["id"])
        in_test = sorted(same_id | set(shared_pairs(rows.frame, test.frame)))
    return Unlabeled(path, rows, in_test)
