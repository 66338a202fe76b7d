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
    shared = set(extra.frame["id"]) & set(train.frame["id"])
    if shared:
        raise UserError(f"{cfg.data.extra}: {len(shared)} ids also in data.train (first {sorted(shared)[0]}); "
                        "extra rows must be other rows")
    copies = shared_pairs(extra.frame, train.frame)
    if copies:
        raise UserError(f"{cfg.data.extra}: {len(copies)} rows are pairs of data.train under other ids (same prompt "
                        f"and responses, in either A/B order; first ids {', '.join(copies[:3])}); remove them: they "
                        "would leak into the out-of-fold scores")
    return extra

