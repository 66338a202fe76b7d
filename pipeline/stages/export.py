"""stage=export: a finished experiment as a self-contained folder another machine scores from, offline and
read-only (a Kaggle dataset): `outputs/NAME/export/` (or `export.dir=PATH`).

setup: the command line is checked against the settings the stacker was trained with (as stage=predict does) and
stage two is refitted from the OOF features exactly as stage=predict refits it; run: the classifier (the base model
and the fold adapters, or with `export.model=merged` the adapters averaged and merged into one plain transformers
model), its tokenizer, the formatting and embed settings, each fold's stage two as numbers (never a pickle) and a
model card are written into a fresh folder; save: it is swapped in whole, and `metrics.json` says where.
`Predictor.load(folder)` scores from it (see pipeline/predictor.py).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, layout, setups, stacking
from pipeline.errors import UserError
from pipeline.predictor import Predictor

log = logging.getLogger(__name__)


def export_config(cfg: DictConfig, lay: layout.Layout) -> DictConfig:
    """The command line's config with the stacker's recorded settings, after checking the rest agrees."""
    model_file = lay.stack / layout.MODEL_FILE
    if not artifacts.read_state(lay.stack) or not model_file.exists():
        raise UserError(f"{lay.stack} holds no finished stacker; run stage=stack (or stage=all) first")
    saved = artifacts.read_json(model_file)
    differ = [key for key, _, _ in artifacts.differing_values(saved["setup"], setups.stack_setup(cfg))]
    if differ:
        raise UserError(f"this command line differs from the settings the stacker of {lay.root} was trained with: "
                        f"{', '.join(differ)}; drop those overrides")
    stacking.check_recorded_targets(saved["stack"], cfg.stack, model_file)
    return OmegaConf.merge(cfg, {"stack": saved["stack"], "data": {"test": None}})


def run(cfg: DictConfig) -> dict:
    lay = layout.Layout.of(cfg)
    target = Path(cfg.export.dir) if cfg.export.dir else lay.root / "export"
    predictor = Predictor.from_experiment(lay.root, export_config(cfg, lay))
    metrics = predictor.export(target, cfg.export.model, made_by=["python", "-m", "pipeline", *sys.argv[1:]])
    artifacts.update_metrics(lay.root, "export", metrics)
    print(f"export: {metrics['mode']} classifier and stage two -> {target} ({metrics['size_mb']} MB)")
    return metrics
