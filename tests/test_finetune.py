"""Fine-tune stage on the tiny random Llama: what trains, leak-free OOF, resume, config-change detection."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import artifacts, context, inputs
from pipeline.llm import modeling, training
from pipeline.data import load_pairs
from pipeline.errors import UserError
from pipeline.formatting import EncodedPair, encode_frame
from pipeline.stages import finetune


def tiny_setup(cfg):
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    frame = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame
    return source, tokenizer, frame


def test_adapter_and_head_change_base_does_not(tiny_cfg, tmp_path):
    cfg = tiny_cfg("finetune.max_steps=3", "finetune.learning_rate=1e-2", "model.precision=fp32")
    source, tokenizer, frame = tiny_setup(cfg)
    encoded = encode_frame(tokenizer, frame, cfg.model)
    rows = training.training_rows(encoded, encoded, frame["label"].to_numpy(), np.arange(40), False)
    on, dtype = torch.device("cpu"), torch.float32
    from transformers import set_seed

    set_seed(cfg.seed)  # train_fold seeds fold 0 the same way, so both start from identical weights
    reference = modeling.add_lora(modeling.load_classifier(source, cfg.model, tokenizer, dtype, on), cfg.model,
                                  cfg.finetune.lora, False, cfg.finetune.top_layers)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    ctx = context.open_run(cfg, "finetune")
    assert (ctx.device, ctx.dtype) == (on, dtype)
    model, stats = finetune.train_fold(ctx, 0, source, tokenizer, rows)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in changed) and any("modules_to_save" in n and "score" in n for n in changed)
    assert changed <= trainable  # frozen base weights unchanged
    assert all("lora_" in n or "score" in n for n in trainable)
    assert stats["train_tokens"] > 0 and 0 <= stats["padding_waste"] < 1


def test_swap_augmentation_flips_labels():
    enc = [EncodedPair([1, 2], (0, 1), (1, 2), 0), EncodedPair([3], (0, 1), (1, 1), 0),
           EncodedPair([4], (0, 1), (1, 1), 0)]
    swp = [EncodedPair([9, 9], (0, 1), (1, 2), 0)] * 3
    rows = training.training_rows(enc, swp, np.array([0, 1, 2]), np.array([0, 1, 2]), True)
    assert [r["labels"] for r in rows] == [0, 1, 2, 1, 0, 2]
    assert rows[3]["input_ids"] == [9, 9]
    assert len(training.training_rows(enc, swp, np.array([0, 1, 2]), np.array([2]), False)) == 1


def test_oof_covers_every_id_once_and_excludes_training_rows(tiny_experiment):
    cfg, exp, metrics = tiny_experiment
    oof = pd.read_parquet(exp / "finetune" / "oof.parquet")
    folds = pd.read_parquet(exp / "folds.parquet")
    assert oof["id"].is_unique and set(oof["id"]) == set(folds["id"])
    assert (oof.set_index("id").loc[folds["id"], "fold"].to_numpy() == folds["fold"].to_numpy()).all()
    np.testing.assert_allclose(oof[["winner_model_a", "winner_model_b", "winner_tie"]].sum(axis=1), 1, rtol=1e-5)
    for k in range(cfg.cv.n_folds):
        state = artifacts.read_state(exp / "finetune" / f"fold_{k}")
        assert state["done"] and k not in state["train_folds"] and state["seed"] == cfg.seed
        assert (exp / "finetune" / f"fold_{k}" / "adapter" / "adapter_model.safetensors").exists()
    ft = metrics["finetune"]
    assert {"oof_logloss", "per_fold", "tokens_per_s", "padding_waste", "train_seconds"} <= set(ft)
    assert len(ft["per_fold"]) == cfg.cv.n_folds


def test_rerun_skips_finished_folds(tiny_experiment, monkeypatch):
    cfg, exp, metrics = tiny_experiment

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished fold was retrained")

    monkeypatch.setattr(finetune, "train_fold", must_not_train)
    again = finetune.run(cfg)
    assert again["oof_logloss"] == pytest.approx(metrics["finetune"]["oof_logloss"])


def test_config_change_is_reported_not_mixed(tiny_experiment):
    cfg, exp, _ = tiny_experiment
    changed = cfg.copy()
    changed.finetune.learning_rate = 0.123
    with pytest.raises(UserError, match=r"fold_0 was made with a different setup \(finetune.learning_rate: 0.0005 -> 0.123\)"):
        finetune.run(changed)
    reseeded = cfg.copy()
    reseeded.seed = cfg.seed + 1
    with pytest.raises(UserError, match="seed"):
        finetune.run(reseeded)


def test_killed_fold_resumes_from_trainer_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    """A fold killed after its step-4 checkpoint continues from it on the next run: it starts at step 4, runs only
    the missing steps, and ends with the weights of one uninterrupted run."""
    overrides = ("finetune.max_steps=6", "finetune.save_steps=2", "finetune.learning_rate=1e-2")
    cfg = tiny_cfg(*overrides)
    source, tokenizer, frame = tiny_setup(cfg)
    encoded = encode_frame(tokenizer, frame, cfg.model)
    rows = training.training_rows(encoded, encoded, frame["label"].to_numpy(), np.arange(len(frame)), False)

    class Killed(Exception):
        pass

    original = training.pipeline_trainer

    def killed_after_step_4(head_lr, **kwargs):
        class Killing(original(head_lr, **kwargs)):
            def training_step(self, *args, **kwargs):
                if self.state.global_step == 4:
                    raise Killed
                return super().training_step(*args, **kwargs)
        return Killing

    ctx = context.open_run(cfg, "finetune")
    monkeypatch.setattr(training, "pipeline_trainer", killed_after_step_4)
    with pytest.raises(Killed):
        finetune.train_fold(ctx, 0, source, tokenizer, rows)
    monkeypatch.setattr(training, "pipeline_trainer", original)
    resumed, stats = finetune.train_fold(ctx, 0, source, tokenizer, rows)
    assert stats["resumed_from"].endswith("checkpoint-4") and stats["global_step"] == 6
    # Only steps 5-6 ran after the resume: 2 batches of 16 rows.
    assert 0 < stats["padded_tokens"] <= 2 * 16 * max(len(e.input_ids) for e in encoded)
    whole = context.open_run(tiny_cfg(*overrides, output_dir=tmp_path / "whole"), "finetune")
    uninterrupted, whole_stats = finetune.train_fold(whole, 0, source, tokenizer, rows)
    assert whole_stats["resumed_from"] is None and whole_stats["global_step"] == 6
    reference = dict(uninterrupted.named_parameters())
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, reference[name], atol=1e-5, rtol=1e-4)


def test_token_counts_hold_with_dataloader_workers(tiny_cfg, tmp_path):
    """With workers the collator runs in other processes: counts come from where batches reach the model."""
    cfg = tiny_cfg("finetune.max_steps=2", "finetune.dataloader_num_workers=2")
    source, tokenizer, frame = tiny_setup(cfg)
    encoded = encode_frame(tokenizer, frame, cfg.model)
    rows = training.training_rows(encoded, None, frame["label"].to_numpy(), np.arange(32), False)
    _, stats = finetune.train_fold(context.open_run(cfg, "finetune"), 0, source, tokenizer, rows)
    # 2 steps of 16 rows each, every row of the tiny demo data at least 100 tokens after formatting.
    assert stats["train_tokens"] >= 2 * 16 * 100 and stats["padded_tokens"] >= stats["train_tokens"]


def test_training_arguments_and_lora_fields_by_their_own_names(tiny_cfg, tmp_path):
    cfg = tiny_cfg("finetune.training_args.optim=adafactor", "finetune.training_args.max_grad_norm=0.5",
                   "+finetune.training_args.lr_scheduler_kwargs={}", "+finetune.lora.use_rslora=true",
                   "finetune.lora.r=4")
    args = training.training_arguments(cfg, tmp_path, 0, torch.float32, torch.device("cpu"))
    assert args.optim == "adafactor" and args.max_grad_norm == 0.5
    source, tokenizer, _ = tiny_setup(cfg)
    model = modeling.add_lora(modeling.load_classifier(source, cfg.model, tokenizer, torch.float32,
                                                       torch.device("cpu")), cfg.model, cfg.finetune.lora, False)
    config = model.peft_config["default"]
    assert config.use_rslora and config.r == 4 and "score" in config.modules_to_save
    # ... and the Trainer runs with them: its optimizer is Adafactor, its clipping 0.5.
    trainer = training.pipeline_trainer(None)(model=model, args=args, train_dataset=[])
    assert type(trainer.create_optimizer()).__name__ == "Adafactor" and trainer.args.max_grad_norm == 0.5


def test_head_gets_its_own_learning_rate(tiny_cfg, tmp_path):
    cfg = tiny_cfg("finetune.head_learning_rate=0.02", "finetune.learning_rate=0.001")
    source, tokenizer, _ = tiny_setup(cfg)
    model = modeling.add_lora(modeling.load_classifier(source, cfg.model, tokenizer, torch.float32,
                                                       torch.device("cpu")), cfg.model, cfg.finetune.lora, False)
    trainer = training.pipeline_trainer(0.02)(model=model, args=training.training_arguments(
        cfg, tmp_path, 0, torch.float32, torch.device("cpu")), train_dataset=[{"input_ids": [1], "labels": 0}])
    optimizer = trainer.create_optimizer()
    head = {id(p) for n, p in model.named_parameters() if "score" in n and p.requires_grad}
    lrs = {("head" if id(p) in head else "lora"): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs == {"head": 0.02, "lora": 0.001}


def test_verdict_token_head_init_copies_the_lms_rows(tiny_cfg):
    cfg = tiny_cfg()
    source, tokenizer, _ = tiny_setup(cfg)
    model = modeling.load_classifier(source, cfg.model, tokenizer, torch.float32, torch.device("cpu"))
    modeling.init_head_from_verdict_tokens(model, tokenizer, source, [" A", " B", " tie"])
    from transformers import AutoModelForCausalLM

    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" A", " B", " tie")]
    # The tiny Llama does not tie its embeddings: the rows come from the checkpoint's lm_head.
    rows = AutoModelForCausalLM.from_pretrained(source).lm_head.weight[ids].detach()
    torch.testing.assert_close(model.score.weight.detach(), rows - rows.mean(0, keepdim=True))


def test_extra_rows_must_be_other_rows(tiny_cfg, tmp_path):
    from pipeline.errors import UserError

    cfg = tiny_cfg()
    train_path = inputs.data_paths(cfg).train
    cfg.data.extra = str(train_path)
    with pytest.raises(UserError, match="ids also in data.train"):
        inputs.load_extra(cfg, load_pairs(inputs.data_paths(cfg).train, with_labels=True))


def test_length_batches_cover_every_row_once_and_pad_little():
    """Every row once per epoch; each batch of rows of nearly one length (far less padding than random batches
    or HF's mega-batch grouping on a few hundred rows); a new epoch reshuffles, the same epoch repeats."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.integers(40, 400, 403), 192).tolist()  # many rows at the cap, 403 = 50 batches + 3
    sampler = training.LengthBatchSampler(lengths, batch_size=8, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(403))

    def waste(indices: list[int]) -> float:
        batches = [indices[i: i + 8] for i in range(0, len(indices), 8)]
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / padded

    hf = list(LengthGroupedSampler(8, lengths=lengths, generator=torch.Generator().manual_seed(1)))
    assert waste(order) < 0.02 and waste(order) < waste(hf) / 3
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(403))
    sampler.set_epoch(0)
    assert list(sampler) == order


