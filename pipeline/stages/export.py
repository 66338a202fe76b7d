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
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, layout

from pipeline.stage_two import store
from pipeline.errors import UserError
from pipeline.predictor import Predictor, check_export_target

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    lay = layout.Layout.of(cfg)
    target = Path(cfg.export.dir) if cfg.export.dir else lay.root / "export"
    # Refused before anything is written: the export's record goes into the experiment's metrics.json.
    if lay.root.is_dir() and not os.access(lay.root, os.W_OK):
        raise UserError(f"{lay.root} is read-only: stage=export records the export in its metrics.json; copy the "
                        "experiment somewhere writable, or export from Python: Predictor.load(experiment)"
                        ".export(folder)")
    check_export_target(target, lay.root, experiment=True)
    recorded = store.with_recorded_stack(cfg, lay, trusted=cfg.stack)
    predictor = Predictor.from_experiment(lay.root, OmegaConf.merge(recorded, {"data": {"test": None}}))
    metrics = predictor.export(target, cfg.export.model, made_by=["python", "-m", "pipeline", *sys.argv[1:]])
    artifacts.update_metrics(lay.root, "export", metrics)
    print(f"export: {metrics['mode']} classifier and stage two -> {target} ({metrics['size_mb']} MB)")
    return metrics
