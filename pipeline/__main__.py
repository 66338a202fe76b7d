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
# The metric a sweep minimises, per stage: (metrics.json key, field).
SWEEP_METRIC = {"finetune": ("finetune", "oof_logloss"), "stack": ("stack", "oof_logloss"),
                "all": ("stack", "oof_logloss")}
log = logging.getLogger("pipeline")


def run_stage(cfg: DictConfig) -> dict:
    if cfg.stage not in STAGES:
        raise UserError(f"stage={cfg.stage} is not one of {', '.join(STAGES)}")
    module = importlib.import_module(f"pipeline.stages.{cfg.stage}")
    return module.run(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    import transformers

    transformers.logging.set_verbosity_error()  # load reports for the new `score` head are expected noise
    try:
        metrics = run_stage(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    key = SWEEP_METRIC.get(cfg.stage)
    if key and key[0] in metrics:
        return float(metrics[key[0]][key[1]])
    return None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
