"""A stage's run context, opened with one call: the input files resolved and read once, the folds, the experiment
layout, the process's rank and its device and dtype. Every stage starts with `open_run(cfg, stage)`."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from pipeline import artifacts, dist, folds, inputs
from pipeline.data import PairData, load_pairs
from pipeline.errors import UserError
from pipeline.formatting import check_model_names
from pipeline.layout import Layout

if TYPE_CHECKING:
    import torch  # only the device and dtype properties need it, and they import the LLM half when asked


@dataclass
class RunContext:
    cfg: DictConfig
    layout: Layout  # the experiment: folds, adapters, features, stacker (read; written unless `out` differs)
    out: Layout     # where this run writes its own results: the experiment, a multirun job's folder, or
                    # paths.predict_dir for stage=predict on a read-only experiment
    train_path: Path
    test_path: Path | None
    train: PairData
    test: PairData | None
    fold_of: np.ndarray  # the experiment's fold of each train row, train-file order

    @property
    def n_folds(self) -> int:
        return int(self.cfg.cv.n_folds)

    @property
    def ids(self) -> np.ndarray:
        return self.train.frame["id"].to_numpy().astype(str)

    @property
    def labels(self) -> np.ndarray:
        return self.train.frame["label"].to_numpy()

    @property
    def rank(self) -> int:
        return dist.rank()

    @property
    def world_size(self) -> int:
        return dist.world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @cached_property
    def device(self) -> torch.device:
        from pipeline.llm import modeling

        return modeling.device()

    @cached_property
    def dtype(self) -> torch.dtype:
        from pipeline.llm import modeling

        return modeling.compute_dtype(self.cfg.model.precision, self.device)

    @cached_property
    def groups(self) -> np.ndarray:
        """The group key of each train row (`cv.group_by`): what inner splits keep together."""
        return folds.group_keys(self.train.frame, self.cfg.cv.group_by)


def multirun_job_dir() -> Path | None:
    """The folder Hydra gives this job when it runs inside a multirun sweep (each job writes its own results
    there); None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return None


_PARSED: dict[bool, tuple[tuple, PairData]] = {}  # with_labels -> (file identity, parsed data)


def read_pairs(path: Path, with_labels: bool) -> PairData:
    """Parse an input file once per process (stage=all runs four stages on it): reused while the file's path, size
    and modification time are unchanged. One train and one test file are kept. Stages treat frames as read-only."""
    stat = path.stat() if path.exists() else None
    identity = (str(path.resolve()), stat and stat.st_mtime_ns, stat and stat.st_size)
    cached = _PARSED.get(with_labels)
    if cached is None or cached[0] != identity:
        _PARSED[with_labels] = (identity, load_pairs(path, with_labels=with_labels))
    return _PARSED[with_labels][1]


def open_run(cfg: DictConfig, stage: str, out_root: Path | None = None, record: bool = True) -> RunContext:
    """Resolve and read data.train / data.test once, create or check the folds, record how the stage is run (in
    `out_root`/manifests/: the experiment folder unless a multirun job or stage=predict writes elsewhere). With
    `record=False` the stage writes its manifest itself once its results are in place (stage=stack: a refused run
    must leave the record of the finished stacker as it was)."""
    layout = Layout.of(cfg)
    out = Layout(out_root) if out_root is not None else layout
    if out.root != layout.root and not layout.root.is_dir():
        raise UserError(f"{layout.root} is not an experiment folder (not found); check paths.output_dir and exp_name")
    artifacts.exp_dir(cfg, writable=out.root == layout.root)  # its dead writers' temp files removed
    paths = inputs.data_paths(cfg)
    train = read_pairs(paths.train, with_labels=True)
    test = read_pairs(paths.test, with_labels=False) if paths.test is not None else None
    if cfg.model.get("show_model_names"):
        for data in (train, test) if test is not None else (train,):
            check_model_names(data.frame, data.source)
    fold_of = folds.load_or_create(layout.root, train.frame, cfg.cv.n_folds, cfg.seed, cfg.cv.group_by)
    if record:
        artifacts.write_manifest(out.root, cfg, stage)
    return RunContext(cfg, layout, out, paths.train, paths.test, train, test, fold_of["fold"].to_numpy())
