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

from pipeline import artifacts, context, layout, setups

from pipeline.stage_two import cv, store

from pipeline.stage_two.spec import StackSpec
from pipeline.stage_two import report
from pipeline.data import LABEL_COLUMNS
from pipeline.scoring import logloss

log = logging.getLogger(__name__)


def results_dir(lay: layout.Layout) -> Path:
    """`stack/` in the experiment; under a Hydra multirun, each job's own folder so no job overwrites another."""
    job_dir = context.multirun_job_dir()
    return lay.stack if job_dir is None else layout.Layout(job_dir).stack


def run(cfg: DictConfig) -> dict:
    lay = layout.Layout.of(cfg)
    out = results_dir(lay)
    single_run = out == lay.stack
    spec = StackSpec.from_config(cfg.stack, cfg.seed)
    ctx = context.open_run(cfg, "stack", out_root=out.parent, record=False)
    result = cv.score(ctx, spec, with_test=ctx.test is not None)
    metrics = result.metrics()
    metrics["results_dir"] = str(out)
    # The results are one unit: written into a fresh folder, then swapped in, so a kill never leaves old and new
    # models side by side, and a submission only ever sits beside the models that made it.
    staging = artifacts.staging_dir(out)  # private to this process: a parallel run never writes into it
    save(staging, ctx, result)
    report.write(staging, metrics, ctx.labels, result.plots(), ctx.fold_of)
    artifacts.replace_dir(staging, out)
    artifacts.write_manifest(out.parent, cfg, "stack")
    submission = lay.submission if single_run else out / layout.SUBMISSION
    if result.test is not None:
        store.write_submission(submission, ctx.test.frame["id"].to_numpy(), result.test)
        metrics["submission"] = str(submission)
    elif submission.exists():
        submission.unlink()  # made by older models: never leave it beside these
    print(report.table(metrics))
    if single_run:
        artifacts.update_metrics(lay.root, "stack", metrics)
        for made_by_old_stacker in ("predict", "export"):
            artifacts.drop_metrics(lay.root, made_by_old_stacker)
    else:
        artifacts.write_json(out / layout.METRICS_FILE, {"stack": metrics})
    return metrics


def save(out: Path, ctx: context.RunContext, result: cv.StackResult) -> None:
    """OOF probabilities, the settings stage=predict refits with, and each fold's learned numbers (LightGBM boosters
    as text, linear coefficients and PCA components as npz; never a pickle: store.save_fold_model), with the
    record of each fold (choice, blend, chosen parameters, files) in model.json."""
    artifacts.write_parquet(out / layout.OOF, pd.DataFrame(
        {"id": ctx.train.frame["id"].to_numpy(), "fold": ctx.fold_of, **dict(zip(LABEL_COLUMNS, result.oof.T))}))
    length = result.spec.baselines["length"].name
    exported = [store.save_fold_model(fold.model, out / f"fold_{k}", length, strict=False)
                for k, fold in enumerate(result.folds)]
    artifacts.write_json(out / layout.MODEL_FILE, {
        "stack": OmegaConf.to_container(ctx.cfg.stack, resolve=True), "n_folds": ctx.n_folds,
        "setup": setups.stack_setup(ctx.cfg), "folds": exported,
        "config": OmegaConf.to_container(ctx.cfg, resolve=True)})  # what Predictor.load(experiment) scores with
    artifacts.mark_done(out, {"oof_logloss": logloss(ctx.labels, result.oof)})
