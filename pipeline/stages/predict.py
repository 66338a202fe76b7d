"""stage=predict: score a test file with a finished experiment.

Test features are extracted once per test file (each fold adapter on one loaded base model, averaged; or the
averaged adapter once with `embed.test_adapters=averaged`) and reused afterwards; under torchrun every rank scores
a share of the rows. The stacker is refitted from the experiment's stored OOF features with the settings recorded
in `stack/model.json` (deterministic, seconds): no pickled object is ever loaded, so an experiment folder from
someone else cannot run code. The command line must agree with the recorded setup (model, formatting, embed, cv,
seed, train file); a differing key is an `error:`, never a silently different submission.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from pipeline import artifacts, context, embed_passes, layout

from pipeline.stage_two import cv, store

from pipeline.stage_two.spec import StackSpec
from pipeline.errors import UserError


def output_root(cfg: DictConfig, lay: layout.Layout) -> Path:
    """Where predict writes: paths.predict_dir when set, else the experiment, which must then be writable."""
    if cfg.paths.predict_dir:
        return Path(cfg.paths.predict_dir)
    if not os.access(lay.root, os.W_OK):
        raise UserError(f"{lay.root} is read-only; set paths.predict_dir=A_WRITABLE_FOLDER for the submission, the "
                        "test features and the metrics")
    return lay.root


def run(cfg: DictConfig) -> dict:
    if cfg.data.test is None and cfg.data.train is not None:
        raise UserError("stage=predict needs a test file: add data.test=PATH")
    lay = layout.Layout.of(cfg)
    cfg = store.with_recorded_stack(cfg, lay, trusted=cfg.stack)
    ctx = context.open_run(cfg, "predict", out_root=output_root(cfg, lay))
    embed_passes.ensure_test_features(ctx)
    if not ctx.is_main:
        return {}
    result = cv.score(ctx, StackSpec.from_config(cfg.stack, cfg.seed), with_test=True, baselines=False)
    submission = ctx.out.submission
    store.write_submission(submission, ctx.test.frame["id"].to_numpy(), result.test)
    metrics = {"n_rows": int(len(ctx.test.frame)), "test": str(ctx.test_path), "submission": str(submission),
               "n_repaired": ctx.test.n_repaired, "test_adapters": cfg.embed.test_adapters}
    artifacts.update_metrics(ctx.out.root, "predict", metrics)
    print(f"predict: {metrics['n_rows']} rows scored -> {submission}")
    return metrics
