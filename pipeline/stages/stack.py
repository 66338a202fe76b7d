"""stage=stack: stage two on the embed features, scored out-of-fold on the persisted folds (pipeline/stacking.py).

Reads the OOF feature table (after the leak check), cross-validates the configured members, blend and selection
with honest inner splits, and reports the result beside the baselines on the same folds: class prior, `length`
(the text-statistics member alone), the fine-tuned head alone and `linear` (one logistic regression on every
group). With a test file whose features exist, the fold models' mean scores it into submission.csv. Never loads an
LLM: missing test features are stage=embed's (or stage=predict's) job.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, context, layout, report, setups, stacking
from pipeline.data import LABEL_COLUMNS
from pipeline.scoring import logloss

log = logging.getLogger(__name__)


def results_dir(lay: layout.Layout) -> Path:
    """`stack/` in the experiment; under a Hydra multirun, each job's own folder so no job overwrites another."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return layout.Layout(Path(HydraConfig.get().runtime.output_dir)).stack
    return lay.stack


def run(cfg: DictConfig) -> dict:
    lay = layout.Layout.of(cfg)
    out = results_dir(lay)
    single_run = out == lay.stack
    ctx = context.open_run(cfg, "stack", out_root=out.parent)
    full = stacking.score(ctx, with_test=ctx.test is not None)
    metrics = {k: v for k, v in full.items() if not k.startswith("_")}
    metrics["results_dir"] = str(out)
    # The results are one unit: written into a fresh folder, then swapped in, so a kill never leaves old and new
    # models side by side, and a submission only ever sits beside the models that made it.
    staging = artifacts.staging_dir(out)  # private to this process: a parallel run never writes into it
    save(staging, cfg, full)
    report.write(staging, metrics, full["_labels"], full["_plots"], full["_fold_of"])
    artifacts.replace_dir(staging, out)
    submission = lay.submission if single_run else out / layout.SUBMISSION
    if full["_test"] is not None:
        stacking.write_submission(submission, full["_test_ids"], full["_test"])
        metrics["submission"] = str(submission)
    elif submission.exists():
        submission.unlink()  # made by older models: never leave it beside these
    print(report.table(metrics))
    if single_run:
        artifacts.update_metrics(lay.root, "stack", metrics)
        artifacts.drop_metrics(lay.root, "predict")
    else:
        artifacts.write_json(out / layout.METRICS_FILE, {"stack": metrics})
    return metrics


def save(out: Path, cfg: DictConfig, full: dict) -> None:
    """OOF probabilities, the settings stage=predict refits with, and the LightGBM members' boosters (text,
    inspectable with lightgbm.Booster)."""
    artifacts.write_parquet(out / layout.OOF, pd.DataFrame(
        {"id": full["_frame"]["id"].to_numpy(), "fold": full["_fold_of"], **dict(zip(LABEL_COLUMNS, full["_oof"].T))}))
    for k, fold in enumerate(full["_folds"]):
        for name, model in fold.models.items():
            booster = getattr(model, "booster_", None)
            if booster is not None:
                with artifacts.atomic_path(out / f"fold_{k}" / ("booster.txt" if name == "text" else
                                                                f"booster_{name}.txt")) as tmp:
                    booster.save_model(str(tmp))
    artifacts.write_json(out / layout.MODEL_FILE, {
        "stack": OmegaConf.to_container(cfg.stack, resolve=True), "n_folds": int(cfg.cv.n_folds),
        "setup": setups.stack_setup(cfg)})
    artifacts.mark_done(out, {"oof_logloss": logloss(full["_labels"], full["_oof"])})


