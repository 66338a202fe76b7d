"""The GPU memory plan of stage=check: arithmetic that moves the right way, and a plan on a machine with no GPU
and without the weights."""
from __future__ import annotations

import json

import pytest

from conftest import TINY_OVERRIDES, compose_cfg
from pipeline.llm import memory

LLAMA3_8B = memory.ModelShape.from_config(dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                                               num_attention_heads=32, num_key_value_heads=8,
                                               intermediate_size=14336, vocab_size=128256))


def plan(**changes) -> memory.MemoryPlan:
    settings = dict(shape=LLAMA3_8B, quantization="4bit", weight_bytes=2, lora_r=16, lora_targets="all-linear",
                    max_length=1536, per_device_batch_size=4, gradient_checkpointing=True, eager_attention=False,
                    batch_tokens=32768, captured_layers=3, gpu_memory_gb=24)
    return memory.plan(**{**settings, **changes})


def test_parameter_counts_match_the_published_size():
    """Llama-3-8B: 8.03 B parameters with its untied LM head; the classifier has no LM head (7.50 B)."""
    total = LLAMA3_8B.linear_params + LLAMA3_8B.other_params
    assert total + LLAMA3_8B.vocab * LLAMA3_8B.hidden == pytest.approx(8.03e9, rel=0.002)


def test_plan_moves_the_right_way():
    base = plan()
    assert plan(quantization="none").weights_gb > plan(quantization="8bit").weights_gb > base.weights_gb
    assert plan(gradient_checkpointing=False).activations_gb > 5 * base.activations_gb
    assert plan(per_device_batch_size=8).activations_gb == pytest.approx(2 * base.activations_gb)
    assert plan(lora_r=32).lora_gb == pytest.approx(2 * base.lora_gb, rel=0.01)
    assert plan(eager_attention=True).activations_per_row_gb > base.activations_per_row_gb
    assert plan(gpu_memory_gb=80).max_batch_size > base.max_batch_size > 0
    # A longer scoring pass (embed.max_length) and the LM likelihoods (embed.lm_features) cost scoring memory:
    # Llama-3-8B's fp32 LM head is 2.1 GB, a 1,024-position chunk of its logits 0.5 GB, three of them.
    assert plan(scoring_length=4096, eager_attention=True).scoring_gb > plan(eager_attention=True).scoring_gb
    lm_gb = (128256 * 4096 * 4 + 3 * 1024 * 128256 * 4) / 2 ** 30
    assert plan(lm_features=True).scoring_gb - base.scoring_gb == pytest.approx(lm_gb, rel=1e-6)
    # LoRA on the top 8 of 32 layers (finetune.top_layers): a quarter of the LoRA weights and of the activations
    # autograd keeps; a count above the depth is every layer.
    top = plan(top_layers=8, gradient_checkpointing=False)
    every = plan(gradient_checkpointing=False)
    assert top.lora_gb < every.lora_gb / 3 and top.activations_gb == pytest.approx(every.activations_gb / 4)
    assert plan(top_layers=64).total_gb == base.total_gb


def test_largest_batch_is_the_largest_that_fits():
    base = plan()
    assert plan(per_device_batch_size=base.max_batch_size).total_gb <= 24
    assert plan(per_device_batch_size=base.max_batch_size + 1).total_gb > 24
    assert plan(gpu_memory_gb=4).max_batch_size == 0 and not plan(gpu_memory_gb=4).fits


@pytest.mark.parametrize("preset", ["llama3_8b", "gemma2_9b", "qwen2_7b"])
def test_check_plans_a_gpu_preset_on_a_cpu_without_its_weights(preset, tmp_path, model_cache):
    """stage=check model=<preset> runs here (no CUDA, no weights): the plan comes from the preset's arch and is
    recorded as check.gpu_memory; the refusal to run 4-bit on a CPU is left to the stages that load the model."""
    from pipeline.stages import check

    cfg = compose_cfg(["stage=check", f"model={preset}", "check.gpu_memory_gb=24", f"paths.output_dir={tmp_path}",
                       f"paths.model_cache_dir={model_cache}"])
    metrics = check.run(cfg)
    plan_ = metrics["gpu_memory"]
    assert plan_["total_gb"] > plan_["weights_gb"] > 3 and plan_["max_batch_size"] >= 1
    recorded = json.loads((tmp_path / "default" / "metrics.json").read_text())["check"]["gpu_memory"]
    assert recorded == plan_


def test_check_plans_the_tiny_model_from_its_config(tiny_cfg):
    from pipeline.stages import check

    metrics = check.run(tiny_cfg("stage=check"))
    assert 0 < metrics["gpu_memory"]["weights_gb"] < 0.01


def test_cli_check_of_a_gpu_preset_exits_0_on_a_cpu(tmp_path, model_cache):
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-m", "pipeline", "stage=check", "model=llama3_8b",
                             f"paths.output_dir={tmp_path}", f"paths.model_cache_dir={model_cache}",
                             *[o for o in TINY_OVERRIDES if o.startswith("data.")]],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| total per device |" in result.stdout and "largest per-device batch within 24 GB" in result.stdout
