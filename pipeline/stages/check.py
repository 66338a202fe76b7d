"""stage=check: validate data.train / data.test and the config before a long run; print and record a summary."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline import artifacts, context, folds, inputs, teachers, validation
from pipeline.llm import memory, modeling, warm_start
from pipeline.data import PairData
from pipeline.errors import UserError
from pipeline.formatting import MARKERS, leading_special_ids, segment_text, template_tokens, tokenizer_fn

log = logging.getLogger(__name__)


def token_length_percentiles(data: PairData, tokenizer) -> dict[str, dict[str, int]]:
    """Untruncated token counts per segment and for the whole formatted pair (p50/p90/p99/max)."""
    tokenize = tokenizer_fn(tokenizer)
    frame = data.frame
    counts = {col: np.array([len(ids) for ids in tokenize([segment_text(t) for t in frame[col]])])
              for col in ("prompt", "response_a", "response_b")}
    counts["pair"] = sum(counts.values()) + sum(len(ids) for ids in tokenize(list(MARKERS))) + \
        len(leading_special_ids(tokenizer))
    return {name: {f"p{q}": int(np.percentile(v, q)) for q in (50, 90, 99)} | {"max": int(v.max())}
            for name, v in counts.items()}


def local_base_model(cfg: DictConfig) -> Path | None:
    """The base model's folder when it is already on disk (tiny is built in a second); else None, so a check never
    waits for a model conversion or download."""
    if cfg.model.source == "tiny":
        return Path(modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir))
    target, _ = modeling.base_model_plan(cfg.model, cfg.paths.model_cache_dir)
    return Path(str(target)) if Path(str(target)).is_dir() else None


def cheap_tokenizer(cfg: DictConfig):
    """The model's tokenizer when the base model is on disk (local_base_model); else None."""
    try:
        folder = local_base_model(cfg)
        return None if folder is None else modeling.load_tokenizer(folder, cfg.model)
    except Exception as exc:  # the length summary is an extra, never a reason to fail the check
        log.warning("no token-length summary: %s", exc)
        return None


def model_shape(cfg: DictConfig) -> dict | None:
    """The model's transformers config (defaults filled in) without its weights: the preset's `arch`, else the
    config.json of a base model already on disk (tiny is built in a second); None when neither is at hand."""
    from transformers import AutoConfig

    if cfg.model.get("arch"):
        return AutoConfig.for_model(**OmegaConf.to_container(cfg.model.arch, resolve=True)).to_dict()
    try:
        folder = local_base_model(cfg)
        return None if folder is None else AutoConfig.from_pretrained(folder, local_files_only=True).to_dict()
    except Exception as exc:  # the plan is an extra, never a reason to fail the check
        log.warning("no GPU memory plan: %s", exc)
        return None


def memory_plan(cfg: DictConfig) -> memory.MemoryPlan | None:
    """GPU memory per device for this model and these settings (see pipeline/memory.py)."""
    config = model_shape(cfg)
    if config is None:
        return None
    weight_bytes = 4 if cfg.model.precision == "fp32" else 2
    eager = (cfg.model.attn_implementation or ("eager" if config.get("model_type") == "gemma2" else "sdpa")) == "eager"
    return memory.plan(memory.ModelShape.from_config(config), cfg.model.quantization, weight_bytes,
                       int(cfg.finetune.lora.r), cfg.finetune.lora.get("target_modules"), int(cfg.model.max_length),
                       int(cfg.finetune.per_device_batch_size), bool(cfg.model.gradient_checkpointing), eager,
                       int(cfg.embed.batch_tokens), len(cfg.embed.layers), float(cfg.check.gpu_memory_gb),
                       scoring_length=cfg.embed.max_length, lm_features=bool(cfg.embed.lm_features),
                       top_layers=cfg.finetune.top_layers)


def check_lengths(cfg: DictConfig, tokenizer) -> None:
    """model.max_length (training) and embed.max_length (scoring) must leave room for text after the template."""
    fixed = template_tokens(tokenizer)
    for key, value in (("model.max_length", cfg.model.max_length), ("embed.max_length", cfg.embed.max_length)):
        if value is not None and int(value) < fixed + 3:
            raise UserError(f"{key}={value} leaves no room for text after the {fixed} template tokens of this "
                            f"tokenizer; raise it to at least {fixed + 3}")


