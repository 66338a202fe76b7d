"""Start warm, fit once, or train nothing: stage=fit (one adapter on every row), finetune.init_adapter (every fold
starts from a saved adapter) and finetune.train=false (the frozen-feature path)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES, compose_cfg
from pipeline import artifacts, inputs, setups, validation
from pipeline.llm import modeling
from pipeline.data import load_pairs
from pipeline.errors import UserError
from pipeline.formatting import encode_frame
from pipeline.llm.inference import forward_pass
from pipeline.layout import Layout
from pipeline.stages import all as all_stage, check, finetune, fit


def other_rows(source: Path, target: Path) -> Path:
    """The demo train file with every prompt and id changed: rows a fine-tune on the demo file never scores."""
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    frame["prompt"] = [json.dumps(["(other) " + turns[0], *turns[1:]]) for turns in map(json.loads, frame["prompt"])]
    frame["id"] = "fit-" + frame["id"]
    frame.to_csv(target, index=False)
    return target


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, model_cache):
    """A full-data fit of the tiny model (a few steps, a learning rate large enough to move every weight) on rows
    the demo experiments never score."""
    out = tmp_path_factory.mktemp("fit")
    demo = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={model_cache}"])
    train = other_rows(inputs.data_paths(demo).train, out / "fit_rows.csv")
    cfg = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={model_cache}",
                       "stage=fit", "exp_name=pretrain", "finetune.max_steps=3", "finetune.learning_rate=1e-2",
                       "model.precision=fp32", f"data.train={train}"])
    stats = fit.run(cfg)
    return cfg, out / "pretrain" / "fit" / "adapter", stats


def test_fit_trains_one_adapter_on_every_row_and_is_reused(fitted):
    cfg, adapter, stats = fitted
    n_rows = len(load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame)
    assert stats["train_rows"] == n_rows * (2 if cfg.finetune.swap_augmentation else 1) and stats["global_step"] == 3
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    assert any("score" in k for k in weights)
    assert fit.run(cfg) == stats  # done with the same setup: skipped
    changed = cfg.copy()
    changed.finetune.learning_rate = 0.5
    with pytest.raises(UserError, match="different setup"):
        fit.run(changed)


def test_starting_from_an_adapter_reproduces_it_at_step_0(fitted, tiny_cfg):
    """finetune.init_adapter with finetune.train=false: every fold's adapter is the start's tensors exactly, and
    scores a pair exactly as the start does."""
    _, start, _ = fitted
    cfg = tiny_cfg("exp_name=warm", f"finetune.init_adapter={start}", "finetune.train=false", "model.precision=fp32")
    metrics = finetune.run(cfg)
    assert metrics["train_seconds"] == 0
    expected = load_file(str(start / "adapter_model.safetensors"))
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    frame = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame.iloc[:6]
    encoded = encode_frame(tokenizer, frame, cfg.model)
    cpu = torch.device("cpu")
    reference = forward_pass(modeling.load_with_adapter(source, cfg.model, tokenizer, start, torch.float32, cpu),
                             encoded, tokenizer.pad_token_id, 4096, cpu, torch.float32).logits
    lay = Layout.of(cfg)
    for k in range(cfg.cv.n_folds):
        assert artifacts.read_state(lay.finetune_fold(k))["stats"]["global_step"] == 0
        saved = load_file(str(lay.adapter(k) / "adapter_model.safetensors"))
        assert set(saved) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(saved[name].float(), tensor.float()), name
        fold_model = modeling.load_with_adapter(source, cfg.model, tokenizer, lay.adapter(k), torch.float32, cpu)
        got = forward_pass(fold_model, encoded, tokenizer.pad_token_id, 4096, cpu, torch.float32).logits
        np.testing.assert_array_equal(got, reference)


def test_the_start_is_part_of_the_setup_by_content(fitted, tiny_cfg, tmp_path):
    _, start, _ = fitted
    import shutil

    copy = tmp_path / "start"
    shutil.copytree(start, copy)
    cfg = tiny_cfg(f"finetune.init_adapter={copy}")
    before = setups.finetune_setup(cfg)["init_adapter"]
    weights = load_file(str(copy / "adapter_model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in weights.items()}, str(copy / "adapter_model.safetensors"))
    assert setups.finetune_setup(cfg)["init_adapter"] != before
    assert "init_adapter" not in setups.finetune_setup(tiny_cfg())  # no start: the setup of older experiments


def test_a_start_of_another_rank_or_no_adapter_is_one_error(fitted, tiny_cfg, tmp_path):
    _, start, _ = fitted
    with pytest.raises(UserError, match=r"has r=16.*finetune.lora"):
        validation.validate(tiny_cfg(f"finetune.init_adapter={start}", "finetune.lora.r=4"))
    with pytest.raises(UserError, match="no adapter there"):
        validation.validate(tiny_cfg(f"finetune.init_adapter={tmp_path}"))


def test_frozen_feature_path_runs_end_to_end_without_a_training_step(tiny_cfg):
    """finetune.train=false: no step anywhere, every LoRA B stays zero (the adapters are the base model), and the
    stacker is trained on the base model's features (head from the verdict words)."""
    cfg = tiny_cfg("exp_name=frozen", "finetune.train=false", "finetune.head_init=verdict_tokens",
                   "embed.lm_features=true", "stack.blend_members=[head,text,summary,vectors,likelihood]")
    metrics = all_stage.run(cfg)
    assert metrics["finetune"]["train_seconds"] == 0 and np.isfinite(metrics["stack"]["oof_logloss"])
    lay = Layout.of(cfg)
    for k in range(cfg.cv.n_folds):
        weights = load_file(str(lay.adapter(k) / "adapter_model.safetensors"))
        assert all(v.abs().sum() == 0 for n, v in weights.items() if "lora_B" in n)


