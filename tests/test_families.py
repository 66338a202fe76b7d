"""Every model family the presets name, end to end on the CPU before any GPU sees it: tiny random Llama (no BOS),
Llama-3 (BOS, no pad), Gemma-2 (its config class, eager attention, BOS, real pad) and Qwen2 (biases, own pad, no
BOS); and each GPU preset's `arch` built on the meta device (no memory) as the pipeline's code will find it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_OVERRIDES, compose_cfg
from pipeline import embed_passes, feature_table, inputs, layout
from pipeline.data import LABEL_COLUMNS, load_pairs

FAMILIES = ("llama", "llama3", "gemma2", "qwen2")


@pytest.fixture(scope="module", params=FAMILIES)
def family_experiment(request, tmp_path_factory, model_cache):
    """stage=all (check -> finetune with the fold-end pass -> embed -> stack, with the demo test file) on the tiny
    model of one family."""
    from pipeline.stages import all as all_stage

    family = request.param
    out = tmp_path_factory.mktemp(f"family_{family}")
    cfg = compose_cfg([*TINY_OVERRIDES, f"model.tiny.family={family}", f"paths.output_dir={out}",
                       f"paths.model_cache_dir={model_cache}", f"exp_name={family}"])
    return family, cfg, Path(cfg.paths.exp_dir), all_stage.run(cfg)


def test_every_family_runs_end_to_end(family_experiment):
    """Every train id once in the OOF files, every test id once in the submission, probabilities that sum to 1,
    and vectors of the model's width at every fractional layer in both orientations."""
    family, cfg, exp, metrics = family_experiment
    ids = pd.read_parquet(exp / "folds.parquet")["id"]
    for oof_file in (exp / "finetune" / "oof.parquet", exp / "stack" / "oof.parquet"):
        oof = pd.read_parquet(oof_file)
        assert oof["id"].is_unique and set(oof["id"]) == set(ids), oof_file
        np.testing.assert_allclose(oof[list(LABEL_COLUMNS)].sum(axis=1), 1, rtol=1e-6)
    test_ids = pd.read_csv(inputs.data_paths(cfg).test, dtype={"id": str})["id"]
    submission = pd.read_csv(exp / "submission.csv", dtype={"id": str})
    assert list(submission["id"]) == list(test_ids)
    np.testing.assert_allclose(submission[list(LABEL_COLUMNS)].sum(axis=1), 1, atol=1e-6)
    table = feature_table.read_feature_table(exp / "embed" / layout.TRAIN_FEATURES)
    hidden = int(cfg.model.tiny.hidden_size)
    expected = {f"{layer}_{span}_{o}" for layer in ("h050", "h075", "h100") for span in ("prompt", "a", "b", "verdict")
                for o in ("fwd", "swp")}
    assert expected <= set(table.matrices)
    assert all(table.matrices[k].shape == (len(ids), hidden) for k in expected)
    assert np.isfinite(metrics["stack"]["oof_logloss"]) and metrics["embed"]["hidden_size"] == hidden


def test_every_family_predicts_with_the_averaged_adapter(family_experiment, tmp_path):
    """stage=predict with embed.test_adapters=averaged on a new test file: one pass, every row scored."""
    from pipeline.stages import predict

    family, cfg, exp, _ = family_experiment
    test = pd.read_csv(inputs.data_paths(cfg).test).head(6)
    test["id"] = [f"{family}-{i}" for i in range(len(test))]
    test.to_csv(tmp_path / "test.csv", index=False)
    averaged = compose_cfg([*TINY_OVERRIDES, f"model.tiny.family={family}", f"paths.output_dir={exp.parent}",
                            f"paths.model_cache_dir={cfg.paths.model_cache_dir}", f"exp_name={family}",
                            f"data.test={tmp_path / 'test.csv'}", "embed.test_adapters=averaged",
                            f"paths.predict_dir={tmp_path / 'out'}"])
    metrics = predict.run(averaged)
    submission = pd.read_csv(metrics["submission"], dtype={"id": str})
    assert list(submission["id"]) == list(test["id"])
    np.testing.assert_allclose(submission[list(LABEL_COLUMNS)].sum(axis=1), 1, atol=1e-6)


