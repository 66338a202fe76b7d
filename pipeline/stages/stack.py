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
    spec = stacking.StackSpec.from_config(cfg.stack, cfg.seed)
    ctx = context.open_run(cfg, "stack", out_root=out.parent)
    result = stacking.score(ctx, spec, with_test=ctx.test is not None)
    metrics = result.metrics()
    metrics["results_dir"] = str(out)
    # The results are one unit: written into a fresh folder, then swapped in, so a kill never leaves old and new
    # models side by side, and a submission only ever sits beside the models that made it.
    staging = artifacts.staging_dir(out)  # private to this process: a parallel run never writes into it
    save(staging, ctx, result)
    report.write(staging, metrics, ctx.labels, result.plots(), ctx.fold_of)
    artifacts.replace_dir(staging, out)
    submission = lay.submission if single_run else out / layout.SUBMISSION
    if result.test is not None:
        stacking.write_submission(submission, ctx.test.frame["id"].to_numpy(), result.test)
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


def save(out: Path, ctx: context.RunContext, result: stacking.StackResult) -> None:
    """OOF probabilities, the settings stage=predict refits with, and each member's learned numbers per fold
    (LightGBM boosters as text, linear coefficients as npz; never a pickle). The `length` baseline member's booster
    keeps its documented name, fold_k/booster.txt."""
    artifacts.write_parquet(out / layout.OOF, pd.DataFrame(
        {"id": ctx.train.frame["id"].to_numpy(), "fold": ctx.fold_of, **dict(zip(LABEL_COLUMNS, result.oof.T))}))
    length = result.spec.baselines["length"].name
    exported = []
    for k, fold in enumerate(result.folds):
        files = {}
        for member in result.spec.members:
            stem = member.artifact_prefix if member.name == length else f"{member.artifact_prefix}_{member.name}"
            files[member.name] = member.export(fold.fits[member.name], out / f"fold_{k}", stem)
        exported.append({name: {"params": fold.fits[name].params, "files": names} for name, names in files.items()})
    artifacts.write_json(out / layout.MODEL_FILE, {
        "stack": OmegaConf.to_container(ctx.cfg.stack, resolve=True), "n_folds": ctx.n_folds,
        "setup": setups.stack_setup(ctx.cfg), "folds": exported})
    artifacts.mark_done(out, {"oof_logloss": logloss(ctx.labels, result.oof)})
