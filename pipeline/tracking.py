"""Stage metrics to the experiment tracker the Trainer reports to (`finetune.report_to`: tensorboard, wandb,
mlflow), so a sweep's stack tables, baselines and timings sit beside the training curves in the tool users
already have. TensorBoard events go to `<experiment>/tracking/<stage>/` (a multirun job: its own folder)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserError
from pipeline.layout import Layout

log = logging.getLogger(__name__)
SUPPORTED = ("tensorboard", "wandb", "mlflow")


def trackers(cfg: DictConfig) -> list[str]:
    """The trackers named by finetune.report_to (a name, a list, `all`, or none)."""
    value = cfg.finetune.report_to
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(OmegaConf.to_container(value))
    if "all" in names:
        return list(SUPPORTED)
    return [n for n in names if n != "none"]


def scalars(metrics: dict, prefix: str) -> dict[str, float]:
    """Every number in a nested metrics dict as `prefix/key/...` (list items by index); text and None are left
    out (they stay in metrics.json)."""
    out: dict[str, float] = {}

    def walk(value, name: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if not str(key).startswith("_"):
                    walk(item, f"{name}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{name}/{i}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)

    walk(metrics, prefix)
    return out


def tracking_root(cfg: DictConfig) -> Path:
    """The experiment folder, or under a Hydra multirun the job's own folder (so jobs never mix their events)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return Layout.of(cfg).root


def log_stage_metrics(cfg: DictConfig, stage: str, metrics: dict) -> dict[str, float]:
    """Send a stage's numeric metrics to every configured tracker; returns what was sent."""
    names = trackers(cfg)
    values = scalars(metrics, stage)
    if not names or not values:
        return values
    for name in names:
        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("finetune.report_to=tensorboard needs the tensorboard package: pip install "
                                "tensorboard") from None
            with SummaryWriter(log_dir=str(Layout(tracking_root(cfg)).tracking(stage))) as writer:
                for key, value in values.items():
                    writer.add_scalar(key, value, 0)
        elif name == "wandb":
            import wandb

            run = wandb.run or wandb.init(project=cfg.exp_name, name=stage, config=OmegaConf.to_container(
                cfg, resolve=True))
            run.log(values)
        elif name == "mlflow":
            import mlflow

            with mlflow.start_run(run_name=f"{cfg.exp_name}-{stage}", nested=mlflow.active_run() is not None):
                mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()})
        else:
            log.warning("finetune.report_to=%s: stage metrics go only to %s", name, ", ".join(SUPPORTED))
    return values
