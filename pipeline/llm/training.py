"""Training one LoRA adapter + `score` head with the HF Trainer: the rows, the arguments, the batching and the
trainer the fine-tune folds (stage=finetune) and the full-data fit (stage=fit) share."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.llm import modeling, prefix_cache, warm_start
from pipeline.data import swap_label, swap_probabilities
from pipeline.formatting import EncodedPair
from pipeline.llm.inference import pad_batch
from pipeline.llm.losses import TEACHER_PROBS, HardLabelCrossEntropy, TrainingLoss
from pipeline.llm.modeling import NUM_LABELS

log = logging.getLogger(__name__)


class PaddingCollator:
    """Dynamic padding to the longest row of each batch, and the loss's targets stacked (picklable: it runs in
    dataloader workers)."""

    def __init__(self, pad_id: int, multiple_of: int = 1, targets: dict[str, torch.dtype] = TrainingLoss.targets):
        self.pad_id = pad_id
        self.multiple_of = multiple_of
        self.targets = targets

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask, _ = pad_batch([r["input_ids"] for r in rows], self.pad_id, multiple_of=self.multiple_of)
        batch = {"input_ids": ids, "attention_mask": mask,
                 **{name: torch.as_tensor([r[name] for r in rows], dtype=dtype)
                    for name, dtype in self.targets.items()}}
        if "prefix" in rows[0]:  # finetune.cache_prefix: the frozen layers' cached output, padded like the ids
            batch["prefix_hidden"] = prefix_cache.pad_prefixes([r["prefix"] for r in rows], ids.shape[1])
        return batch


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


def pipeline_trainer(head_learning_rate: float | None, tight_length_batches: bool = True,
                     cache: prefix_cache.PrefixCache | None = None, loss: TrainingLoss = HardLabelCrossEntropy()):
    """The HF Trainer plus four things: its loss is `loss` (finetune.loss); the optimizer can give the `score` head
    its own learning rate (the scheduler then scales both groups alike); real / padded tokens are counted where
    batches reach the model, in the main process, so the counts hold with dataloader workers too; and
    `train_sampling_strategy=group_by_length` uses LengthBatchSampler (`tight_length_batches=False` keeps HF's
    sampler, for the benchmark's comparison)."""
    from transformers import Trainer

    class PipelineTrainer(Trainer):
        real_tokens = 0
        padded_tokens = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, compute_loss_func=self.loss_from_outputs, **kwargs)
            self.batch_targets: dict[str, torch.Tensor] = {}

        def loss_from_outputs(self, outputs, labels, num_items_in_batch=None):
            return loss(outputs["logits"], {"labels": labels, **self.batch_targets}, num_items_in_batch)

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if not (tight_length_batches and self.args.train_sampling_strategy == "group_by_length"):
                return super()._get_train_sampler(train_dataset)
            return LengthBatchSampler([len(row["input_ids"]) for row in dataset],
                                      self.args.per_device_train_batch_size, self.args.data_seed or self.args.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            prefix = inputs.pop("prefix_hidden", None)
            if prefix is not None:
                cache.set_batch(prefix)
            self.batch_targets = {name: inputs.pop(name) for name in loss.targets if name != "labels"}
            # As the Trainer treats a model's own loss: scaled for gradient accumulation when it had the count.
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

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
                  index: np.ndarray, swap_augmentation: bool, teacher_probs: np.ndarray | None = None) -> list[dict]:
    """Trainer rows for `index`; with swap augmentation each row also appears A/B-swapped with its label swapped.
    `teacher_probs` (one row per label; finetune.teacher) become each row's soft target, mirrored in a swapped copy."""
    def row(ids: list[int], label: int, probs: np.ndarray | None) -> dict:
        return {"input_ids": ids, "labels": label} if probs is None else \
            {"input_ids": ids, "labels": label, TEACHER_PROBS: probs.tolist()}

    soft = (lambda i: None) if teacher_probs is None else (lambda i: teacher_probs[i])  # noqa: E731
    rows = [row(encoded[i].input_ids, int(labels[i]), soft(i)) for i in index]
    if swap_augmentation:
        rows += [row(swapped[i].input_ids, swap_label(labels[i]),
                     None if teacher_probs is None else swap_probabilities(teacher_probs[i])) for i in index]
    return rows