def test_averaged_adapter_equals_the_mean_of_the_merged_fold_models(family_experiment, tmp_path):
    """The averaged adapter (rank K*r, folds' A stacked, B side by side and scaled) gives the logits of a model
    whose weights are the mean of the K merged fold models; the head is the folds' mean head."""
    from pipeline.llm import modeling
    from pipeline.formatting import encode_frame
    from pipeline.llm.inference import forward_pass

    _, cfg, exp, _ = family_experiment
    lay = layout.Layout(exp)
    target = tmp_path / "averaged" / "adapter"
    embed_passes.average_adapters([lay.adapter(k) for k in range(cfg.cv.n_folds)], target)
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    cpu, fp32 = torch.device("cpu"), torch.float32
    merged = [modeling.load_with_adapter(source, cfg.model, tokenizer, lay.adapter(k), fp32, cpu).merge_and_unload()
              .state_dict() for k in range(cfg.cv.n_folds)]
    mean_model = modeling.load_classifier(source, cfg.model, tokenizer, fp32, cpu)
    mean_model.load_state_dict({name: torch.stack([m[name] for m in merged]).mean(0) for name in merged[0]})
    averaged = modeling.load_with_adapter(source, cfg.model, tokenizer, target, fp32, cpu)
    assert averaged.peft_config["default"].r == cfg.cv.n_folds * cfg.finetune.lora.r
    rows = load_pairs(inputs.data_paths(cfg).train, with_labels=True).frame.head(12)
    encoded = encode_frame(tokenizer, rows, cfg.model)
    expected = forward_pass(mean_model.eval(), encoded, tokenizer.pad_token_id, 4096, cpu, fp32).logits
    got = forward_pass(averaged, encoded, tokenizer.pad_token_id, 4096, cpu, fp32).logits
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    one_fold = forward_pass(modeling.load_with_adapter(source, cfg.model, tokenizer, lay.adapter(0), fp32, cpu),
                            encoded, tokenizer.pad_token_id, 4096, cpu, fp32).logits
    assert not np.allclose(one_fold, expected, atol=1e-4)  # the average is not just one fold


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_steps_change_only_trainable_weights_cpu_twin(family, tmp_path, model_cache):
    """The CUDA QLoRA test's check, on the CPU in bf16 without quantisation, for every family."""
    from lora_step import assert_steps_change_only_trainable_weights

    assert_steps_change_only_trainable_weights(compose_cfg([
        *TINY_OVERRIDES, f"model.tiny.family={family}", "model.precision=bf16", "finetune.max_steps=2",
        "finetune.learning_rate=1e-2", f"paths.output_dir={tmp_path}", f"paths.model_cache_dir={model_cache}"]))


@pytest.mark.parametrize("preset", ["llama3_8b", "gemma2_9b", "qwen2_7b"])
def test_gpu_preset_arch_builds_what_the_pipeline_finds(preset):
    """The preset's `arch` as a random model on the meta device (no memory): a ...ForSequenceClassification with a
    3-way `score` head, the decoder layers and final norm where the hooks look for them, every configured layer
    fraction capturable, and the LoRA targets (`all-linear`) wrapping every attention and MLP projection of every
    layer while the head is trained in full, not LoRA-wrapped."""
    from hydra.utils import instantiate
    from peft import TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline.llm.inference import backbone, capture_module

    cfg = compose_cfg([f"model={preset}"])
    arch = OmegaConf.to_container(cfg.model.arch)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**arch, num_labels=3))
    family = {"llama": "Llama", "gemma2": "Gemma2", "qwen2": "Qwen2"}[arch["model_type"]]
    assert type(model).__name__ == f"{family}ForSequenceClassification"
    assert model.score.out_features == 3 and model.score.in_features == arch["hidden_size"]
    body = backbone(model)
    assert len(body.layers) == arch["num_hidden_layers"] and capture_module(model, 1.0) is body.norm
    for fraction in cfg.embed.layers:
        assert capture_module(model, fraction) in [*body.layers, body.norm]
    lora = instantiate(cfg.finetune.lora, task_type=TaskType.SEQ_CLS, modules_to_save=["score"], _convert_="all")
    peft_model = get_peft_model(model, lora)
    wrapped = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == projections
    assert len(wrapped) == len(projections) * arch["num_hidden_layers"]
    assert not any("score" in n for n in wrapped)
    assert any("score.modules_to_save" in n for n, _ in peft_model.named_parameters())


def test_an_attention_the_family_cannot_use_is_one_error(tiny_cfg):
    """Gemma-2 has no SDPA path in transformers: asking for it is an `error:` naming the setting, not a traceback
    from inside the loader (the tiny preset's null picks each family's own default)."""
    from pipeline.llm import modeling
    from pipeline.errors import UserError

    cfg = tiny_cfg("model.tiny.family=gemma2", "model.attn_implementation=sdpa")
    source = modeling.base_model_dir(cfg.model, cfg.paths.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    with pytest.raises(UserError, match="model.attn_implementation=sdpa: this model cannot use it"):
        modeling.load_classifier(source, cfg.model, tokenizer, torch.float32, torch.device("cpu"))
