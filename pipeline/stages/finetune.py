"""stage=finetune: K-fold LoRA fine-tune of a sequence classifier with leak-free out-of-fold predictions.

For each fold k: train a LoRA adapter (+ the full `score` head, optionally started from the LM's verdict-word
embeddings and trained at its own learning rate) on the other folds (plus any `data.extra` rows) with the HF
Trainer, then score the held-out fold k in eval mode. That scoring pass is the embed pass: the same forward pass
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
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, context, extraction, inputs, layout, locks, modeling, setups, stacking
from pipeline.context import RunContext
from pipeline.data import LABEL_COLUMNS, swap_label
from pipeline.errors import UserError
from pipeline.formatting import EncodedPair, encode_frame
from pipeline.inference import pad_batch
from pipeline.layout import FinetuneFoldRecord
from pipeline.scoring import accuracy, fold_prior, logloss

log = logging.getLogger(__name__)
HOW_TO_FIX = "use a new exp_name, or delete that folder to retrain it"


class PaddingCollator:
    """Dynamic padding to the longest row of each batch (picklable: it runs in dataloader workers)."""

    def __init__(self, pad_id: int, multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask, _ = pad_batch([r["input_ids"] for r in rows], self.pad_id, multiple_of=self.multiple_of)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.as_tensor([r["labels"] for r in rows], dtype=torch.long)}


class LengthBatchSampler(torch.utils.data.Sampler):
    """Rows sorted by length (ties broken at random) and cut into batches of `batch_size`, the batches in random
    order, reseeded per epoch. Every batch holds rows of nearly one length, so dynamic padding wastes almost
    nothing at any data size (HF's LengthGroupedSampler sorts only within random mega-batches, which on a few
    hundred rows are a single batch: no grouping at all)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it, also when resuming mid-run
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        noise = torch.rand(len(self.lengths), generator=generator).tolist()
        order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i] + noise[i])
        # The DataLoader cuts this flat stream into batches again: full batches are shuffled, the short one goes
        # last (in the middle it would shift every later batch off its length group).
        full = len(order) - len(order) % self.batch_size
        batches = [order[i: i + self.batch_size] for i in range(0, full, self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]
        yield from order[full:]


def pipeline_trainer(head_learning_rate: float | None, tight_length_batches: bool = True):
    """The HF Trainer plus three things: the optimizer can give the `score` head its own learning rate (the
    scheduler then scales both groups alike); real / padded tokens are counted where batches reach the model, in
    the main process, so the counts hold with dataloader workers too; and `train_sampling_strategy=group_by_length`
    uses LengthBatchSampler (`tight_length_batches=False` keeps HF's sampler, for the benchmark's comparison)."""
    from transformers import Trainer

    class PipelineTrainer(Trainer):
        real_tokens = 0
        padded_tokens = 0

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if not (tight_length_batches and self.args.train_sampling_strategy == "group_by_length"):
                return super()._get_train_sampler(train_dataset)
            return LengthBatchSampler([len(row["input_ids"]) for row in dataset],
                                      self.args.per_device_train_batch_size, self.args.data_seed or self.args.seed)

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs["attention_mask"]
            self.real_tokens += int(mask.sum())
            self.padded_tokens += mask.numel()
            return super().training_step(model, inputs, *args, **kwargs)

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if not head_learning_rate:
                return optimizer
            head = {id(p) for n, p in (model or self.model).named_parameters() if "score" in n and p.requires_grad}
            head_groups = []
            for group in optimizer.param_groups:
                params = [p for p in group["params"] if id(p) in head]
                if params:
                    group["params"] = [p for p in group["params"] if id(p) not in head]
                    head_groups.append({**group, "params": params, "lr": head_learning_rate})
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            for group in head_groups:
                optimizer.add_param_group(group)
            return optimizer

    return PipelineTrainer


def training_rows(encoded: list[EncodedPair], swapped: list[EncodedPair] | None, labels: np.ndarray,
                  index: np.ndarray, swap_augmentation: bool) -> list[dict]:
    """Trainer rows for `index`; with swap augmentation each row also appears A/B-swapped with its label swapped."""
    rows = [{"input_ids": encoded[i].input_ids, "labels": int(labels[i])} for i in index]
    if swap_augmentation:
        rows += [{"input_ids": swapped[i].input_ids, "labels": swap_label(labels[i])} for i in index]
    return rows


def training_arguments(cfg: DictConfig, output_dir: Path, seed: int, dtype: torch.dtype, on: torch.device):
    from transformers import TrainingArguments

    ft = cfg.finetune
    ours = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=ft.per_device_batch_size,
        gradient_accumulation_steps=ft.gradient_accumulation_steps,
        num_train_epochs=ft.epochs,
        max_steps=ft.max_steps,
        learning_rate=ft.learning_rate,
        weight_decay=ft.weight_decay,
        warmup_steps=ft.warmup_ratio,
        lr_scheduler_type=ft.lr_scheduler,
        label_smoothing_factor=ft.label_smoothing,
        logging_steps=ft.logging_steps,
        save_strategy="steps",
        save_steps=ft.save_steps,
        save_total_limit=1,
        report_to=[] if ft.report_to in (None, "none") else ft.report_to,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=on.type == "cpu",
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="group_by_length" if ft.group_by_length else "random",
        remove_unused_columns=False,
        dataloader_num_workers=ft.dataloader_num_workers,
        ddp_find_unused_parameters=False,
        deepspeed=ft.deepspeed,
        disable_tqdm=False,
    )
    # Any other TrainingArguments field, by its own name, from finetune.training_args (it wins over ours).
    return TrainingArguments(**{**ours, **OmegaConf.to_container(ft.training_args, resolve=True)})