def all_training_rows(tokenizer, frame, model_cfg: DictConfig, swap_augmentation: bool,
                      label_targets: bool = False) -> list[dict]:
    """Every row of a labelled frame as trainer rows (data.extra for each fold; data.train and data.extra for
    stage=fit), with their swapped copies under swap augmentation. `label_targets`: rows no teacher labelled give
    their own label as the soft target (one-hot: the distillation loss's KL term is then their cross-entropy)."""
    from pipeline.formatting import encode_frame

    encoded = encode_frame(tokenizer, frame, model_cfg)
    swapped = encode_frame(tokenizer, frame, model_cfg, swap=True) if swap_augmentation else None
    labels = frame["label"].to_numpy()
    one_hot = np.eye(NUM_LABELS)[labels] if label_targets else None
    return training_rows(encoded, swapped, labels, np.arange(len(encoded)), swap_augmentation, one_hot)


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


def training_loss(ft: DictConfig) -> TrainingLoss:
    """finetune.loss built (`_target_`): the object the Trainer's loss comes from."""
    from hydra.utils import instantiate

    return instantiate(ft.loss)


@dataclass
class PrefixStore:
    """The cached prefixes of one fine-tune run, kept across its folds (finetune.cache_prefix): a row trains in K-1
    folds and the frozen layers give it the same output in each, so it is computed once. The first fold that needs
    it fills the store for every row of `run_rows` (all the rows any fold of the run can train on) in one pass, so a
    row's prefix is the same whichever folds a job trains (finetune.folds): folds run as separate jobs compute what
    one job computes."""

    run_rows: list[list[int]]
    by_ids: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)


def train_adapter(cfg: DictConfig, on: torch.device, dtype: torch.dtype, source, tokenizer, rows: list[dict],
                  seed: int, checkpoints: Path, tracking_dir: Path,
                  prefixes: PrefixStore | None = None) -> tuple[object, dict]:
    """Train one LoRA adapter and `score` head on `rows` with the Trainer (from finetune.init_adapter when set;
    no step at all with finetune.train=false), resuming from the last checkpoint under `checkpoints` if one
    exists; with a cached prefix, from `prefixes` (shared by a run's folds; None = this call's rows alone).
    Returns the model and the run's statistics."""
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    set_seed(seed)  # also seeds the fresh `score` head
    model = modeling.load_classifier(source, cfg.model, tokenizer, dtype, on)
    if cfg.finetune.head_init == "verdict_tokens":
        modeling.init_head_from_verdict_tokens(model, tokenizer, source, list(cfg.finetune.verdict_words))
    model = modeling.add_lora(model, cfg.model, cfg.finetune.lora, cfg.model.gradient_checkpointing,
                              cfg.finetune.top_layers)
    if cfg.finetune.init_adapter:
        warm_start.load_init_adapter(model, Path(cfg.finetune.init_adapter))
    if not cfg.finetune.train:
        # The frozen-feature path: the adapter stays as it starts (LoRA B = 0, or init_adapter's), no step taken.
        return model, {"train_seconds": 0.0, "train_rows": len(rows), "train_tokens": 0, "padded_tokens": 0,
                       "tokens_per_s": 0.0, "padding_waste": 0.0, "resumed_from": None, "global_step": 0}
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume:
        log.info("resuming from %s", resume)
    # finetune.attn_implementation: the training steps' attention (the frozen prefix's too, so cached and uncached
    # steps are the same); the model scores with its own again afterwards.
    attention = modeling.training_attention(cfg.finetune.get("attn_implementation"), cfg.model, on)
    with modeling.attention_for_training(model, attention):
        cache = None
        if cfg.finetune.get("cache_prefix"):
            rows, cache = with_cached_prefix(cfg, model, rows, tokenizer.pad_token_id, on, dtype, prefixes)
        loss = training_loss(cfg.finetune)
        collator = PaddingCollator(tokenizer.pad_token_id, multiple_of=8 if on.type == "cuda" else 1,
                                   targets=loss.targets)
        trainer = pipeline_trainer(cfg.finetune.head_learning_rate, cache=cache, loss=loss)(
            model=model, args=training_arguments(cfg, checkpoints, seed, dtype, on), train_dataset=rows,
            data_collator=collator, processing_class=tokenizer)
        for callback in trainer.callback_handler.callbacks:
            # TensorBoard would write under checkpoints/, which is removed once the adapter is saved.
            if type(callback).__name__ == "TensorBoardCallback" and callback.logging_dir is None:
                callback.logging_dir = str(tracking_dir)
        start = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            if cache is not None:
                cache.restore()
    seconds = time.perf_counter() - start
    real, padded = trainer.real_tokens, trainer.padded_tokens
    stats = {"train_seconds": round(seconds, 2), "train_rows": len(rows), "train_tokens": real,
             "padded_tokens": padded, "tokens_per_s": round(real / seconds, 1),
             "padding_waste": round(1 - real / padded, 4) if padded else 0.0, "resumed_from": resume,
             "global_step": int(trainer.state.global_step)}
    return trainer.model, stats