def test_a_start_that_saw_scored_rows_is_refused_by_content(tiny_cfg, model_cache, tmp_path):
    """stage=fit on the demo file, then a fine-tune of the same rows warm-started from it: refused (every fold would
    start from a model that saw its held-out rows), also when the fit's rows come back under other ids, A/B-swapped,
    or (folds grouped by prompt) only their prompts do; with cv.group_by=id only whole pairs count."""
    fit_cfg = tiny_cfg("stage=fit", "exp_name=leaky", "finetune.max_steps=1")
    fit.run(fit_cfg)
    start = Path(fit_cfg.paths.exp_dir) / "fit" / "adapter"
    train = pd.read_csv(inputs.data_paths(fit_cfg).train, dtype=str, keep_default_na=False)
    with pytest.raises(UserError, match=r"was trained on 90 pairs or prompts of data\.train \(first ids 0, 1, 2\)"):
        finetune.run(tiny_cfg("exp_name=warm_leak", f"finetune.init_adapter={start}"))
    disguised = train.copy()
    disguised["id"] = "x" + disguised["id"]
    disguised[["response_a", "response_b"]] = disguised[["response_b", "response_a"]].to_numpy()
    disguised[["winner_model_a", "winner_model_b"]] = disguised[["winner_model_b", "winner_model_a"]].to_numpy()
    disguised.to_csv(tmp_path / "disguised.csv", index=False)
    with pytest.raises(UserError, match="was trained on 90 pairs"):
        check.run(tiny_cfg("exp_name=warm_leak2", f"data.train={tmp_path / 'disguised.csv'}",
                           f"finetune.init_adapter={start}"))
    same_prompts = train.copy()
    same_prompts["response_a"] = [json.dumps([f"new answer {i}"]) for i in range(len(train))]
    same_prompts.to_csv(tmp_path / "prompts.csv", index=False)
    with pytest.raises(UserError, match="pairs or prompts"):
        check.run(tiny_cfg("exp_name=warm_leak3", f"data.train={tmp_path / 'prompts.csv'}",
                           f"finetune.init_adapter={start}"))
    check.run(tiny_cfg("exp_name=warm_leak4", f"data.train={tmp_path / 'prompts.csv'}", "cv.group_by=id",
                       f"finetune.init_adapter={start}"))  # other pairs, folds not grouped by prompt: fine


def test_a_finished_experiment_needs_no_warm_start_folder(fitted, tiny_cfg, tmp_path):
    """The fold adapters carry the start: once finished, an experiment is read (stack, predict, Predictor, export)
    with its warm-start folder moved away, with or without the init_adapter override."""
    _, start, _ = fitted
    moved = tmp_path / "start" / "adapter"
    shutil.copytree(start.parent, moved.parent)
    cfg = tiny_cfg("exp_name=warm_moved", f"finetune.init_adapter={moved}", "finetune.max_steps=1")
    all_stage.run(cfg)
    shutil.rmtree(moved.parent)
    from pipeline import Predictor
    from pipeline.stages import predict, stack

    same = ("exp_name=warm_moved", "finetune.max_steps=1")
    stack.run(tiny_cfg(*same))
    stack.run(tiny_cfg(*same, f"finetune.init_adapter={moved}"))
    predictor = Predictor.load(Path(cfg.paths.exp_dir))
    test = pd.read_csv(inputs.data_paths(cfg).test)
    assert predictor.predict_proba(test).shape == (len(test), 3)
    predict.run(tiny_cfg(*same, "stage=predict"))
    validation.validate(tiny_cfg(*same, "stage=export", f"finetune.init_adapter={moved}"))


def test_a_start_of_another_model_is_one_error(fitted, tiny_cfg):
    """A warm start made on another base model (another family, or another width) is refused before training."""
    _, start, _ = fitted
    with pytest.raises(UserError, match="another base model"):
        check.run(tiny_cfg("exp_name=other_family", "model.tiny.family=qwen2", f"finetune.init_adapter={start}"))
    with pytest.raises(UserError, match="another base model"):
        check.run(tiny_cfg("exp_name=wider", "model.tiny.hidden_size=96", f"finetune.init_adapter={start}"))
    state = artifacts.read_state(start.parent)
    (start.parent / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "base_model"}))
    try:  # no record of the base model: the adapter's own shapes tell the width
        with pytest.raises(UserError, match="hidden size is 96"):
            check.run(tiny_cfg("exp_name=wider2", "model.tiny.hidden_size=96", f"finetune.init_adapter={start}"))
    finally:
        (start.parent / "state.json").write_text(json.dumps(state))


def test_an_all_linear_fit_starts_an_all_linear_fine_tune(tiny_cfg, tmp_path):
    """A fit with target_modules=all-linear saves the modules it found; a fine-tune naming the same short names
    (or all-linear again) accepts it."""
    fit_cfg = tiny_cfg("stage=fit", "exp_name=all_linear", "finetune.max_steps=1",
                       "finetune.lora.target_modules=all-linear")
    fit.run(fit_cfg)
    start = Path(fit_cfg.paths.exp_dir) / "fit" / "adapter"
    saved = json.loads((start / "adapter_config.json").read_text())["target_modules"]
    short = sorted({m.split(".")[-1] for m in saved})
    validation.validate(tiny_cfg(f"finetune.init_adapter={start}", f"finetune.lora.target_modules=[{','.join(short)}]"))
    validation.validate(tiny_cfg(f"finetune.init_adapter={start}", "finetune.lora.target_modules=all-linear"))


def test_fit_without_training_is_refused(tiny_cfg):
    with pytest.raises(UserError, match="stage=fit with finetune.train=false"):
        validation.validate(tiny_cfg("stage=fit", "finetune.train=false"))
