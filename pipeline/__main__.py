"""`python -m pipeline [stage=...] [key=value ...]`: dispatch a stage, return the metric sweeps minimise."""
from __future__ import annotations

import importlib
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from pipeline import artifacts, tracking, validation
from pipeline.errors import UserError

STAGES = ("check", "finetune", "embed", "stack", "predict", "all")
# The metric a sweep minimises, per stage: its path in the stage's returned metrics.
SWEEP_METRIC = {"finetune": ("oof_logloss",), "stack": ("oof_logloss",), "all": ("stack", "oof_logloss")}
log = logging.getLogger("pipeline")


def run_stage(cfg: DictConfig) -> dict:
    if cfg.stage not in STAGES:
        raise UserError(f"stage={cfg.stage} is not one of {', '.join(STAGES)}")
    validation.validate(cfg)
    module = importlib.import_module(f"pipeline.stages.{cfg.stage}")
    metrics = module.run(cfg)
    if artifacts.is_main_process():
        tracking.log_stage_metrics(cfg, cfg.stage, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run_stage(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    value = metrics
    for key in SWEEP_METRIC.get(cfg.stage, (None,)):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def check_overrides(argv: list[str]) -> None:
    """Compose the config the way @hydra.main will, so a mistyped key or option (`finetune.epoch=2`, `modell=x`,
    `model=tinyy`) is one `error:` line with Hydra's own suggestion and exit 2, not a multi-line report. Multirun
    sweeps and Hydra's own flags are left to Hydra."""
    if any(arg.startswith("-") or arg.startswith(("hydra", "+hydra")) for arg in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
    try:
        with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
            compose(config_name="config", overrides=argv)
    except (HydraException, OmegaConfBaseException) as exc:
        message = " ".join(str(exc).split()).split(" Config search path:")[0]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_overrides(sys.argv[1:])
    main()