def with_cached_prefix(cfg: DictConfig, model, rows: list[dict], pad_id: int, on: torch.device,
                       dtype: torch.dtype, prefixes: PrefixStore | None = None
                       ) -> tuple[list[dict], prefix_cache.PrefixCache | None]:
    """finetune.cache_prefix: each row's output of the frozen layers, computed once (for every row of `prefixes`'
    run on its first use), and the stand-ins installed (see pipeline/prefix_cache.py); the rows unchanged and no
    cache when every layer trains or the cache would not fit the memory budget."""
    first = prefix_cache.first_trained_layer(model)
    if first is None:
        log.info("finetune.cache_prefix: every decoder layer trains (finetune.top_layers=null): nothing to cache")
        return rows, None
    store = prefixes if prefixes is not None else PrefixStore([r["input_ids"] for r in rows])
    if store.by_ids:  # filled by an earlier fold: only rows outside the run's rows (none in a fine-tune) are new
        missing = list(dict.fromkeys(key for key in (tuple(r["input_ids"]) for r in rows) if key not in store.by_ids))
    else:  # first use: the budget and one pass over every row of the run
        missing = list(dict.fromkeys(tuple(ids) for ids in [*store.run_rows, *(r["input_ids"] for r in rows)]))
        size = prefix_cache.cache_gb([len(ids) for ids in missing], int(model.config.hidden_size), dtype)
        budget = float(cfg.finetune.cache_prefix_max_gb)
        if size > budget:
            log.warning("finetune.cache_prefix: the cache would take %.1f GB (> finetune.cache_prefix_max_gb=%g): "
                        "training uncached", size, budget)
            return rows, None
    if missing:
        start = time.perf_counter()
        computed = prefix_cache.compute(model, [list(ids) for ids in missing], first, pad_id,
                                        int(cfg.embed.batch_tokens), on, dtype, cfg.embed.max_batch_padding)
        store.by_ids.update(zip(missing, computed))
        log.info("finetune.cache_prefix: layers 0-%d of %d rows cached once (%.0f s)", first - 1, len(missing),
                 time.perf_counter() - start)
    return ([{**r, "prefix": store.by_ids[tuple(r["input_ids"])]} for r in rows],
            prefix_cache.PrefixCache.install(model, first))
