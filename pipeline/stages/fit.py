"""stage=fit: one LoRA adapter + `score` head trained on every row of data.train (plus data.extra), no folds.

What a final model is made of when no out-of-fold score is needed, and the start other experiments' fold
fine-tunes begin from (`finetune.init_adapter=outputs/<exp>/fit/adapter`): e.g. a one-time fit on extra labelled
pairs, never on rows those experiments score (see README "Start warm"). The same model, formatting and fine-tune
settings as stage=finetune (`finetune.*`); it writes fit/adapter/ and fit/state.json, and is skipped when done
with the same setup, refused when done with another.
"""
from __future__ import annotations

import logging
import shutil

from omegaconf import DictConfig

from pipeline import artifacts, context, inputs, setups
from pipeline.llm import modeling, training, warm_start

log = logging.getLogger(__name__)
HOW_TO_FIX = "use a new exp_name, or delete that folder to fit again"


def run(cfg: DictConfig) -> dict:
    # setup
    ctx = context.open_run(cfg, "fit")
    lay = ctx.layout
    setup = setups.fit_setup(cfg)
    settings = setups.finetune_settings(cfg)
    if artifacts.check_state(lay.fit, setup, HOW_TO_FIX, settings):
        log.info("fit: done, skipped (%s)", lay.fit_adapter)
        return artifacts.read_state(lay.fit)["stats"]
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    if cfg.finetune.init_adapter:
        warm_start.check_start(cfg, ctx.train.frame, ctx.train_path, source, scored=False)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    trained_on = [data.frame for data in (ctx.train, inputs.load_extra(cfg, ctx.train)) if data is not None]
    rows = [row for frame in trained_on
            for row in training.all_training_rows(tokenizer, frame, cfg.model, bool(cfg.finetune.swap_augmentation))]
    started = artifacts.read_state(lay.fit)
    if ctx.is_main and started and artifacts.changed_setup(started, setup):
        shutil.rmtree(lay.fit / "checkpoints", ignore_errors=True)  # another setup's steps are not this run's
    if ctx.is_main:
        artifacts.mark_started(lay.fit, {**setup, "settings": settings})

    # run
    model, stats = training.train_adapter(cfg, ctx.device, ctx.dtype, source, tokenizer, rows, int(cfg.seed),
                                          lay.fit / "checkpoints", lay.tracking("fit"))

    # save
    if ctx.is_main:
        staging = artifacts.staging_dir(lay.fit_adapter)
        model.save_pretrained(staging)
        artifacts.apply_user_mode(staging)
        artifacts.replace_dir(staging, lay.fit_adapter)
        # What the fit saw, by content: a fine-tune warm-started from it refuses to score those rows (warm_start.py).
        warm_start.record_seen(lay.fit, trained_on)
        artifacts.mark_done(lay.fit, {**setup, "settings": settings, "stats": stats})
        shutil.rmtree(lay.fit / "checkpoints", ignore_errors=True)
        artifacts.update_metrics(lay.root, "fit", stats)
        log.info("fit: %d rows in %.0f s (%.0f tokens/s) -> %s", stats["train_rows"], stats["train_seconds"],
                 stats["tokens_per_s"], lay.fit_adapter)
    return stats