def summarise(data: PairData, tokenizer, max_length: int) -> dict:
    summary: dict = {"file": data.source, "n_rows": len(data.frame), "n_repaired": data.n_repaired,
                     "repairs": data.repairs}
    if data.has_labels:
        summary["label_counts"] = data.label_counts()
    if tokenizer is not None:
        summary["token_lengths"] = token_length_percentiles(data, tokenizer)
        summary["max_length"] = max_length
    return summary


def run(cfg: DictConfig) -> dict:
    validation.validate(cfg)  # the whole config the other stages will run with
    # Folds are assigned here when they do not exist yet, which also checks cv.n_folds against the data.
    ctx = context.open_run(cfg, "check")
    train, test = ctx.train, ctx.test
    # What later stages would refuse after a long fine-tune is refused now: stage two's inner splits of every
    # training set, and extra rows that copy train rows.
    folds.check_inner_splits(ctx.labels, ctx.groups, ctx.fold_of, int(cfg.stack.inner_folds), int(cfg.seed))
    extra = inputs.load_extra(cfg, train)
    if cfg.finetune.init_adapter:
        warm_start.check_start(cfg, train.frame, ctx.train_path, local_base_model(cfg), scored=True)
    taught_by = teachers.check(ctx)  # teachers found, sharing this experiment's rows and folds
    unlabeled = inputs.load_unlabeled(cfg, train, test)
    if unlabeled is not None and unlabeled.in_test:
        log.warning("%s: %d rows are also rows of data.test (first ids %s): the teacher's probabilities for them "
                    "train the student (transductive pseudo-labelling)", unlabeled.path, len(unlabeled.in_test),
                    ", ".join(unlabeled.in_test[:3]))
    tokenizer = cheap_tokenizer(cfg)
    if tokenizer is not None:
        check_lengths(cfg, tokenizer)
    metrics = {"train": summarise(train, tokenizer, cfg.model.max_length)}
    metrics["train"]["fold_sizes"] = np.bincount(ctx.fold_of, minlength=ctx.n_folds).astype(int).tolist()
    if extra is not None:
        metrics["extra"] = summarise(extra, tokenizer, cfg.model.max_length)
    if taught_by:
        metrics["teachers"] = taught_by
    if unlabeled is not None:
        metrics["unlabeled"] = summarise(unlabeled.data, tokenizer, cfg.model.max_length)
        metrics["unlabeled"]["rows_in_test"] = len(unlabeled.in_test)
    single = [name for name, n in metrics["train"]["label_counts"].items() if n == len(train.frame)]
    if single:
        log.warning("every one of the %d rows of %s is labelled %r: the model can only learn that prior",
                    len(train.frame), train.source, single[0])
        metrics["train"]["warnings"] = [f"every row is labelled {single[0]!r}"]
    if test is not None:
        metrics["test"] = summarise(test, tokenizer, cfg.model.max_length)
        overlap = set(train.frame["id"]) & set(test.frame["id"])
        metrics["test"]["ids_also_in_train"] = len(overlap)
    shape = model_shape(cfg)
    if shape is not None:
        validation.validate_lora_layers(cfg.finetune, int(shape["num_hidden_layers"]))
    plan = memory_plan(cfg)
    if plan is not None:
        metrics["gpu_memory"] = plan.as_dict()
        print(plan.table())
    for split, summary in ((k, v) for k, v in metrics.items() if k in ("train", "test", "extra", "unlabeled")):
        line = f"check {split}: {summary['n_rows']} rows, {summary['n_repaired']} repaired {summary['repairs']}"
        if "label_counts" in summary:
            line += f", labels {summary['label_counts']}"
        if "token_lengths" in summary:
            pair = summary["token_lengths"]["pair"]
            scoring = f", embed.max_length={cfg.embed.max_length}" if cfg.embed.max_length else ""
            line += (f", pair tokens p50/p90/p99/max = {pair['p50']}/{pair['p90']}/{pair['p99']}/{pair['max']} "
                     f"(model.max_length={cfg.model.max_length}{scoring})")
        log.info(line)
    if ctx.is_main:
        artifacts.update_metrics(ctx.layout.root, "check", metrics)
    return metrics
