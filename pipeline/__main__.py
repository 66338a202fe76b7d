"""`python -m pipeline [stage=...] [key=value ...]`: dispatch a stage, return the metric sweeps minimise."""
from __future__ import annotations

import importlib
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from pipeline.errors import UserError

STAGES = ("check", "finetune", "embed", "stack", "predict", "all")
# The metric a sweep minimises, per stage: its path in the stage's returned metrics.
SWEEP_METRIC = {"finetune": ("oof_logloss",), "stack": ("oof_logloss",), "all": ("stack", "oof_logloss")}
log = logging.getLogger("pipeline")


def run_stage(cfg: DictConfig) -> dict:
    if cfg.stage not in STAGES:
        raise UserError(f"stage={cfg.stage} is not one of {', '.join(STAGES)}")
    module = importlib.import_module(f"pipeline.stages.{cfg.stage}")
    return module.run(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run_stage(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    value = metrics
    for key in SWEEP_METRIC.get(cfg.stage, (None,)):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
