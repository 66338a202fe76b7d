"""Start warm, fit once, or train nothing: stage=fit (one adapter on every row), finetune.init_adapter (every fold
starts from a saved adapter) and finetune.train=false (the frozen-feature path)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES, compose_cfg
from pipeline import artifacts, inputs, modeling, setups, validation
from pipeline.data import load_pairs
from pipeline.errors import UserError
from pipeline.formatting import encode_frame
from pipeline.inference import forward_pass
from pipeline.layout import Layout
from pipeline.stages import all as all_stage, finetune, fit


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, model_cache):
    """A full-data fit of the tiny model (a few steps, a learning rate large enough to move every weight)."""
    out = tmp_path_factory.mktemp("fit")
    cfg = compose_cfg([*TINY_OVERRIDES, f"paths.output_dir={out}", f"paths.model_cache_dir={model_cache}",
                       "stage=fit", "exp_name=pretrain", "finetune.max_steps=3", "finetune.learning_rate=1e-2",
                       "model.precision=fp32"])
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