def test_trainer_uses_the_length_batches(tiny_cfg):
    cfg = tiny_cfg("finetune.max_steps=1")
    source, tokenizer, frame = tiny_setup(cfg)
    encoded = encode_frame(tokenizer, frame, cfg.model)
    rows = training.training_rows(encoded, None, frame["label"].to_numpy(), np.arange(32), False)
    ctx = context.open_run(cfg, "finetune")
    args = training.training_arguments(cfg, ctx.layout.checkpoints(0), 0, torch.float32, torch.device("cpu"))
    model = modeling.add_lora(modeling.load_classifier(source, cfg.model, tokenizer, torch.float32,
                                                       torch.device("cpu")), cfg.model, cfg.finetune.lora, False)
    trainer = training.pipeline_trainer(None)(model=model, args=args, train_dataset=rows)
    assert isinstance(trainer._get_train_sampler(), training.LengthBatchSampler)
    cfg.finetune.group_by_length = False
    args = training.training_arguments(cfg, ctx.layout.checkpoints(0), 0, torch.float32, torch.device("cpu"))
    trainer = training.pipeline_trainer(None)(model=model, args=args, train_dataset=rows)
    assert not isinstance(trainer._get_train_sampler(), training.LengthBatchSampler)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_hard_label_loss_trains_as_transformers_own_loss_to_the_bit(tiny_cfg, tmp_path, label_smoothing):
    """finetune.loss (HardLabelCrossEntropy) against the path it replaced, the Trainer with the classifier's own
    loss or its LabelSmoother (TrainingArguments.label_smoothing_factor): three bf16 steps with gradient
    accumulation and an uneven last batch give the same logged losses and the same weights, bit for bit."""
    from transformers import Trainer, set_seed

    from pipeline.llm.losses import HardLabelCrossEntropy

    cfg = tiny_cfg("finetune.max_steps=3", "finetune.gradient_accumulation_steps=2", "finetune.learning_rate=1e-2",
                   "finetune.per_device_batch_size=5", "finetune.group_by_length=false", "finetune.logging_steps=1")
    source, tokenizer, frame = tiny_setup(cfg)
    encoded = encode_frame(tokenizer, frame, cfg.model)
    rows = training.training_rows(encoded, None, frame["label"].to_numpy(), np.arange(27), False)
    on, dtype = torch.device("cpu"), torch.bfloat16
    collator = training.PaddingCollator(tokenizer.pad_token_id)
    trained = {}
    for path in ("transformers", "finetune.loss"):
        set_seed(0)
        model = modeling.add_lora(modeling.load_classifier(source, cfg.model, tokenizer, dtype, on), cfg.model,
                                  cfg.finetune.lora, False)
        args = training.training_arguments(cfg, tmp_path / path, 0, dtype, on)
        if path == "transformers":
            args.label_smoothing_factor = label_smoothing
            trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        else:
            trainer = training.pipeline_trainer(None, loss=HardLabelCrossEntropy(label_smoothing))(
                model=model, args=args, train_dataset=rows, data_collator=collator)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        trained[path] = losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    (reference_losses, reference), (losses, weights) = trained["transformers"], trained["finetune.loss"]
    assert len(losses) == 3 and losses == reference_losses
    assert reference.keys() == weights.keys()
    assert all(torch.equal(reference[n], weights[n]) for n in reference)


