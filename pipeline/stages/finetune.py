"""stage=finetune: K-fold LoRA fine-tune of a sequence classifier with leak-free out-of-fold predictions.

For each fold k: train a LoRA adapter (+ the full `score` head, optionally started from the LM's verdict-word
embeddings, or from `finetune.init_adapter`, and trained at its own learning rate) on the other folds (plus any
`data.extra` rows) with the HF Trainer (pipeline/training.py; `finetune.train=false` takes no step: the
frozen-feature path), then score the held-out fold k in eval mode, at `embed.max_length` tokens when set. That scoring pass is the embed pass: the same forward pass
gives the head's OOF probabilities and the pooled vectors the stacker reads, written as `embed/fold_k/`, so
stage=embed has nothing left to redo. Finished folds are skipped on re-runs; an unfinished fold resumes from its
last Trainer checkpoint; a fold made with a different setup is reported, never mixed in.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pipeline import (artifacts, context, dist, embed_passes, feature_table, folds, inputs, layout, locks, setups,
                      teachers, validation)
from pipeline.llm import modeling, training, warm_start
from pipeline.context import RunContext
from pipeline.data import LABEL_COLUMNS, NO_LABEL
from pipeline.errors import UserError
from pipeline.formatting import encode_frame
from pipeline.layout import FinetuneFoldRecord
from pipeline.scoring import accuracy, fold_prior, logloss

log = logging.getLogger(__name__)
HOW_TO_FIX = "use a new exp_name, or delete that folder to retrain it"


def train_fold(ctx: RunContext, k: int, source, tokenizer, rows: list[dict],
               prefixes: training.PrefixStore | None = None) -> tuple[object, dict]:
    """Train fold k's adapter and head (seed + k), resuming from its last checkpoint if one exists; a cached
    prefix comes from the run's `prefixes` (every fold's rows, computed once)."""
    return training.train_adapter(ctx.cfg, ctx.device, ctx.dtype, source, tokenizer, rows, int(ctx.cfg.seed) + k,
                                  ctx.layout.checkpoints(k), ctx.layout.tracking("finetune") / f"fold_{k}",
                                  prefixes=prefixes)


def fold_list(cfg: DictConfig) -> list[int]:
    """The folds this run trains: all of them, or `finetune.folds` (so K folds can run as K jobs, one GPU each)."""
    n_folds = int(cfg.cv.n_folds)
    chosen = list(range(n_folds)) if cfg.finetune.folds is None else [int(k) for k in cfg.finetune.folds]
    bad = [k for k in chosen if not 0 <= k < n_folds]
    if bad:
        raise UserError(f"finetune.folds={chosen}: folds {bad} do not exist with cv.n_folds={n_folds}")
    return chosen


def extra_training_rows(ctx: RunContext, tokenizer, label_targets: bool) -> list[dict]:
    """`data.extra` rows (every fold trains on them; none is ever scored). With a teacher they carry their own label
    as the soft target: no teacher labelled them."""
    extra = inputs.load_extra(ctx.cfg, ctx.train)
    if extra is None:
        return []
    return training.all_training_rows(tokenizer, extra.frame, ctx.cfg.model, bool(ctx.cfg.finetune.swap_augmentation),
                                      label_targets)


def pseudo_labelled_rows(run_: "FinetuneRun", k: int) -> list[dict]:
    """data.unlabeled's rows for fold k: no label, teacher fold k's probabilities as their only target."""
    if run_.pseudo_rows is None:
        return []
    n = len(run_.pseudo_rows)
    return training.training_rows(run_.pseudo_rows.encoded, run_.pseudo_rows.swapped, np.full(n, NO_LABEL),
                                  np.arange(n), run_.ctx.cfg.finetune.swap_augmentation,
                                  run_.targets.unlabeled_by_fold[k])


@dataclass
class FinetuneRun:
    """What every fold of one fine-tune run shares: the encoded rows, the setup folds are checked against, the
    scoring-pass settings and where test features go."""

    ctx: RunContext
    source: Path | str
    tokenizer: object
    rows: embed_passes.Rows            # every train row; the swapped orientation when augmentation or TTA reads it
    scoring_rows: embed_passes.Rows    # what the fold-end pass scores (the swapped rows only with swap TTA)
    extra_rows: list[dict]
    setup: dict
    settings: dict                   # the settings behind setup["config_hash"], recorded to name a mismatch
    embed_setup: dict
    pass_settings: embed_passes.PassSettings
    test_folder: Path | None         # with a test file and embed.test_adapters=each: scored at each fold's end
    targets: teachers.FoldTargets | None  # finetune.teacher: per fold, soft targets free of that fold's labels
    pseudo_rows: embed_passes.Rows | None  # data.unlabeled, encoded (+ swapped with augmentation)
    test_rows: embed_passes.Rows | None = None
    prefixes: training.PrefixStore | None = None  # finetune.cache_prefix: the frozen layers' output, once per row

    def rows_any_fold_trains(self) -> list[list[int]]:
        """The token ids of every row some fold trains on: each train row (both orientations under swap
        augmentation), the extra rows and the pseudo-labelled ones."""
        swapped = bool(self.ctx.cfg.finetune.swap_augmentation)
        encoded = [self.rows] + ([self.pseudo_rows] if self.pseudo_rows is not None else [])
        return [pair.input_ids for r in encoded for pair in [*r.encoded, *(r.swapped if swapped else [])]] + \
            [row["input_ids"] for row in self.extra_rows]


def setup(cfg: DictConfig) -> FinetuneRun:
    ctx = context.open_run(cfg, "finetune")
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    config = warm_start.base_model_config(source)
    if config is not None:
        validation.validate_lora_layers(cfg.finetune, int(config["num_hidden_layers"]))
    if cfg.finetune.init_adapter:
        warm_start.check_start(cfg, ctx.train.frame, ctx.train_path, source, scored=True)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    setup_ = setups.finetune_setup(cfg)
    settings = setups.finetune_settings(cfg)
    # Every finished fold must agree with this command line, not only the ones this job trains: folds trained as
    # separate jobs are later read together, and one mistyped job must not be mixed in silently.
    done = [artifacts.check_state(ctx.layout.finetune_fold(k), setup_, HOW_TO_FIX, settings) for k in range(ctx.n_folds)]
    folds.check_inner_splits(ctx.labels, ctx.groups, ctx.fold_of, int(cfg.stack.inner_folds), int(cfg.seed))
    # One encoding of the train file; the swapped one only when augmentation or swap TTA reads it.
    rows = embed_passes.Rows(encode_frame(tokenizer, ctx.train.frame, cfg.model), None)
    if cfg.finetune.swap_augmentation or cfg.embed.swap_tta:
        rows.swapped = encode_frame(tokenizer, ctx.train.frame, cfg.model, swap=True)
    score_test = ctx.test is not None and cfg.embed.test_adapters == "each"
    if cfg.embed.max_length not in (None, cfg.model.max_length):  # train short, score long
        scoring_rows = embed_passes.encode_rows(tokenizer, ctx.train.frame, cfg)
    else:
        scoring_rows = rows if cfg.embed.swap_tta else embed_passes.Rows(rows.encoded, None)
    unlabeled = inputs.load_unlabeled(cfg, ctx.train, ctx.test)
    targets = teachers.load(ctx, [k for k in fold_list(cfg) if not done[k]], unlabeled)
    pseudo_rows = None
    if unlabeled is not None:
        frame = unlabeled.data.frame
        pseudo_rows = embed_passes.Rows(encode_frame(tokenizer, frame, cfg.model),
                                        encode_frame(tokenizer, frame, cfg.model, swap=True)
                                        if cfg.finetune.swap_augmentation else None)
    run_ = FinetuneRun(ctx, source, tokenizer, rows, scoring_rows,
                       extra_training_rows(ctx, tokenizer, targets is not None), setup_, settings,
                       setups.embed_setup(cfg, setup_),
                       embed_passes.PassSettings(tokenizer.pad_token_id, cfg.embed, ctx.device, ctx.dtype, source),
                       feature_table.test_folder(ctx, setup_) if score_test else None, targets, pseudo_rows)
    run_.prefixes = training.PrefixStore(run_.rows_any_fold_trains())
    return run_


def train_and_score_fold(run_: FinetuneRun, k: int) -> None:
    """Fold k: train its adapter (resuming a checkpoint of the same setup), then the held-out pass that gives its
    OOF head probabilities and features (and the test rows' with a test file). Skipped when already done."""
    ctx, cfg = run_.ctx, run_.ctx.cfg
    lay, labels, fold_of = ctx.layout, ctx.labels, ctx.fold_of
    fold_dir = lay.finetune_fold(k)
    if artifacts.check_state(fold_dir, run_.setup, HOW_TO_FIX, run_.settings):
        log.info("fold %d: done, skipped", k)
        return
    started = artifacts.read_state(fold_dir)
    if ctx.is_main and started and artifacts.changed_setup(started, run_.setup):
        # Started with other settings (e.g. a crash on a bad one): its checkpoints are not this run's.
        shutil.rmtree(lay.checkpoints(k), ignore_errors=True)
    if ctx.is_main:
        artifacts.mark_started(fold_dir, {**run_.setup, "settings": run_.settings})
    train_index = np.flatnonzero(fold_of != k)
    held_out = np.flatnonzero(fold_of == k)
    soft = run_.targets.by_fold[k] if run_.targets is not None else None
    rows = training.training_rows(run_.rows.encoded, run_.rows.swapped, labels, train_index,
                                  cfg.finetune.swap_augmentation, soft) + run_.extra_rows + pseudo_labelled_rows(run_, k)
    model, stats = train_fold(ctx, k, run_.source, run_.tokenizer, rows, run_.prefixes)
    if soft is not None:  # how sure the teachers' in-fold targets are on the rows they trained on
        stats["teacher_target_logloss"] = logloss(labels[train_index], soft[train_index])
    if ctx.is_main:
        model.save_pretrained(lay.adapter(k))
        artifacts.apply_user_mode(lay.adapter(k))
    start = time.perf_counter()
    # The held-out scoring pass is also the embed pass: head probabilities and vectors together, every rank
    # scoring a share of the rows.
    scored = embed_passes.score_rows(model, run_.scoring_rows.take(held_out), run_.pass_settings,
                                   ctx.out.shard_folder(f"finetune_fold_{k}"), desc=f"fold {k}")
    train_folds = sorted(int(f) for f in set(fold_of[train_index]))
    if ctx.is_main:
        probs = scored.features.head_probabilities()
        artifacts.write_parquet(lay.fold_oof(k), pd.DataFrame(
            {"id": ctx.ids[held_out], "fold": k, **dict(zip(LABEL_COLUMNS, probs.T))}))
        stats["logloss"] = logloss(labels[held_out], probs)
        artifacts.mark_done(fold_dir, FinetuneFoldRecord(k, train_folds, stats, run_.settings).as_state(run_.setup))
        embed_passes.write_train_fold(ctx, k, scored, run_.embed_setup, train_folds, time.perf_counter() - start)
    if run_.test_folder is not None and not layout.test_fold_features(run_.test_folder, k).exists():
        twin = embed_passes.written_twin(ctx, run_.test_folder, model, k)
        if twin is not None:  # the frozen path: every fold scores as the first
            embed_passes.copy_test_pass(ctx, run_.test_folder, twin, k)
        else:
            if run_.test_rows is None:
                run_.test_rows = embed_passes.encode_rows(run_.tokenizer, ctx.test.frame, cfg)
            embed_passes.write_test_pass(ctx, run_.test_folder, k, model, run_.test_rows, run_.pass_settings)
    if ctx.is_main:
        shutil.rmtree(lay.checkpoints(k), ignore_errors=True)
        log.info("fold %d: logloss %.4f, %.0f tokens/s", k, stats["logloss"], stats["tokens_per_s"])


def save(run_: FinetuneRun) -> dict:
    """Once every fold is done (by this job or others): the OOF probabilities in train-file order and the
    metrics, written under the shared-files lock (parallel fold jobs may finish together)."""
    ctx = run_.ctx
    lay = ctx.layout
    with locks.shared_files(lay.root):
        states = [artifacts.read_state(lay.finetune_fold(k)) for k in range(ctx.n_folds)]
        pending = [k for k, state in enumerate(states) if not (state and state.get(layout.DONE))]
        if pending:
            log.info("finetune: folds %s still to train (finetune.folds=%s done)", pending, fold_list(ctx.cfg))
            return {"pending_folds": pending}
        for k in range(ctx.n_folds):  # a job of other settings may have finished a fold meanwhile
            artifacts.check_state(lay.finetune_fold(k), run_.setup, HOW_TO_FIX, run_.settings)
        oof = pd.concat([artifacts.read_parquet(lay.fold_oof(k), f"delete {lay.finetune_fold(k)} to retrain that "
                                                                 "fold") for k in range(ctx.n_folds)])
        oof["id"] = oof["id"].astype(str)
        oof = oof.set_index("id").loc[ctx.ids].reset_index()
        artifacts.write_parquet(lay.finetune_oof, oof)
        metrics = summarise(oof, ctx.labels, ctx.fold_of, states)
        artifacts.update_metrics(lay.root, "finetune", metrics)
    log.info("finetune: oof_logloss %.4f (class prior %.4f), accuracy %.3f, %.0f train tokens/s, padding waste %.3f",
             metrics["oof_logloss"], metrics["prior_logloss"], metrics["accuracy"], metrics["tokens_per_s"],
             metrics["padding_waste"])
    return metrics


def run(cfg: DictConfig) -> dict:
    run_ = setup(cfg)
    for k in fold_list(cfg):
        # The fold's lock: a parallel job on the same fold fails at once, one on another fold goes on.
        with locks.fold(run_.ctx.layout.finetune_fold(k), k, f"stage=finetune fold {k}"):
            train_and_score_fold(run_, k)
        dist.barrier()
    return save(run_) if run_.ctx.is_main else {}


def summarise(oof: pd.DataFrame, labels: np.ndarray, fold_of: np.ndarray, states: list[dict]) -> dict:
    probs = oof[list(LABEL_COLUMNS)].to_numpy()
    stats = [s["stats"] for s in states]
    prior = fold_prior(labels, fold_of)
    seconds = sum(s["train_seconds"] for s in stats)
    tokens, padded = sum(s["train_tokens"] for s in stats), sum(s["padded_tokens"] for s in stats)
    return {
        "oof_logloss": logloss(labels, probs),
        "prior_logloss": logloss(labels, prior),
        "accuracy": accuracy(labels, probs),
        "per_fold": [s["logloss"] for s in stats],
        "train_seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        "padding_waste": round(1 - tokens / padded, 4) if padded else 0.0,
        "n_rows": int(len(labels)),
        # finetune.teacher: per fold, the log loss of the soft targets on the rows the fold trained on
        **({"teacher_target_logloss": [s["teacher_target_logloss"] for s in stats]}
           if all("teacher_target_logloss" in s for s in stats) else {}),
    }
