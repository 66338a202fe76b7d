"""One check shared by the CUDA QLoRA test and its CPU twin: Trainer steps change exactly the trainable weights."""
from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

TRAINED = ("lora_A", "lora_B", "score.modules_to_save")          # LoRA and the trained copy of the head
FROZEN = ("base_layer", "score.original_module", "embed_tokens")  # the (quantised) base and the original head


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if any(k in n for k in TRAINED + FROZEN)}


def assert_steps_change_only_trainable_weights(cfg: DictConfig) -> None:
    """Two Trainer steps on a fold: every LoRA matrix B and the `modules_to_save` copy of the `score` head change;
    the base weights (quantised or not) and PEFT's frozen `score.original_module` stay bit for bit; the fold-end
    pass then gives probabilities."""
    from pipeline import context, embed_passes
    from pipeline.llm import modeling
    from pipeline.llm import training
    from pipeline.stages import finetune

    ctx = context.open_run(cfg, "finetune")
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    rows_all = embed_passes.encode_rows(tokenizer, ctx.train.frame, cfg)
    rows = training.training_rows(rows_all.encoded, None, ctx.labels, np.arange(32), False)
    snapshots = {}
    original_trainer = training.pipeline_trainer

    def recording_trainer(head_lr, **kwargs):
        cls = original_trainer(head_lr, **kwargs)

        class Recording(cls):
            def train(self, *args, **kwargs):
                snapshots["before"] = snapshot(self.model)
                return super().train(*args, **kwargs)
        return Recording

    training.pipeline_trainer = recording_trainer
    try:
        model, stats = finetune.train_fold(ctx, 0, source, tokenizer, rows)
    finally:
        training.pipeline_trainer = original_trainer
    before, after = snapshots["before"], snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_b = [n for n in before if "lora_B" in n]
    head_copy = [n for n in before if "score.modules_to_save" in n]
    frozen = [n for n in before if any(k in n for k in FROZEN)]
    assert lora_b and head_copy and any("score.original_module" in n for n in frozen) and \
        any("base_layer" in n for n in frozen)
    assert set(lora_b + head_copy) <= trainable and not set(frozen) & trainable
    assert stats["global_step"] == 2 and stats["train_tokens"] > 0
    unchanged = [n for n in lora_b + head_copy if torch.equal(before[n], after[n])]
    assert not unchanged, f"trainable weights that did not change: {unchanged}"
    changed = [n for n in frozen if not torch.equal(before[n], after[n])]
    assert not changed, f"frozen weights that changed: {changed}"
    settings = embed_passes.PassSettings(tokenizer.pad_token_id, cfg.embed, ctx.device, ctx.dtype)
    feats = embed_passes.pass_features(model, rows_all.take(np.arange(8)), settings)
    np.testing.assert_allclose(feats.head_probabilities().sum(axis=1), 1, rtol=1e-3)