def test_a_loss_that_is_not_one_is_refused(tiny_cfg):
    from pipeline import validation

    with pytest.raises(UserError, match="finetune.training_args.label_smoothing_factor"):
        validation.validate(tiny_cfg("+finetune.training_args.label_smoothing_factor=0.1"))
    with pytest.raises(UserError, match="finetune.loss._target_=collections.OrderedDict is not a training loss"):
        validation.validate(tiny_cfg("finetune.loss._target_=collections.OrderedDict",
                                     "~finetune.loss.label_smoothing"))


def test_the_fine_tune_summary_is_what_its_formulas_say():
    """oof_logloss over every row; prior_logloss of each fold's training-fold prior; tokens/s and padding waste from
    the folds' summed tokens and seconds (not the mean of per-fold rates)."""
    from pipeline.scoring import fold_prior, logloss

    labels = np.array([0, 1, 2, 0, 0, 1])
    fold_of = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.4, 0.5, 0.1], [0.9, 0.05, 0.05],
                      [0.1, 0.8, 0.1]])
    oof = pd.DataFrame(probs, columns=["winner_model_a", "winner_model_b", "winner_tie"])
    stats = [{"logloss": 0.1, "train_seconds": 10.0, "train_tokens": 1000, "padded_tokens": 1250},
             {"logloss": 0.2, "train_seconds": 30.0, "train_tokens": 3000, "padded_tokens": 3000},
             {"logloss": 0.3, "train_seconds": 0.0, "train_tokens": 0, "padded_tokens": 0}]
    summary = finetune.summarise(oof, labels, fold_of, [{"stats": s} for s in stats])
    assert summary["oof_logloss"] == pytest.approx(-np.mean(np.log(probs[np.arange(6), labels])))
    assert summary["prior_logloss"] == logloss(labels, fold_prior(labels, fold_of))
    assert summary["tokens_per_s"] == 100.0 and summary["train_seconds"] == 40.0
    assert summary["padding_waste"] == round(1 - 4000 / 4250, 4)
    assert summary["per_fold"] == [0.1, 0.2, 0.3] and summary["accuracy"] == pytest.approx(5 / 6)
    assert "teacher_target_logloss" not in summary