def train_fold(ctx: RunContext, k: int, source, tokenizer, rows: list[dict]) -> tuple[object, dict]:
    """Train fold k's adapter and head with the Trainer, resuming from its last checkpoint if one exists."""
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    cfg, on, dtype = ctx.cfg, ctx.device, ctx.dtype
    seed = int(cfg.seed) + k
    set_seed(seed)  # also seeds the fresh `score` head
    model = modeling.load_classifier(source, cfg.model, tokenizer, dtype, on)
    if cfg.finetune.head_init == "verdict_tokens":
        modeling.init_head_from_verdict_tokens(model, tokenizer, source, list(cfg.finetune.verdict_words))
    model = modeling.add_lora(model, cfg.model, cfg.finetune.lora, cfg.model.gradient_checkpointing)
    checkpoints = ctx.layout.checkpoints(k)
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume:
        log.info("fold %d: resuming from %s", k, resume)
    collator = PaddingCollator(tokenizer.pad_token_id, multiple_of=8 if on.type == "cuda" else 1)
    trainer = pipeline_trainer(cfg.finetune.head_learning_rate)(
        model=model, args=training_arguments(cfg, checkpoints, seed, dtype, on), train_dataset=rows,
        data_collator=collator, processing_class=tokenizer)
    for callback in trainer.callback_handler.callbacks:
        # TensorBoard would write under checkpoints/, which is removed once the fold is done.
        if type(callback).__name__ == "TensorBoardCallback" and callback.logging_dir is None:
            callback.logging_dir = str(ctx.layout.tracking("finetune") / f"fold_{k}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    real, padded = trainer.real_tokens, trainer.padded_tokens
    stats = {"train_seconds": round(seconds, 2), "train_rows": len(rows), "train_tokens": real,
             "padded_tokens": padded, "tokens_per_s": round(real / seconds, 1),
             "padding_waste": round(1 - real / padded, 4) if padded else 0.0, "resumed_from": resume,
             "global_step": int(trainer.state.global_step)}
    return trainer.model, stats


def fold_list(cfg: DictConfig) -> list[int]:
    """The folds this run trains: all of them, or `finetune.folds` (so K folds can run as K jobs, one GPU each)."""
    n_folds = int(cfg.cv.n_folds)
    chosen = list(range(n_folds)) if cfg.finetune.folds is None else [int(k) for k in cfg.finetune.folds]
    bad = [k for k in chosen if not 0 <= k < n_folds]
    if bad:
        raise UserError(f"finetune.folds={chosen}: folds {bad} do not exist with cv.n_folds={n_folds}")
    return chosen


def extra_training_rows(ctx: RunContext, tokenizer) -> list[dict]:
    """`data.extra` rows (every fold trains on them; none is ever scored)."""
    extra = inputs.load_extra(ctx.cfg, ctx.train)
    if extra is None:
        return []
    swap = bool(ctx.cfg.finetune.swap_augmentation)
    encoded = encode_frame(tokenizer, extra.frame, ctx.cfg.model)
    swapped = encode_frame(tokenizer, extra.frame, ctx.cfg.model, swap=True) if swap else None
    return training_rows(encoded, swapped, extra.frame["label"].to_numpy(), np.arange(len(encoded)), swap)


@dataclass
class FinetuneRun:
    """What every fold of one fine-tune run shares: the encoded rows, the setup folds are checked against, the
    scoring-pass settings and where test features go."""

    ctx: RunContext
    source: Path | str
    tokenizer: object
    rows: extraction.Rows            # every train row; the swapped orientation when augmentation or TTA reads it
    scoring_rows: extraction.Rows    # what the fold-end pass scores (the swapped rows only with swap TTA)
    extra_rows: list[dict]
    setup: dict
    settings: dict                   # the settings behind setup["config_hash"], recorded to name a mismatch
    embed_setup: dict
    pass_settings: extraction.PassSettings
    test_folder: Path | None         # with a test file and embed.test_adapters=each: scored at each fold's end
    test_rows: extraction.Rows | None = None


def setup(cfg: DictConfig) -> FinetuneRun:
    ctx = context.open_run(cfg, "finetune")
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    setup_ = setups.finetune_setup(cfg)
    settings = setups.finetune_settings(cfg)
    # Every finished fold must agree with this command line, not only the ones this job trains: folds trained as
    # separate jobs are later read together, and one mistyped job must not be mixed in silently.
    for k in range(ctx.n_folds):
        artifacts.check_state(ctx.layout.finetune_fold(k), setup_, HOW_TO_FIX, settings)
    stacking.check_inner_splits(ctx.labels, ctx.groups, ctx.fold_of, int(cfg.stack.inner_folds), int(cfg.seed))
    # One encoding of the train file; the swapped one only when augmentation or swap TTA reads it.
    rows = extraction.Rows(encode_frame(tokenizer, ctx.train.frame, cfg.model), None)
    if cfg.finetune.swap_augmentation or cfg.embed.swap_tta:
        rows.swapped = encode_frame(tokenizer, ctx.train.frame, cfg.model, swap=True)
    score_test = ctx.test is not None and cfg.embed.test_adapters == "each"
    if cfg.embed.max_length not in (None, cfg.model.max_length):  # train short, score long
        scoring_rows = extraction.encode_rows(tokenizer, ctx.train.frame, cfg)
    else:
        scoring_rows = rows if cfg.embed.swap_tta else extraction.Rows(rows.encoded, None)
    return FinetuneRun(ctx, source, tokenizer, rows, scoring_rows,
                       extra_training_rows(ctx, tokenizer), setup_, settings, setups.embed_setup(cfg, setup_),
                       extraction.PassSettings(tokenizer.pad_token_id, cfg.embed, ctx.device, ctx.dtype, source),
                       extraction.test_folder(ctx, setup_) if score_test else None)


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
    rows = training_rows(run_.rows.encoded, run_.rows.swapped, labels, train_index,
                         cfg.finetune.swap_augmentation) + run_.extra_rows
    model, stats = train_fold(ctx, k, run_.source, run_.tokenizer, rows)
    if ctx.is_main:
        model.save_pretrained(lay.adapter(k))
        artifacts.apply_user_mode(lay.adapter(k))
    start = time.perf_counter()
    # The held-out scoring pass is also the embed pass: head probabilities and vectors together, every rank
    # scoring a share of the rows.
    scored = extraction.score_rows(model, run_.scoring_rows.take(held_out), run_.pass_settings,
                                   ctx.out.shard_folder(f"finetune_fold_{k}"), desc=f"fold {k}")
    train_folds = sorted(int(f) for f in set(fold_of[train_index]))
    if ctx.is_main:
        probs = extraction.head_probabilities(scored.features)
        artifacts.write_parquet(lay.fold_oof(k), pd.DataFrame(
            {"id": ctx.ids[held_out], "fold": k, **dict(zip(LABEL_COLUMNS, probs.T))}))
        stats["logloss"] = logloss(labels[held_out], probs)
        artifacts.mark_done(fold_dir, FinetuneFoldRecord(k, train_folds, stats, run_.settings).as_state(run_.setup))
        extraction.write_train_fold(ctx, k, scored, run_.embed_setup, train_folds, time.perf_counter() - start)
    if run_.test_folder is not None and not layout.test_fold_features(run_.test_folder, k).exists():
        if run_.test_rows is None:
            run_.test_rows = extraction.encode_rows(run_.tokenizer, ctx.test.frame, cfg)
        extraction.write_test_pass(ctx, run_.test_folder, k, model, run_.test_rows, run_.pass_settings)
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
        extraction.barrier()
    return save(run_) if run_.ctx.is_main else {}


def summarise(oof: pd.DataFrame, labels: np.ndarray, fold_of: np.ndarray, states: list[dict]) -> dict:
    probs = oof[list(LABEL_COLUMNS)].to_numpy()
    stats = [s["stats"] for s in states]
    prior = fold_prior(labels, fold_of)
    seconds = sum(s["train_seconds"] for s in stats)
    return {
        "oof_logloss": logloss(labels, probs),
        "prior_logloss": logloss(labels, prior),
        "accuracy": accuracy(labels, probs),
        "per_fold": [s["logloss"] for s in stats],
        "train_seconds": round(seconds, 2),
        "tokens_per_s": round(sum(s["train_tokens"] for s in stats) / seconds, 1),
        "padding_waste": round(1 - sum(s["train_tokens"] for s in stats) / sum(s["padded_tokens"] for s in stats), 4),
        "n_rows": int(len(labels)),
    }
