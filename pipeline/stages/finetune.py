"""stage=finetune: K-fold LoRA fine-tune of a sequence classifier with leak-free out-of-fold predictions.

For each fold k: train a LoRA adapter (+ the full `score` head) on the other folds with the HF Trainer, score the
held-out fold k (both A/B orientations when swap TTA is on), save `finetune/fold_k/` and mark it done. Finished
folds are skipped on re-runs; an unfinished fold resumes from its last Trainer checkpoint; a fold made with a
different setup is reported, never mixed in.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, folds, inputs, modeling
from pipeline.data import LABEL_COLUMNS, swap_label, swap_probabilities
from pipeline.formatting import EncodedPair, encode_frame
from pipeline.inference import forward_pass, pad_batch, softmax
from pipeline.scoring import accuracy, fold_prior, logloss

log = logging.getLogger(__name__)
# Settings that change how a run is operated, not what it learns: changing them keeps finished folds valid.
OPERATIONAL_KEYS = ("logging_steps", "save_steps", "report_to", "dataloader_num_workers", "eval_batch_tokens",
                    "deepspeed")
HOW_TO_FIX = "use a new exp_name, or delete that folder to retrain it"


class PaddingCollator:
    """Dynamic padding to the longest row of each batch; counts real and padded tokens (padding waste)."""

    def __init__(self, pad_id: int, multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple_of = multiple_of
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask, _ = pad_batch([r["input_ids"] for r in rows], self.pad_id, multiple_of=self.multiple_of)
        self.real_tokens += int(mask.sum())
        self.padded_tokens += mask.numel()
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.as_tensor([r["labels"] for r in rows], dtype=torch.long)}

    @property
    def waste(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def training_rows(encoded: list[EncodedPair], swapped: list[EncodedPair], labels: np.ndarray,
                  index: np.ndarray, swap_augmentation: bool) -> list[dict]:
    """Trainer rows for `index`; with swap augmentation each row also appears A/B-swapped with its label swapped."""
    rows = [{"input_ids": encoded[i].input_ids, "labels": int(labels[i])} for i in index]
    if swap_augmentation:
        rows += [{"input_ids": swapped[i].input_ids, "labels": swap_label(labels[i])} for i in index]
    return rows


def predict_probs(model, encoded: list[EncodedPair], swapped: list[EncodedPair] | None, pad_id: int,
                  batch_tokens: int, on: torch.device, dtype: torch.dtype) -> np.ndarray:
    """Head probabilities; with `swapped` (swap TTA) averaged with the mirrored swapped-orientation ones."""
    probs = softmax(forward_pass(model, encoded, pad_id, batch_tokens, on, dtype).logits)
    if swapped is not None:
        probs = (probs + swap_probabilities(softmax(forward_pass(model, swapped, pad_id, batch_tokens, on,
                                                                 dtype).logits))) / 2
    return probs


def fold_setup(cfg: DictConfig, data_fingerprint: str | None) -> dict:
    """What a finished fold must agree with to be reused (seed checked on resume)."""
    learned = {k: v for k, v in OmegaConf.to_container(cfg.finetune, resolve=True).items()
               if k not in OPERATIONAL_KEYS}
    return {"seed": int(cfg.seed), "n_folds": int(cfg.cv.n_folds), "data": data_fingerprint,
            "config_hash": artifacts.config_hash({"model": cfg.model, "finetune": learned})}


def training_arguments(cfg: DictConfig, output_dir: Path, seed: int, dtype: torch.dtype, on: torch.device):
    from transformers import TrainingArguments

    ft = cfg.finetune
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=ft.per_device_batch_size,
        gradient_accumulation_steps=ft.gradient_accumulation_steps,
        num_train_epochs=ft.epochs,
        max_steps=ft.max_steps,
        learning_rate=ft.learning_rate,
        weight_decay=ft.weight_decay,
        warmup_steps=ft.warmup_ratio,
        lr_scheduler_type=ft.lr_scheduler,
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


def train_fold(cfg: DictConfig, k: int, fold_dir: Path, source, tokenizer, rows: list[dict], on: torch.device,
               dtype: torch.dtype) -> tuple[object, dict]:
    """Train fold k's adapter and head with the Trainer, resuming from its last checkpoint if one exists."""
    from transformers import Trainer, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    seed = int(cfg.seed) + k
    set_seed(seed)  # also seeds the fresh `score` head
    model = modeling.load_classifier(source, cfg.model, tokenizer, dtype, on)
    model = modeling.add_lora(model, cfg.model, cfg.finetune.lora, cfg.model.gradient_checkpointing)
    checkpoints = fold_dir / "checkpoints"
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume:
        log.info("fold %d: resuming from %s", k, resume)
    collator = PaddingCollator(tokenizer.pad_token_id, multiple_of=8 if on.type == "cuda" else 1)
    trainer = Trainer(model=model, args=training_arguments(cfg, checkpoints, seed, dtype, on), train_dataset=rows,
                      data_collator=collator, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    stats = {"train_seconds": round(seconds, 2), "train_rows": len(rows),
             "train_tokens": collator.real_tokens, "padded_tokens": collator.padded_tokens,
             "tokens_per_s": round(collator.real_tokens / seconds, 1), "padding_waste": round(collator.waste, 4),
             "resumed_from": resume}
    return trainer.model, stats


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def run(cfg: DictConfig) -> dict:
    modeling.validate(cfg.model)
    exp = artifacts.exp_dir(cfg)
    stage_dir = exp / "finetune"
    train = inputs.load_train(cfg)
    frame = train.frame
    fold_of = folds.load_or_create(exp, frame, cfg.cv.n_folds, cfg.seed)["fold"].to_numpy()
    labels = frame["label"].to_numpy()
    on = modeling.device()
    dtype = modeling.compute_dtype(cfg.model.precision, on)
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    encoded = encode_frame(tokenizer, frame, cfg.model)
    swapped = encode_frame(tokenizer, frame, cfg.model, swap=True)
    setup = fold_setup(cfg, artifacts.file_fingerprint(inputs.data_paths(cfg)[0]))
    artifacts.write_manifest(exp, cfg, "finetune")

    for k in range(cfg.cv.n_folds):
        fold_dir = stage_dir / f"fold_{k}"
        if artifacts.check_state(fold_dir, setup, HOW_TO_FIX):
            log.info("fold %d: done, skipped", k)
            continue
        if artifacts.is_main_process():
            artifacts.write_json(fold_dir / artifacts.STATE_FILE, {"done": False, **setup})
        train_index = np.flatnonzero(fold_of != k)
        held_out = np.flatnonzero(fold_of == k)
        rows = training_rows(encoded, swapped, labels, train_index, cfg.finetune.swap_augmentation)
        model, stats = train_fold(cfg, k, fold_dir, source, tokenizer, rows, on, dtype)
        if artifacts.is_main_process():
            model.save_pretrained(fold_dir / "adapter")
            probs = predict_probs(model, [encoded[i] for i in held_out],
                                  [swapped[i] for i in held_out] if cfg.finetune.swap_tta else None,
                                  tokenizer.pad_token_id, cfg.finetune.eval_batch_tokens, on, dtype)
            artifacts.write_parquet(fold_dir / "oof.parquet", pd.DataFrame(
                {"id": frame["id"].to_numpy()[held_out], "fold": k, **dict(zip(LABEL_COLUMNS, probs.T))}))
            stats["logloss"] = logloss(labels[held_out], probs)
            artifacts.mark_done(fold_dir, {**setup, "fold": k, "train_folds": sorted(int(f) for f in set(fold_of[train_index])),
                                           "stats": stats})
            shutil.rmtree(fold_dir / "checkpoints", ignore_errors=True)
            log.info("fold %d: logloss %.4f, %.0f tokens/s", k, stats["logloss"], stats["tokens_per_s"])
        del model
        barrier()

    if not artifacts.is_main_process():
        return {}
    oof = pd.concat([pd.read_parquet(stage_dir / f"fold_{k}" / "oof.parquet") for k in range(cfg.cv.n_folds)])
    oof["id"] = oof["id"].astype(str)
    oof = oof.set_index("id").loc[frame["id"]].reset_index()
    artifacts.write_parquet(stage_dir / "oof.parquet", oof)
    metrics = summarise(oof, labels, fold_of, stage_dir, cfg.cv.n_folds)
    artifacts.update_metrics(exp, "finetune", metrics)
    print(f"finetune: oof_logloss {metrics['oof_logloss']:.4f} (class prior {metrics['prior_logloss']:.4f}), "
          f"accuracy {metrics['accuracy']:.3f}, {metrics['tokens_per_s']:.0f} train tokens/s, "
          f"padding waste {metrics['padding_waste']:.3f}")
    return metrics


def summarise(oof: pd.DataFrame, labels: np.ndarray, fold_of: np.ndarray, stage_dir: Path, n_folds: int) -> dict:
    probs = oof[list(LABEL_COLUMNS)].to_numpy()
    states = [artifacts.read_state(stage_dir / f"fold_{k}") for k in range(n_folds)]
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
